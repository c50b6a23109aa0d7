"""Dispatch of trapped MMIO accesses, whole: one device call per guest access.

Unlike the byte-wide port bus (`bus.py`), a virtio-mmio register access must reach the
device as the guest made it (a 4-byte read of Status is one access, not four), so the
device gets (offset, size) and answers or takes a little-endian integer. An access no
device claims reads all-ones and is dropped on write, as on real hardware; it is counted
and reported, rate-limited.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from vcpu_worker.bus import RangeMap, UnhandledAccesses


class MmioDevice(Protocol):
    def read(self, offset: int, size: int) -> int: ...
    def write(self, offset: int, size: int, value: int) -> None: ...


class MmioBus:
    """Guest-physical windows -> devices; safe to call from every vCPU thread."""

    def __init__(self, report: Callable[[str], None] | None = None) -> None:
        self._windows: RangeMap[MmioDevice] = RangeMap("MMIO window")
        self.unhandled = UnhandledAccesses("MMIO", report)

    def add(self, base: int, size: int, device: MmioDevice) -> None:
        self._windows.add(base, size, device)

    def read(self, addr: int, size: int) -> bytes:
        found = self._windows.find(addr, size)
        if found is None:
            self.unhandled.record("read", addr, size)
            return b"\xff" * size
        base, device = found
        value = device.read(addr - base, size)
        return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def write(self, addr: int, data: bytes) -> None:
        found = self._windows.find(addr, len(data))
        if found is None:
            self.unhandled.record("write", addr, len(data))
            return
        base, device = found
        device.write(addr - base, len(data), int.from_bytes(data, "little"))
