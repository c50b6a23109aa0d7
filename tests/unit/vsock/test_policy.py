"""The vsock worker's seccomp policy, as data."""

from __future__ import annotations

import socket

from devices.vsock.backend import SO_PEEK_OFF
from devices.vsock.policy import POLICY
from shared.seccomp import COMMON, SOCK_CLOEXEC, compile_filter


def test_adds_only_stream_io_half_close_and_the_peek_offset_to_the_common_policies() -> None:
    extra = POLICY.syscalls() - COMMON.syscalls()

    assert extra == {"accept4", "sendmsg", "recvmsg", "shutdown", "setsockopt"}


def test_setsockopt_is_only_the_peek_offset() -> None:
    (rule,) = [r for r in POLICY.rules if r.syscall == "setsockopt"]
    assert [(c.index, c.value) for c in rule.args] == [(1, socket.SOL_SOCKET), (2, SO_PEEK_OFF)]


def test_no_bind_listen_open_exec_or_ioctl() -> None:
    assert not POLICY.syscalls() & {"bind", "listen", "open", "openat", "execve", "ioctl", "fork", "vfork", "kill"}


def test_no_new_sockets_or_connects_and_accept_is_cloexec() -> None:
    assert not POLICY.syscalls() & {"socket", "socketpair", "connect"}  # the supervisor connects for it
    (accept_rule,) = [r for r in POLICY.rules if r.syscall == "accept4"]
    assert [(c.index, c.value) for c in accept_rule.args] == [(3, SOCK_CLOEXEC)]


def test_every_rule_names_its_caller_and_the_policy_compiles() -> None:
    assert all(r.comment for r in POLICY.rules)
    compile_filter(POLICY)
