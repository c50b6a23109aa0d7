"""Where a net device's frames come from and go to: the `NetBackend` interface and the TAP.

`TapBackend` is the TAP fd the supervisor opened (`devices/net/tap.py`: `open_tap` runs in
the supervisor, which opens every host path): one frame per readv/writev, straight between
the TAP and views of guest memory, each with its 12-byte virtio-net header. Unit tests give
the device a fake with the same methods (`FakeTap` in tests/unit/net/test_device.py).
"""

from __future__ import annotations

import os
from typing import Protocol

from devices.net import tap


class NetBackend(Protocol):
    def readv(self, buffers: list[memoryview]) -> int:
        """One frame (with its virtio-net header) into `buffers`; BlockingIOError when none."""

    def writev(self, buffers: list[memoryview]) -> int:
        """One frame (with its virtio-net header) from `buffers`."""

    def set_offload(self, flags: int) -> None: ...


class TapBackend:
    """The TAP fd the supervisor opened (non-blocking, IFF_VNET_HDR, header size 12)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def readv(self, buffers: list[memoryview]) -> int:
        return os.readv(self.fd, buffers)

    def writev(self, buffers: list[memoryview]) -> int:
        return os.writev(self.fd, buffers)

    def set_offload(self, flags: int) -> None:
        tap.set_offload(self.fd, flags)

    def close(self) -> None:
        os.close(self.fd)
