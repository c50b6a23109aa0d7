"""Dispatch of trapped port I/O accesses to the legacy devices of the vCPU worker.

A device is registered over an address range and receives the offset into it. An
access nobody claims is not an error for the guest (reads see all-ones, writes are
dropped, as on real hardware), but it is counted and reported, rate-limited. The
range lookup and that accounting are shared with the MMIO bus (`mmio_bus.py`).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


class BusDevice(Protocol):
    def read(self, offset: int) -> int: ...
    def write(self, offset: int, value: int) -> None: ...


class RangeMap(Generic[T]):
    """Non-overlapping [base, base+size) ranges, each with a device; lookup by address."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._bases: list[int] = []
        self._entries: list[tuple[int, int, T]] = []

    def add(self, base: int, size: int, device: T) -> None:
        i = bisect.bisect(self._bases, base)
        prev_end = self._entries[i - 1][0] + self._entries[i - 1][1] if i else 0
        if (i and prev_end > base) or (i < len(self._bases) and base + size > self._bases[i]):
            raise ValueError(f"{self._what} range {base:#x}+{size:#x} overlaps another device")
        self._entries.insert(i, (base, size, device))
        self._bases.insert(i, base)

    def find(self, addr: int, length: int = 1) -> tuple[int, T] | None:
        """(base, device) of the range holding all of [addr, addr+length), or None."""
        i = bisect.bisect(self._bases, addr) - 1
        if i >= 0:
            base, size, device = self._entries[i]
            if addr + length <= base + size:
                return base, device
        return None


class UnhandledAccesses:
    """Counts accesses no device claims and reports them at most once a second."""

    def __init__(self, what: str, report: Callable[[str], None] | None) -> None:
        self._what = what
        self._report = report
        self._lock = threading.Lock()
        self._last_report = 0.0
        self.reads = 0
        self.writes = 0

    def record(self, kind: str, addr: int, size: int) -> None:
        with self._lock:
            if kind == "read":
                self.reads += 1
            else:
                self.writes += 1
            now = time.monotonic()
            if self._report is None or now - self._last_report < 1.0:
                return
            self._last_report = now
        self._report(f"unhandled {self._what} {kind} at {addr:#x} ({size} bytes)")


class Bus:
    """Address ranges → devices, byte-wide (legacy port devices are 8-bit)."""

    def __init__(self, name: str, report: Callable[[str], None] | None = None) -> None:
        self.name = name
        self._ranges: RangeMap[BusDevice] = RangeMap(name)
        self.unhandled = UnhandledAccesses(name, report)

    def add(self, base: int, size: int, device: BusDevice) -> None:
        self._ranges.add(base, size, device)

    def read(self, addr: int, size: int) -> bytes:
        """Read `size` bytes at `addr`, one byte-wide device access per byte."""
        out = bytearray()
        for a in range(addr, addr + size):
            found = self._ranges.find(a)
            if found is None:
                self.unhandled.record("read", addr, size)
                return b"\xff" * size
            base, device = found
            out.append(device.read(a - base) & 0xFF)
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        for i, byte in enumerate(data):
            found = self._ranges.find(addr + i)
            if found is None:
                self.unhandled.record("write", addr, len(data))
                return
            base, device = found
            device.write(addr + i - base, byte)
