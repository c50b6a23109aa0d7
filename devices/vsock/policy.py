"""The vsock worker's seccomp policy: COMMON (CPython, glibc, ZeroMQ) plus its AF_UNIX traffic.

Everything host-side was set up before the filter: the listening socket at `uds_path` was
created, bound and put into listen by the supervisor and handed over as an fd; the
muxer's epoll instance exists; the ZeroMQ control connection is made. Afterwards the worker

* accepts host connections on that listener: `accept4` with SOCK_CLOEXEC;
* never connects: for a guest-initiated connection the supervisor connects to
  `<uds_path>_<port>` and hands the connected socket over the fd channel (VsockConnect /
  VsockConnected), so there is no `socket` and no `connect`;
* moves stream bytes: `sendmsg` (guest payload straight from guest memory) and
  `recvmsg` (host bytes straight into the guest's rx buffers; also the fd channel),
  `sendto`/`recvfrom` (in COMMON), `shutdown` (half-close);
* polls its host sockets in its own epoll (`epoll_wait`, `epoll_ctl`, in COMMON);
* as a replacement, rewinds a host socket's peek offset (`setsockopt(SOL_SOCKET,
  SO_PEEK_OFF)` only; reading it is `getsockopt`, in COMMON).

No socket, no connect, no bind, no listen, no open, no exec.
"""

from __future__ import annotations

import socket

from devices.vsock.backend import SO_PEEK_OFF
from shared.seccomp import (
    COMMON,
    SOCK_CLOEXEC,
    Filter,
    allow,
    arg_eq,
    policy,
)

VSOCK = policy(
    allow("accept4", "a host connection on the listener at uds_path", arg_eq(3, SOCK_CLOEXEC, "SOCK_CLOEXEC")),
    allow("sendmsg", "guest -> host stream bytes, sent from guest memory (Connection.on_rw)"),
    allow("recvmsg", "host -> guest stream bytes, read into rx buffers (Connection._read_into); the fd channel"),
    allow("shutdown", "half-close: SHUT_WR on the host socket after the guest's SHUTDOWN(SEND)"),
    allow(
        "setsockopt",
        "a replacement rewinds the peek offset of a host socket whose peeked bytes the dead worker never "
        "published (UnixMuxer.resume, devices/vsock/durable.py)",
        arg_eq(1, socket.SOL_SOCKET, "SOL_SOCKET"),
        arg_eq(2, SO_PEEK_OFF, "SO_PEEK_OFF"),
    ),
)

POLICY: Filter = COMMON + VSOCK
