"""The supervisor and the zygote: deny-list filters (controlplane/policy.py), no_new_privs,
and the supervisor's capabilities, in a running `embervm` and in a fresh interpreter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import prctl
import pytest

from controlplane.policy import SUPERVISOR, SUPERVISOR_CAPABILITIES, ZYGOTE, ZYGOTE_DROPPED_CAPABILITIES
from guest.build import GuestImages
from shared.seccomp import Filter, compile_filter
from tests.integration.test_api_boot import Embervm, configure, embervm_api  # noqa: F401  (embervm_api: fixture)
from tests.security.conftest import REPO, SIGSYS_RC, proc_status, threads_of
from tests.support.api_client import ApiClient, assert_no_content


def children(pid: int) -> list[int]:
    return [int(c) for t in threads_of(pid) for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def cap_mask(caps: object) -> int:
    return sum(1 << cap for cap in caps)  # type: ignore[attr-defined]


def test_supervisor_and_zygote_of_a_running_embervm_are_filtered_without_new_privileges(
    embervm_api: Callable[..., tuple[Embervm, ApiClient]],  # noqa: F811
    guest_images: GuestImages,
) -> None:
    proc, client = embervm_api()
    configure(client, guest_images.elf, "console=ttyS0 test=loop ticks_every=100000")
    assert_no_content(client.put("/actions", json={"action_type": "InstanceStart"}))
    proc.console.wait_for("tick 3")  # the guest runs: the API, the zygote and the workers work under the filters
    supervisor = proc.proc.pid
    (zygote,) = [c for c in children(supervisor) if comm(c) == "embervm-zygote"]
    workers = children(zygote)

    for pid in (supervisor, zygote):
        assert {proc_status(pid, tid)["Seccomp"] for tid in threads_of(pid)} == {"2"}, comm(pid)
        assert {proc_status(pid, tid)["NoNewPrivs"] for tid in threads_of(pid)} == {"1"}, comm(pid)
    assert workers and {proc_status(w)["Seccomp_filters"] for w in workers} == {"2"}  # the zygote's + their own
    if os.geteuid() == 0:
        kept = cap_mask(SUPERVISOR_CAPABILITIES)
        status = proc_status(supervisor)
        assert {k: int(status[k], 16) for k in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb")} == {
            "CapEff": kept,
            "CapPrm": kept,
            "CapBnd": kept,
            "CapInh": 0,
            "CapAmb": 0,
        }
        zygote_bounding = int(proc_status(zygote)["CapBnd"], 16)
        assert zygote_bounding & cap_mask(ZYGOTE_DROPPED_CAPABILITIES) == 0
        assert zygote_bounding & cap_mask([prctl.CAP_SYS_ADMIN, prctl.CAP_SETUID, prctl.CAP_SETGID])  # namespaces, uid
    assert client.get("/").json()["state"] == "Running"
    os.kill(supervisor, signal.SIGTERM)
    assert proc.wait() == 128 + signal.SIGTERM


def test_no_seccomp_leaves_the_supervisor_and_the_zygote_unfiltered(
    embervm_api: Callable[..., tuple[Embervm, ApiClient]],  # noqa: F811
) -> None:
    proc, client = embervm_api("--no-seccomp")
    supervisor = proc.proc.pid
    (zygote,) = [c for c in children(supervisor) if comm(c) == "embervm-zygote"]

    assert (proc_status(supervisor)["Seccomp"], proc_status(zygote)["Seccomp"]) == ("0", "0")
    assert client.get("/").json()["state"] == "Not started"


def run_with(filter_name: str, body: str) -> subprocess.CompletedProcess[str]:
    """`body` in a fresh interpreter after loading controlplane.policy's `filter_name`, its
    kills made SECCOMP_RET_TRAP (also SIGSYS, but not written to the kernel log, whose rate
    limit the kill-report tests rely on; test_process_filters_kill checks the real action)."""
    script = "\n".join(
        [
            "import ctypes, dataclasses, errno, os, sys, threading",
            "from controlplane.policy import SUPERVISOR, ZYGOTE",
            "from shared.confine import load_process_filter",
            "libc = ctypes.CDLL(None, use_errno=True)",
            f"flt = {filter_name}",
            "quiet = tuple(dataclasses.replace(r, action='trap') if r.action == 'kill_process' else r"
            " for r in flt.rules)",
            "load_process_filter(dataclasses.replace(flt, rules=quiet))",
            "sys.stdout.write('confined\\n'); sys.stdout.flush()",
            textwrap.dedent(body),
            "sys.stdout.flush(); os._exit(0)",
        ]
    )
    return subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=30, check=False
    )


WEAPONS = [
    pytest.param("libc.ptrace(16, os.getppid(), 0, 0)", id="ptrace-attach"),
    pytest.param("libc.syscall(310, os.getppid(), 0, 0, 0, 0, 0)", id="process_vm_readv"),
    pytest.param("libc.syscall(321, 0, 0, 0)", id="bpf"),
    pytest.param("libc.syscall(298, 0, 0, -1, -1, 0)", id="perf_event_open"),
    pytest.param("libc.syscall(250, 0, 0, 0, 0, 0)", id="keyctl"),
    pytest.param("libc.syscall(304, -100, b'/', 0)", id="open_by_handle_at"),
    pytest.param("libc.syscall(313, -1, b'', 0)", id="finit_module"),
    pytest.param("libc.syscall(323, 0)", id="userfaultfd"),
    pytest.param("libc.syscall(227, 0, 0)", id="clock_settime"),
    pytest.param("libc.syscall(169, 0, 0, 0, 0)", id="reboot"),
]


@pytest.mark.parametrize("filter_name", ["SUPERVISOR", "ZYGOTE"])
@pytest.mark.parametrize("body", WEAPONS)
def test_weapons_kill_the_supervisor_and_the_zygote(filter_name: str, body: str) -> None:
    result = run_with(filter_name, body)

    assert (result.returncode, result.stdout) == (SIGSYS_RC, "confined\n")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param("libc.mount(b'none', b'/nonexistent', b'tmpfs', 0, None)", id="mount"),
        pytest.param("libc.unshare(0)", id="unshare"),
        pytest.param("libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)", id="clone-CLONE_NEWUSER"),
        pytest.param("libc.setresuid(65534, 65534, 65534)", id="setresuid"),
        pytest.param("libc.chroot(b'/')", id="chroot"),
    ],
)
def test_supervisor_may_not_create_namespaces_mount_or_change_uid(body: str) -> None:
    result = run_with("SUPERVISOR", body)

    assert (result.returncode, result.stdout) == (SIGSYS_RC, "confined\n")


def test_supervisor_may_not_exec_and_survives_trying() -> None:
    result = run_with(
        "SUPERVISOR", "try:\n    os.execv('/bin/true', ['true'])\nexcept OSError as e:\n    print(e.strerror)"
    )

    assert (result.returncode, result.stdout) == (0, "confined\nPermission denied\n")  # EACCES


def test_supervisor_threads_start_under_its_filter() -> None:
    result = run_with(
        "SUPERVISOR",
        "out = []\nts = [threading.Thread(target=out.append, args=(i,)) for i in range(8)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]; print(sorted(out) == list(range(8)))",
    )

    assert (result.returncode, result.stdout) == (0, "confined\nTrue\n"), result.stderr


def test_zygote_may_fork_mount_unshare_and_change_uid_for_its_workers() -> None:
    result = run_with(
        "ZYGOTE",
        """
        pid = os.fork()
        if pid == 0:
            rc = libc.unshare(0x00020000)  # CLONE_NEWNS: a worker's own mount namespace
            rc |= libc.mount(b"none", b"/", None, 0x40000 | 0x4000, None)  # MS_PRIVATE | MS_REC
            rc |= libc.setresgid(65534, 65534, 65534) | libc.setresuid(65534, 65534, 65534)
            os._exit(0 if rc == 0 else 3)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        """,
    )
    if os.geteuid() != 0 or not prctl.cap_effective.sys_admin:
        pytest.skip("needs root to create a mount namespace")

    assert (result.returncode, result.stdout) == (0, "confined\n0\n"), result.stderr


@pytest.mark.parametrize("flt", [SUPERVISOR, ZYGOTE], ids=["supervisor", "zygote"])
def test_process_filters_kill_allow_by_default_and_name_every_rule(flt: Filter) -> None:
    compile_filter(flt)

    assert flt.default_action == "allow"
    assert {str(r.action) for r in flt.rules} <= {"kill_process", "{'errno': 38}", "{'errno': 13}"}
    assert [r.syscall for r in flt.rules if len(r.comment) < 5] == []
    assert {"ptrace", "process_vm_readv", "process_vm_writev", "bpf", "kexec_load", "init_module"} <= flt.syscalls()


def test_zygote_does_not_deny_what_its_workers_set_up_before_their_own_filter() -> None:
    worker_setup = {"mount", "umount2", "pivot_root", "unshare", "setresuid", "setresgid", "setgroups", "chdir"}
    worker_setup |= {"prlimit64", "setrlimit", "capset", "prctl", "seccomp", "ioctl", "clone", "clone3"}

    assert not ZYGOTE.syscalls() & worker_setup
