"""The balloon worker's seccomp policy: COMMON (CPython, glibc, ZeroMQ) plus hole punching.

Guest memory was mapped and the ZeroMQ connection made before the filter. Afterwards the
worker gives pages back with fallocate(memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
...) and nothing else: the rule pins the fd to the guest-memory memfd's number in this
worker (known only at spawn, so the policy is built per worker: `balloon_policy`) and the
mode to exactly PUNCH_HOLE | KEEP_SIZE. No other fallocate mode (no allocation, no
COLLAPSE/INSERT_RANGE, no ZERO_RANGE), no ftruncate, no open, no socket, no exec.
"""

from __future__ import annotations

from devices.balloon.backend import PUNCH_HOLE_MODE
from shared.seccomp import COMMON, Filter, allow, arg_eq, policy

EXAMPLE_MEMFD = 3  # the documentation form's fd (docs/seccomp.md); a worker uses its own


def balloon_rules(memfd: int) -> Filter:
    return policy(
        allow(
            "fallocate",
            "MemfdPunchHole.discard: release inflated and reported pages from guest memory",
            arg_eq(0, memfd, "fd == the guest-memory memfd"),
            arg_eq(1, PUNCH_HOLE_MODE, "mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE"),
        ),
        allow("recvmsg", "the fd channel: the supervisor closing it ends the worker (fdpass)"),
    )


def balloon_policy(memfd: int) -> Filter:
    """The filter of a balloon worker whose guest-memory memfd is `memfd`."""
    return COMMON + balloon_rules(memfd)


POLICY: Filter = balloon_policy(EXAMPLE_MEMFD)
