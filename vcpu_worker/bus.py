"""Dispatch of trapped port I/O and MMIO accesses to the devices of the vCPU worker.

A device is registered over an address range and receives the offset into it. An
access nobody claims is not an error for the guest (reads see all-ones, writes are
dropped, as on real hardware), but it is counted and reported, rate-limited.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class BusDevice(Protocol):
    def read(self, offset: int) -> int: ...
    def write(self, offset: int, value: int) -> None: ...


@dataclass(frozen=True)
class _Range:
    base: int
    size: int
    device: BusDevice


class Bus:
    """Address ranges → devices, byte-wide (legacy port devices are 8-bit)."""

    def __init__(self, name: str, report: Callable[[str], None] | None = None) -> None:
        self.name = name
        self._ranges: list[_Range] = []
        self._bases: list[int] = []
        self._report = report
        self._lock = threading.Lock()
        self._last_report = 0.0
        self.unhandled_reads = 0
        self.unhandled_writes = 0

    def add(self, base: int, size: int, device: BusDevice) -> None:
        i = bisect.bisect(self._bases, base)
        prev_end = self._ranges[i - 1].base + self._ranges[i - 1].size if i else 0
        if (i and prev_end > base) or (i < len(self._bases) and base + size > self._bases[i]):
            raise ValueError(f"{self.name} range {base:#x}+{size:#x} overlaps another device")
        self._ranges.insert(i, _Range(base, size, device))
        self._bases.insert(i, base)

    def _find(self, addr: int) -> _Range | None:
        i = bisect.bisect(self._bases, addr) - 1
        if i >= 0 and addr < self._ranges[i].base + self._ranges[i].size:
            return self._ranges[i]
        return None

    def read(self, addr: int, size: int) -> bytes:
        """Read `size` bytes at `addr`, one byte-wide device access per byte."""
        out = bytearray()
        for a in range(addr, addr + size):
            r = self._find(a)
            if r is None:
                self._unhandled("read", addr, size)
                return b"\xff" * size
            out.append(r.device.read(a - r.base) & 0xFF)
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        for i, byte in enumerate(data):
            r = self._find(addr + i)
            if r is None:
                self._unhandled("write", addr, len(data))
                return
            r.device.write(addr + i - r.base, byte)

    def _unhandled(self, kind: str, addr: int, size: int) -> None:
        with self._lock:
            if kind == "read":
                self.unhandled_reads += 1
            else:
                self.unhandled_writes += 1
            now = time.monotonic()
            if self._report is None or now - self._last_report < 1.0:
                return
            self._last_report = now
        self._report(f"unhandled {self.name} {kind} at {addr:#x} ({size} bytes)")
