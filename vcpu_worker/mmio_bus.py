"""Dispatch of trapped MMIO accesses, whole: one device call per guest access.

Unlike the byte-wide port bus (`bus.py`), a virtio-mmio register access must reach the
device as the guest made it (a 4-byte read of Status is one access, not four), so the
device gets (offset, size) and answers or takes a little-endian integer. An access no
device claims reads all-ones and is dropped on write, as on real hardware; it is counted
and reported, rate-limited.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class MmioDevice(Protocol):
    def read(self, offset: int, size: int) -> int: ...
    def write(self, offset: int, size: int, value: int) -> None: ...


@dataclass(frozen=True)
class _Window:
    base: int
    size: int
    device: MmioDevice


class MmioBus:
    """Guest-physical windows -> devices; safe to call from every vCPU thread."""

    def __init__(self, report: Callable[[str], None] | None = None) -> None:
        self._windows: list[_Window] = []
        self._bases: list[int] = []
        self._report = report
        self._lock = threading.Lock()
        self._last_report = 0.0
        self.unhandled_reads = 0
        self.unhandled_writes = 0

    def add(self, base: int, size: int, device: MmioDevice) -> None:
        i = bisect.bisect(self._bases, base)
        prev = self._windows[i - 1] if i else None
        if (prev and prev.base + prev.size > base) or (i < len(self._bases) and base + size > self._bases[i]):
            raise ValueError(f"MMIO window {base:#x}+{size:#x} overlaps another device")
        self._windows.insert(i, _Window(base, size, device))
        self._bases.insert(i, base)

    def _find(self, addr: int, size: int) -> _Window | None:
        i = bisect.bisect(self._bases, addr) - 1
        if i >= 0 and addr + size <= self._windows[i].base + self._windows[i].size:
            return self._windows[i]
        return None

    def read(self, addr: int, size: int) -> bytes:
        window = self._find(addr, size)
        if window is None:
            self._unhandled("read", addr, size)
            return b"\xff" * size
        value = window.device.read(addr - window.base, size)
        return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def write(self, addr: int, data: bytes) -> None:
        window = self._find(addr, len(data))
        if window is None:
            self._unhandled("write", addr, len(data))
            return
        window.device.write(addr - window.base, len(data), int.from_bytes(data, "little"))

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
        self._report(f"unhandled MMIO {kind} at {addr:#x} ({size} bytes)")
