"""Firecracker's boot timer (`--boot-timer`): an MMIO window the guest's init writes 123 to
when it has booted; the time since InstanceStart is logged.

Firecracker's line is `Guest-boot-time = <us> us <ms> ms, <cpu us> CPU us <cpu ms> CPU ms`.
Its CPU time is the Firecracker process's; here it is the vCPU worker's (the process that
runs the guest, forked for this microVM, so its CPU clock starts near zero).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from shared import layout

MAGIC_VALUE_SIGNAL_GUEST_BOOT_COMPLETE = 123


class BootTimer:
    """An MmioDevice: a 1-byte write of 123 at offset 0 logs the boot time; reads are zero."""

    size = layout.VIRTIO_MMIO_SIZE

    def __init__(self, start_ns: int, log: Callable[[str], None]) -> None:
        self.start_ns = start_ns
        self.log = log

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 1 or offset != 0 or value != MAGIC_VALUE_SIGNAL_GUEST_BOOT_COMPLETE:
            return
        boot_us = max(0, time.monotonic_ns() - self.start_ns) // 1000
        cpu_us = time.process_time_ns() // 1000
        self.log(f"Guest-boot-time = {boot_us:>6} us {boot_us // 1000} ms, {cpu_us:>6} CPU us {cpu_us // 1000} CPU ms")
