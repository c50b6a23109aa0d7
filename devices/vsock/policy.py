"""The vsock worker's seccomp policy: COMMON (CPython, glibc, ZeroMQ) plus its AF_UNIX traffic.

Everything host-side was set up before the filter: the listening socket at `uds_path` was
created, bound and put into listen by the supervisor and handed over as an fd; the
muxer's epoll instance exists; the ZeroMQ control connection is made. Afterwards the worker

* accepts host connections on that listener: `accept4` with SOCK_CLOEXEC;
* connects to `<uds_path>_<port>` for a guest-initiated connection: `socket` pinned to
  (AF_UNIX, SOCK_STREAM|SOCK_NONBLOCK|SOCK_CLOEXEC, 0) and `connect`. seccomp cannot look
  at the address a pointer argument points to, so the path is not enforced by the filter:
  the worker's code builds the only path it ever connects to, and its mount and network
  namespaces bound which sockets exist at all. TEMPORARY: both rules go once the
  supervisor makes these connections and hands the worker the connected fd;
* moves stream bytes: `sendmsg` (guest payload straight from guest memory) and
  `recvmsg` (host bytes straight into the guest's rx buffers; also the fd channel),
  `sendto`/`recvfrom` (in COMMON), `shutdown` (half-close);
* polls its host sockets in its own epoll (`epoll_wait`, `epoll_ctl`, in COMMON).

No bind, no listen, no AF_INET/AF_INET6/AF_NETLINK socket, no open, no exec.
"""

from __future__ import annotations

from shared.seccomp import (
    AF_UNIX,
    COMMON,
    SOCK_CLOEXEC,
    SOCK_NONBLOCK,
    SOCK_STREAM,
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
    # TEMPORARY, until the supervisor brokers guest-initiated connects (UnixMuxer._guest_connect).
    allow(
        "socket",
        "a guest-initiated connection to <uds_path>_<port> (UnixMuxer._guest_connect); goes once the"
        " supervisor brokers the connect",
        arg_eq(0, AF_UNIX, "AF_UNIX"),
        arg_eq(1, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, "SOCK_STREAM|SOCK_NONBLOCK|SOCK_CLOEXEC"),
        arg_eq(2, 0, "protocol 0"),
    ),
    allow(
        "connect",
        "a guest-initiated connection to <uds_path>_<port>: the address is not visible to seccomp;"
        " goes once the supervisor brokers the connect",
    ),
)

POLICY: Filter = COMMON + VSOCK
