"""The vsock worker's seccomp policy, as data."""

from __future__ import annotations

from devices.vsock.policy import POLICY
from shared.seccomp import AF_UNIX, COMMON, SOCK_CLOEXEC, SOCK_NONBLOCK, SOCK_STREAM, compile_filter


def test_adds_only_stream_io_and_half_close_to_the_common_policies() -> None:
    extra = POLICY.syscalls() - COMMON.syscalls()

    assert extra == {"accept4", "sendmsg", "recvmsg", "shutdown", "socket", "connect"}


def test_no_bind_listen_open_exec_or_ioctl() -> None:
    assert not POLICY.syscalls() & {"bind", "listen", "open", "openat", "execve", "ioctl", "fork", "vfork", "kill"}


def test_new_sockets_are_nonblocking_af_unix_streams_only_and_accept_is_cloexec() -> None:
    (socket_rule,) = [r for r in POLICY.rules if r.syscall == "socket"]
    assert [(c.index, c.value) for c in socket_rule.args] == [
        (0, AF_UNIX),
        (1, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC),
        (2, 0),
    ]
    (accept_rule,) = [r for r in POLICY.rules if r.syscall == "accept4"]
    assert accept_rule.args


def test_every_rule_names_its_caller_and_the_policy_compiles() -> None:
    assert all(r.comment for r in POLICY.rules)
    compile_filter(POLICY)
