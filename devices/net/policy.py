"""The net worker's seccomp policy: COMMON (CPython, glibc, ZeroMQ) plus the TAP I/O.

The worker mapped guest memory and got its TAP, eventfds and fd channel before its filter
was loaded; afterwards it moves frames between the TAP it holds and guest memory (readv,
writev), sets the TAP's offloads when the guest negotiates features (ioctl TUNSETOFFLOAD,
no other request: TUNSETIFF, TUNSETVNETHDRSZ and the rest stay with set-up), and answers
MMDS itself: no socket at all (its ZeroMQ control connection is made before the filter),
no open, no exec, no fork.
"""

from __future__ import annotations

from devices.net.tap import TUNSETOFFLOAD
from shared.seccomp import COMMON, Filter, allow, ioctl_request, policy

NET = policy(
    allow("readv", "RX: a frame from the TAP straight into guest buffers (os.readv)"),
    allow("writev", "TX: a frame from guest buffers to the TAP (os.writev)"),
    allow(
        "ioctl", "the guest's offloads mirrored on the TAP (set_offload)", ioctl_request(TUNSETOFFLOAD, "TUNSETOFFLOAD")
    ),
    allow("recvmsg", "the fd channel (fdpass): the supervisor closing it stops the worker"),
)

POLICY: Filter = COMMON + NET
