"""The vsock worker's seccomp policy: COMMON (CPython, glibc, ZeroMQ) plus its AF_UNIX traffic.

Everything host-side was set up before the filter: the listening socket at `uds_path` was
created, bound and put into listen by the supervisor and handed over as an fd; the
muxer's epoll instance exists. Afterwards the worker

* accepts host connections on that listener: `accept4` with SOCK_CLOEXEC, already in
  DEVICE_COMMON (the same rule lets libzmq accept vCPU threads);
* connects to `<uds_path>_<port>` for a guest-initiated connection: `socket` (AF_UNIX
  only) and `connect`, both already in COMMON for ZeroMQ's ipc:// endpoints. seccomp
  cannot look at the address a pointer argument points to, so the path is not enforced
  by the filter: the worker's code builds the only path it ever connects to, and the
  jailer's chroot limits which sockets exist at all. AF_INET/AF_INET6/AF_NETLINK sockets,
  bind, listen, open and exec stay forbidden;
* moves stream bytes: `sendmsg` (guest payload straight from guest memory) and
  `recvmsg` (host bytes straight into the guest's rx buffers; also the fd channel),
  `sendto`/`recvfrom` (in COMMON), `shutdown` (half-close);
* polls its host sockets in its own epoll (`epoll_wait`, `epoll_ctl`, in COMMON).
"""

from __future__ import annotations

from shared.seccomp import COMMON, DEVICE_COMMON, Filter, allow, policy

VSOCK = policy(
    allow("sendmsg", "guest -> host stream bytes, sent from guest memory (Connection.on_rw)"),
    allow("recvmsg", "host -> guest stream bytes, read into rx buffers (Connection._read_into); the fd channel"),
    allow("shutdown", "half-close: SHUT_WR on the host socket after the guest's SHUTDOWN(SEND)"),
)

POLICY: Filter = COMMON + DEVICE_COMMON + VSOCK
