"""Real workers under their default filters: confined on every thread, no false positives,
and a forbidden syscall kills just that worker, reported with the syscall's number."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from controlplane.launcher import Launcher
from controlplane.microvm import MicroVm, VmStartError
from controlplane.vm_spec import DriveSpec, VmSpec
from guest.build import GuestImages
from shared import exitcodes
from tests.security.conftest import proc_status, space_kills, threads_of
from tests.support.console import ConsoleCapture
from tests.support.waiting import wait_until
from vcpu_worker.policy import POLICY as VCPU_POLICY

MEM_MIB = 64
SECTORS = 64
CAP_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
# What the TestSyscall hook attempts (shared.confine.attempt_forbidden), and the syscall the
# kernel reports for it: every one kills every kind of worker.
FORBIDDEN = [
    ("execve", 59, "execve"),
    ("open", 257, "openat"),
    ("socket_inet", 41, "socket"),
    ("socket_unix", 41, "socket"),
    ("fcntl_setown", 72, "fcntl"),
    ("fcntl_setsig", 72, "fcntl"),
    ("fcntl_async", 72, "fcntl"),
    ("ioctl", 16, "ioctl"),
]


def make_disk(path: Path) -> str:
    """A disk whose sectors 0..7 hold the test guest's host pattern."""
    path.write_bytes(bytes((s * 7 + i) & 0xFF for s in range(SECTORS) for i in range(512)))
    return str(path)


def start(
    launcher: Launcher, kernel: Path, args: str, drives: list[DriveSpec] = (), **spec: object
) -> tuple[MicroVm, ConsoleCapture]:
    console = ConsoleCapture()
    vm = launcher.start_vm(
        VmSpec(kernel_image_path=str(kernel), boot_args=args, mem_size_mib=MEM_MIB, drives=list(drives), **spec),  # type: ignore[arg-type]
        console,
        lambda code, reason: None,
    )
    return vm, console


def drives(tmp_path: Path, *ids: str) -> list[DriveSpec]:
    return [DriveSpec(i, make_disk(tmp_path / f"{i}.img"), is_root_device=(n == 0)) for n, i in enumerate(ids)]


def worker(vm: MicroVm, name: str) -> dict[str, object]:
    (info,) = [w for w in vm.workers() if w["name"] == name]
    return info


def wait_dead(vm: MicroVm, name: str, timeout: float = 10.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while (info := worker(vm, name))["alive"] and time.monotonic() < deadline:
        time.sleep(0.02)
    return info


def wait_restarted(vm: MicroVm, name: str, old_pid: object, timeout: float = 10.0) -> dict[str, object]:
    """`name`'s replacement worker, once it runs (the supervisor restarts dead device workers)."""
    deadline = time.monotonic() + timeout
    while not ((info := worker(vm, name))["pid"] != old_pid and info["alive"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return info


@pytest.fixture
def kill_log(launcher: Launcher) -> None:
    if launcher.seccomp_kills.unavailable:
        pytest.skip(f"the supervisor cannot name the syscall here: {launcher.seccomp_kills.unavailable}")


def test_guest_uses_two_drives_under_the_default_filters(launcher, guest_images: GuestImages, tmp_path: Path):
    vm, console = start(launcher, guest_images.elf, "test=blk blk.irq=1", drives(tmp_path, "rootfs", "data"))

    assert vm.wait(timeout=30) == exitcodes.OK
    assert "blk0: write ok" in console.text and "blk1: write ok" in console.text
    assert "blk: done" in console.text
    assert [w["exit_reason"] for w in vm.workers() if str(w["name"]).startswith("block_")] == [
        "stopped by the supervisor",
        "stopped by the supervisor",
    ]
    assert vm.metrics()["seccomp"] == {"num_faults": 0}


def test_every_thread_of_every_worker_is_filtered_without_privileges(
    launcher, guest_images: GuestImages, tmp_path: Path
):
    vm, console = start(launcher, guest_images.elf, "test=echo", drives(tmp_path, "rootfs"))
    try:
        console.wait_for("echo ready")
        pids = {str(w["name"]): int(w["pid"]) for w in vm.workers()}  # type: ignore[call-overload]
        threads = {(name, tid): proc_status(pid, tid) for name, pid in pids.items() for tid in threads_of(pid)}

        assert set(pids) == {"vcpu", "block_rootfs"}
        assert len(threads) >= 6  # main + vCPU + ZeroMQ's I/O and reaper threads; main + ZeroMQ's
        assert {key: s["Seccomp"] for key, s in threads.items()} == dict.fromkeys(threads, "2")
        assert {key: s["NoNewPrivs"] for key, s in threads.items()} == dict.fromkeys(threads, "1")
        assert {key: {int(s[c], 16) for c in CAP_SETS} for key, s in threads.items()} == {key: {0} for key in threads}
        assert Path(f"/proc/{pids['vcpu']}/comm").read_text() == "embervm-vcpu\n"
        assert Path(f"/proc/{pids['block_rootfs']}/comm").read_text() == "embervm-block_r\n"
    finally:
        vm.stop()


def test_each_worker_holds_only_its_own_files(launcher, guest_images: GuestImages, tmp_path: Path):
    vm, console = start(launcher, guest_images.elf, "test=echo", drives(tmp_path, "rootfs"))
    try:
        console.wait_for("echo ready")
        paths = {}
        for w in vm.workers():
            pid = int(w["pid"])  # type: ignore[call-overload]
            targets = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd") if int(fd) > 2}
            paths[w["name"]] = {t for t in targets if t.startswith("/") and not t.startswith("/memfd:")}

        assert paths == {"vcpu": {"/dev/kvm"}, "block_rootfs": {str(tmp_path / "rootfs.img")}}
    finally:
        vm.stop()


@pytest.fixture(scope="module", autouse=True)
def _quiet_kernel_log() -> None:
    """The kernel writes at most 10 audit records per 5 s (printk_ratelimit), for the whole
    host: let a window pass after other suites' kills (the red team's, say) before these
    tests read their kills' records back."""
    time.sleep(5.5)


@pytest.mark.parametrize(("what", "number", "name"), FORBIDDEN)
def test_forbidden_syscall_in_the_vcpu_worker_ends_the_vm_with_the_syscall_reported(
    launcher, guest_images: GuestImages, kill_log, what: str, number: int, name: str
):
    vm, console = start(launcher, guest_images.elf, "test=loop", seccomp_test_hooks=True)
    console.wait_for("tick 1")

    space_kills()
    vm.test_syscall("vcpu", what)

    assert vm.wait(timeout=10) == exitcodes.BAD_SYSCALL
    assert vm.exit_reason == f"vCPU worker killed by seccomp (syscall {number}, {name})"
    assert worker(vm, "vcpu")["exit_reason"] == f"vcpu worker killed by seccomp (syscall {number}, {name})"
    assert vm.metrics()["seccomp"] == {"num_faults": 1}


@pytest.mark.parametrize(("what", "number", "name"), FORBIDDEN)
def test_forbidden_syscall_in_a_block_worker_kills_only_that_worker(
    launcher, guest_images: GuestImages, tmp_path: Path, kill_log, what: str, number: int, name: str
):
    vm, console = start(
        launcher, guest_images.elf, "test=echo", drives(tmp_path, "rootfs", "data"), seccomp_test_hooks=True
    )
    try:
        console.wait_for("echo ready")

        space_kills()
        vm.test_syscall("block_data", what)

        old_pid = worker(vm, "block_data")["pid"]
        new = wait_restarted(vm, "block_data", old_pid)
        assert (new["alive"], new["restarts"], new["last_restart_cause"]) == (
            True,
            1,
            f"killed by seccomp (syscall {number}, {name})",
        )
        vm.send_console_input(b"still here\n")
        console.wait_for("echo: still here")
        assert (vm.state, worker(vm, "vcpu")["alive"], worker(vm, "block_rootfs")["alive"]) == ("Running", True, True)
        metrics = vm.metrics()
        assert metrics["seccomp"] == {"num_faults": 1}
        assert metrics["block_rootfs"]["worker_alive"] == 1
        assert metrics["embervm_workers"]["restarts_seccomp"] == 1
    finally:
        vm.stop()


def test_test_syscall_is_ignored_by_a_worker_started_without_test_hooks(launcher, guest_images: GuestImages):
    vm, console = start(launcher, guest_images.elf, "test=echo")
    try:
        console.wait_for("echo ready")

        vm.test_syscall("vcpu", "execve")
        vm.send_console_input(b"after\n")

        console.wait_for("echo: after")
        assert worker(vm, "vcpu")["alive"] is True
    finally:
        vm.stop()


def test_no_seccomp_runs_workers_unfiltered_and_says_so_loudly(launcher, guest_images: GuestImages, caplog):
    caplog.set_level(logging.WARNING, logger="embervm.microvm")
    vm, console = start(launcher, guest_images.elf, "test=echo", no_seccomp=True, seccomp_test_hooks=True)
    try:
        console.wait_for("echo ready")
        pid = int(worker(vm, "vcpu")["pid"])  # type: ignore[call-overload]

        vm.test_syscall("vcpu", "execve")
        vm.send_console_input(b"unfiltered\n")

        console.wait_for("echo: unfiltered")
        # no filter of its own: at most the one it inherits from the zygote (controlplane/policy.py)
        inherited = proc_status(launcher.zygote.pid)["Seccomp_filters"]
        assert {proc_status(pid, tid)["Seccomp_filters"] for tid in threads_of(pid)} == {inherited}
        assert int(proc_status(pid)["CapEff"], 16) == 0
        assert "seccomp is OFF (--no-seccomp)" in caplog.text
        # The worker's log line travels over ZeroMQ and may land after the console echo.
        assert wait_until(lambda: "test syscall survived: execve failed: No such file or directory" in caplog.text)
    finally:
        vm.stop()


def test_user_filter_file_replaces_the_default_policy(launcher, guest_images: GuestImages, tmp_path: Path, caplog):
    caplog.set_level(logging.WARNING, logger="embervm.microvm")
    user = VCPU_POLICY.to_json()
    user["filter"].append({"syscall": "execve", "comment": "refused, not killed", "action": {"errno": 1}})
    path = tmp_path / "filters.json"
    path.write_text(json.dumps({"vcpu": user}))
    vm, console = start(launcher, guest_images.elf, "test=echo", seccomp_filter=str(path), seccomp_test_hooks=True)
    try:
        console.wait_for("echo ready")

        vm.test_syscall("vcpu", "execve")
        vm.send_console_input(b"custom\n")

        console.wait_for("echo: custom")
        assert wait_until(lambda: "test syscall survived: execve failed: Operation not permitted" in caplog.text)
    finally:
        vm.stop()
    assert vm.exit_code == exitcodes.OK  # stopping kicks the vCPU threads: tgkill is added to user filters


def test_filter_file_without_a_filter_for_a_worker_kind_refuses_to_start(
    launcher, guest_images: GuestImages, tmp_path: Path
):
    path = tmp_path / "filters.json"
    path.write_text(json.dumps({"vcpu": VCPU_POLICY.to_json()}))

    with pytest.raises(VmStartError, match="no filter for worker kind 'block'"):
        start(launcher, guest_images.elf, "test=boot", drives(tmp_path, "rootfs"), seccomp_filter=str(path))
