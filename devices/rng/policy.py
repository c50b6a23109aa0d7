"""The entropy worker's seccomp policy: COMMON (CPython, glibc, ZeroMQ) plus getrandom(2).

Everything else was set up before the filter (guest memory mapped, eventfds and the ZeroMQ
connection held). Afterwards the worker only asks the host kernel for random bytes and
copies them into guest buffers: no open (so no /dev/urandom), no socket, no exec, no ioctl.
"""

from __future__ import annotations

from shared.seccomp import COMMON, Filter, allow, arg_eq, policy

ENTROPY = policy(
    allow("getrandom", "GetrandomSource.fill: os.getrandom(n, 0), never GRND_RANDOM", arg_eq(2, 0, "flags == 0")),
    allow("recvmsg", "the fd channel: the supervisor closing it ends the worker (fdpass)"),
)

POLICY: Filter = COMMON + ENTROPY
