"""The net worker's seccomp policy as data."""

from __future__ import annotations

from devices.net.policy import NET, POLICY
from devices.net.tap import TUNSETOFFLOAD

NEVER_ALLOWED = {"execve", "execveat", "fork", "vfork", "open", "openat", "openat2", "ptrace", "kill", "bpf", "mount"}


def test_net_policy_adds_only_tap_io_and_never_opens_or_execs() -> None:
    allowed = {r.syscall for r in POLICY.rules if r.action is None}
    assert not allowed & NEVER_ALLOWED
    assert {r.syscall for r in NET.rules} == {"readv", "writev", "ioctl", "recvmsg"}
    assert POLICY.default_action == "kill_process"


def test_ioctl_is_pinned_to_tunsetoffload_and_no_socket_is_made() -> None:
    (ioctl,) = [r for r in POLICY.rules if r.syscall == "ioctl"]
    assert [(a.index, a.op, a.value) for a in ioctl.args] == [(1, "eq", TUNSETOFFLOAD)]
    assert not POLICY.syscalls() & {"socket", "connect", "bind", "listen", "socketpair"}
