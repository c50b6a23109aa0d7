"""TAP devices: the supervisor opens one by name, the worker sets its offloads.

`open_tap` runs in the supervisor (workers open no host path) when PUT /network-interfaces
configures the interface, as Firecracker's `Tap::open_named` does: /dev/net/tun, TUNSETIFF
with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (as root on a missing name the kernel creates the
TAP; an unprivileged process gets the kernel's EPERM), TUNSETVNETHDRSZ 12 (the virtio 1.0
header, `num_buffers` included, so guest buffers and TAP frames share one layout),
non-blocking. A TAP another process holds answers EBUSY. Error texts are Firecracker's
`TapError`/`NetError` ones, so a client matching on them keeps working. `set_offload`
(TUNSETOFFLOAD) runs in the worker when the guest has negotiated its features, mirroring
them as Firecracker does.
"""

from __future__ import annotations

import fcntl
import os
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
    """An fd on the TAP `name` (created by the kernel if missing and we may), with a virtio-net header."""
    if len(name.encode()) >= IFNAMSIZ:
        raise TapError("Open tap device failed: Invalid interface name")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise TapError(f"Open tap device failed: Couldn't open /dev/net/tun: {_io_error(e)}") from None
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        try:
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as e:
            raise TapError(
                f"Open tap device failed: Error while creating ifreq structure: {_io_error(e)}. Invalid TUN/TAP "
                f"Backend provided by {name}. Check our documentation on setting up the network devices."
            ) from None
        try:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
        except OSError as e:
            raise TapError(
                f"Setting vnet header size failed: Error while setting size of the vnet header: {_io_error(e)}"
            ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _io_error(err: OSError) -> str:
    """An OSError as Rust's io::Error displays it."""
    return f"{err.strerror} (os error {err.errno})"


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
