"""The vsock worker's seccomp policy, as data."""

from __future__ import annotations

from devices.vsock.policy import POLICY
from shared.seccomp import COMMON, SOCK_CLOEXEC, compile_filter


def test_adds_only_stream_io_and_half_close_to_the_common_policies() -> None:
    extra = POLICY.syscalls() - COMMON.syscalls()

    assert extra == {"accept4", "sendmsg", "recvmsg", "shutdown"}


def test_no_bind_listen_open_exec_or_ioctl() -> None:
    assert not POLICY.syscalls() & {"bind", "listen", "open", "openat", "execve", "ioctl", "fork", "vfork", "kill"}


def test_no_new_sockets_or_connects_and_accept_is_cloexec() -> None:
    assert not POLICY.syscalls() & {"socket", "socketpair", "connect"}  # the supervisor connects for it
    (accept_rule,) = [r for r in POLICY.rules if r.syscall == "accept4"]
    assert [(c.index, c.value) for c in accept_rule.args] == [(3, SOCK_CLOEXEC)]


def test_every_rule_names_its_caller_and_the_policy_compiles() -> None:
    assert all(r.comment for r in POLICY.rules)
    compile_filter(POLICY)
