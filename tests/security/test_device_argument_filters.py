"""The net and vsock workers under their default filters: each forbidden attempt of the
TestSyscall hook (a fcntl that would arm SIGIO towards another process, an ioctl, a
socket, an openat, an exec) kills the worker, which is reported with its syscall and
replaced. The vCPU and block workers get the same list in test_worker_confinement.py."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest

from controlplane.launcher import Launcher
from controlplane.microvm import MicroVm
from controlplane.vm_spec import VmSpec
from guest.build import GuestImages
from tests.integration.test_net_vm import iface, ns  # noqa: F401  (ns: fixture)
from tests.integration.test_net_vm import start as start_net
from tests.security.conftest import space_kills
from tests.security.test_worker_confinement import FORBIDDEN, kill_log, wait_restarted, worker  # noqa: F401
from tests.support import netns
from tests.support.console import ConsoleCapture

RESTARTS = {"max_restarts": len(FORBIDDEN) + 2, "backoff_max_s": 0.2}  # one kill per attempt
# Kills are spaced (space_kills), but other processes on the host share the kernel's rate
# limit for the records: "syscall unknown" is accepted for some of them.
UNKNOWN = "killed by seccomp (syscall unknown: no audit record in the kernel log)"


def kill_each_way(vm: MicroVm, name: str) -> dict[str, str]:
    """Make the worker `name` attempt each forbidden syscall in turn; the cause of each restart."""
    causes = {}
    for what, _, _ in FORBIDDEN:
        space_kills()
        old_pid = worker(vm, name)["pid"]
        vm.test_syscall(name, what)
        new = wait_restarted(vm, name, old_pid)
        causes[what] = str(new["last_restart_cause"])
    return causes


def assert_killed_by_seccomp_for_the_right_syscall(causes: dict[str, str]) -> None:
    expected = {what: f"killed by seccomp (syscall {number}, {name})" for what, number, name in FORBIDDEN}
    named = {what: cause for what, cause in causes.items() if cause != UNKNOWN}

    assert named == {what: expected[what] for what in named}
    assert len(named) >= len(FORBIDDEN) // 2, causes  # most records make it through the rate limit


@pytest.mark.skipif(not netns.available(), reason="needs root, iproute2 and /dev/net/tun")
def test_every_forbidden_attempt_kills_the_net_worker(
    launcher: Launcher,
    guest_images: GuestImages,
    ns: netns.NetNs,  # noqa: F811
    kill_log: None,  # noqa: F811
) -> None:
    vm, console = start_net(
        launcher,
        guest_images,
        ns,
        "test=echo",
        network_interfaces=[iface()],
        seccomp_test_hooks=True,
        restart_policy=RESTARTS,
    )
    try:
        console.wait_for("echo ready")

        causes = kill_each_way(vm, "net_eth0")

        assert_killed_by_seccomp_for_the_right_syscall(causes)
        assert vm.metrics()["seccomp"] == {"num_faults": len(FORBIDDEN)}
        vm.send_console_input(b"still here\n")
        console.wait_for("echo: still here")
    finally:
        vm.stop()


@pytest.fixture
def uds() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="vs", dir="/tmp")  # sun_path is short: keep it so
    yield f"{path}/v.sock"
    shutil.rmtree(path, ignore_errors=True)


def test_every_forbidden_attempt_kills_the_vsock_worker(
    launcher: Launcher,
    guest_images: GuestImages,
    uds: str,
    kill_log: None,  # noqa: F811
) -> None:
    console = ConsoleCapture()
    spec = VmSpec(
        kernel_image_path=str(guest_images.elf),
        boot_args="test=echo",
        mem_size_mib=64,
        vsock={"guest_cid": 3, "uds_path": uds},
        seccomp_test_hooks=True,
        restart_policy=RESTARTS,
    )
    vm = launcher.start_vm(spec, console, lambda code, reason: None)  # type: ignore[arg-type]
    try:
        console.wait_for("echo ready")

        causes = kill_each_way(vm, "vsock")

        assert_killed_by_seccomp_for_the_right_syscall(causes)
        assert vm.metrics()["seccomp"] == {"num_faults": len(FORBIDDEN)}
        vm.send_console_input(b"still here\n")
        console.wait_for("echo: still here")
    finally:
        vm.stop()
