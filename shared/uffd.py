"""userfaultfd for lazily restored guest memory (docs/snapshots.md, "Memory").

A restored microVM's guest memory is a new, empty memfd. Every worker that maps it (the
vCPU worker and each device worker) registers its mapping with a userfaultfd of its own
(`register_mapping`), made from the /dev/userfaultfd fd the supervisor hands it (so it
needs no privilege, and kernel-mode faults — KVM's, a block worker's preadv — are
caught too), and sends that userfaultfd to the supervisor over its fd channel
(`LazyMemory`). The supervisor's page server (controlplane.page_server) answers each
missing-page fault with UFFDIO_COPY from the memory file. UFFDIO_COPY fills the memfd's
page cache, which every mapping of the memfd shares: a page is loaded once, by whichever
process touches it first, and is then the same page in all of them. UFFDIO_COPY never
overwrites a page that exists (EEXIST), so a page the guest or a device has since written
is never replaced by the snapshot's.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct

UFFD_API = 0xAA
USERFAULTFD_IOC_NEW = 0xAA00
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01
UFFDIO_WAKE = 0x8010AA02
UFFDIO_COPY = 0xC028AA03
UFFDIO_ZEROPAGE = 0xC020AA04
UFFDIO_REGISTER_MODE_MISSING = 1
UFFD_EVENT_PAGEFAULT = 0x12
MSG = struct.Struct("<B7xQQQ")  # struct uffd_msg: event, then pagefault {flags, address, ptid}
MSG_SIZE = 32
DEV_USERFAULTFD = "/dev/userfaultfd"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


def ioctl(fd: int, request: int, arg: bytearray | int) -> int:
    """An ioctl on a uffd: OSError with errno on failure (EEXIST, EAGAIN are meaningful here)."""
    if isinstance(arg, int):
        ret = _libc.ioctl(fd, request, ctypes.c_void_p(arg))
    else:
        buf = (ctypes.c_char * len(arg)).from_buffer(arg)
        ret = _libc.ioctl(fd, request, ctypes.addressof(buf))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def open_device() -> int:
    """The supervisor's /dev/userfaultfd (root only, like /dev/kvm), for the workers."""
    return os.open(DEV_USERFAULTFD, os.O_RDWR | os.O_CLOEXEC)


def register_mapping(device_fd: int, address: int, length: int) -> int:
    """A new userfaultfd for this process, handling missing pages of [address, +length)."""
    uffd = ioctl(device_fd, USERFAULTFD_IOC_NEW, os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        ioctl(uffd, UFFDIO_API, bytearray(struct.pack("<QQQ", UFFD_API, 0, 0)))
        ioctl(uffd, UFFDIO_REGISTER, bytearray(struct.pack("<QQQQ", address, length, UFFDIO_REGISTER_MODE_MISSING, 0)))
    except BaseException:
        os.close(uffd)
        raise
    return uffd


def copy(uffd: int, dst: int, src: int, length: int) -> None:
    """UFFDIO_COPY `length` bytes from our address `src` to the faulting process's `dst`."""
    ioctl(uffd, UFFDIO_COPY, bytearray(struct.pack("<QQQQq", dst, src, length, 0, 0)))


def zeropage(uffd: int, dst: int, length: int) -> None:
    ioctl(uffd, UFFDIO_ZEROPAGE, bytearray(struct.pack("<QQQq", dst, length, 0, 0)))


def wake(uffd: int, dst: int, length: int) -> None:
    ioctl(uffd, UFFDIO_WAKE, bytearray(struct.pack("<QQ", dst, length)))


def unregister(uffd: int, address: int, length: int) -> None:
    ioctl(uffd, UFFDIO_UNREGISTER, bytearray(struct.pack("<QQ", address, length)))


def set_nonblocking(fd: int) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)


def hand_over_mapping(device_fd: int, address: int, length: int, channel_fd: int) -> None:
    """Worker side: register our mapping of guest memory and send the userfaultfd to the
    supervisor's page server on our fd channel (before anything touches guest memory);
    /dev/userfaultfd is closed: a worker keeps no handle to make more."""
    import socket

    from shared import fdpass
    from shared import protocol as p

    try:
        fd = register_mapping(device_fd, address, length)
    finally:
        os.close(device_fd)
    channel = socket.socket(fileno=os.dup(channel_fd))
    try:
        channel.setblocking(True)
        fdpass.send_message(channel, p.LazyMemory(address), [fd])
    finally:
        channel.close()
        os.close(fd)
