"""TAP devices: the supervisor opens one by name, the worker sets its offloads.

`open_tap` runs in the supervisor (workers open no host path): /dev/net/tun, TUNSETIFF
with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR on an *existing* interface (a missing one is an
error, not silently created), TUNSETVNETHDRSZ 12 (the virtio 1.0 header, `num_buffers`
included, so guest buffers and TAP frames share one layout), non-blocking. A TAP another
process holds answers EBUSY. `set_offload` (TUNSETOFFLOAD) runs in the worker when the
guest has negotiated its features, mirroring them as Firecracker does.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_UFO = 0x01, 0x02, 0x04, 0x10
VNET_HDR_SIZE = 12
IFNAMSIZ = 16


class TapError(Exception):
    """The TAP cannot be used; the message names it and says why."""


def open_tap(name: str) -> int:
    """An fd on the existing TAP `name`, attached with a virtio-net header."""
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name:
        raise TapError(f"invalid host device name {name!r}")
    try:
        socket.if_nametoindex(name)
    except OSError:
        raise TapError(f"host device {name} does not exist (create it first: ip tuntap add {name} mode tap)") from None
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        try:
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as e:
            if e.errno == 16:  # EBUSY
                raise TapError(f"host device {name} is busy (another process holds it)") from None
            if e.errno == 22:  # EINVAL: not a TAP (a TUN, or multi-queue)
                raise TapError(f"host device {name} is not a single-queue TAP device") from None
            raise TapError(f"cannot attach host device {name}: {e.strerror}") from None
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
    except BaseException:
        os.close(fd)
        raise
    return fd


def set_offload(fd: int, flags: int) -> int:
    """TUNSETOFFLOAD `flags`; a kernel without UFO support gets them without TUN_F_UFO."""
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
    except OSError:
        if not flags & TUN_F_UFO:
            raise
        flags &= ~TUN_F_UFO
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
    return flags
