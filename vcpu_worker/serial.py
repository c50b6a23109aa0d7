"""An 8250/16550A UART (COM1 at 0x3f8, IRQ 4): the guest's serial console.

Output bytes go to a sink (the console socket to the supervisor); input bytes are
queued by `enqueue_input` and read by the guest through RBR. The receive FIFO is the
only input buffer and is bounded: the host offers no more than `rx_room()` and is told
through `on_rx_room` when a full FIFO has room again. Interrupts are edges on
the IRQ line: received-data-available and transmitter-holding-register-empty (THRE),
the latter raised whenever the guest enables it or writes a byte, so that Linux's
interrupt-driven console keeps flowing.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from vcpu_worker.port_state import SavedPort

DATA, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)

IER_RDA = 0x01
IER_THRE = 0x02
IIR_NONE = 0x01
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_FIFO_BITS = 0xC0
LCR_DLAB = 0x80
LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40
MCR_LOOP = 0x10
MSR_DEFAULT = 0xB0  # DCD | DSR | CTS
RX_FIFO_SIZE = 64


class Serial8250:
    """Register-level UART model; every method is safe to call from any thread."""

    def __init__(
        self,
        output: Callable[[bytes], None],
        raise_irq: Callable[[], None],
        on_rx_room: Callable[[], None] | None = None,
    ) -> None:
        self._output = output
        self._raise_irq = raise_irq
        self._on_rx_room = on_rx_room  # a full receive FIFO has room again (the guest read it)
        self._lock = threading.Lock()
        self._rx: deque[int] = deque()
        self.ier = 0
        self.lcr = 0x03
        self.mcr = 0x08
        self.scr = 0
        self.dll = 0x0C
        self.dlm = 0
        self._thre_pending = False
        self.metrics = {
            "read_count": 0,
            "write_count": 0,
            "missed_read_count": 0,
            "missed_write_count": 0,
            "error_count": 0,
            "flush_count": 0,
        }

    def save_state(self) -> dict[str, Any]:
        """The registers a guest driver has set, for a snapshot (the vCPUs are paused). Linux
        caches IER: a restored UART with THRE interrupts off would never finish its output."""
        with self._lock:
            return {
                "ier": self.ier,
                "lcr": self.lcr,
                "mcr": self.mcr,
                "scr": self.scr,
                "dll": self.dll,
                "dlm": self.dlm,
                "thre_pending": self._thre_pending,
                "rx": bytes(self._rx),
            }

    def restore_state(self, state: Any) -> None:
        """Take a snapshot's registers (`save_state`); the file is checksummed but not trusted:
        every register is cut to its width and the receive FIFO to its size. ValueError for a
        state that is not a map."""
        saved = SavedPort(state, "serial port")
        with self._lock:
            self.ier = saved.byte("ier", 0) & 0x0F
            self.lcr = saved.byte("lcr", self.lcr)
            self.mcr = saved.byte("mcr", self.mcr)
            self.scr = saved.byte("scr", 0)
            self.dll = saved.byte("dll", self.dll)
            self.dlm = saved.byte("dlm", 0)
            self._thre_pending = saved.flag("thre_pending")
            self._rx = deque(saved.buffer("rx", RX_FIFO_SIZE))

    def rx_room(self) -> int:
        """How many input bytes the receive FIFO can take now."""
        with self._lock:
            return RX_FIFO_SIZE - len(self._rx)

    def enqueue_input(self, data: bytes) -> int:
        """Queue host input for the guest; returns how many bytes were taken."""
        with self._lock:
            taken = min(len(data), RX_FIFO_SIZE - len(self._rx))
            self._rx.extend(data[:taken])
            irq = taken > 0 and bool(self.ier & IER_RDA)
        if irq:
            self._raise_irq()
        return taken

    def read(self, offset: int) -> int:
        with self._lock:
            was_full = len(self._rx) >= RX_FIFO_SIZE
            value, irq = self._read_locked(offset)
            freed = was_full and len(self._rx) < RX_FIFO_SIZE
        if irq:
            self._raise_irq()
        if freed and self._on_rx_room is not None:
            self._on_rx_room()
        return value

    def write(self, offset: int, value: int) -> None:
        out = None
        with self._lock:
            was_full = len(self._rx) >= RX_FIFO_SIZE
            irq, out = self._write_locked(offset, value & 0xFF)
            freed = was_full and len(self._rx) < RX_FIFO_SIZE
        if out is not None:
            self._output(out)
        if irq:
            self._raise_irq()
        if freed and self._on_rx_room is not None:
            self._on_rx_room()

    def _iir(self) -> int:
        if self.ier & IER_RDA and self._rx:
            return IIR_FIFO_BITS | IIR_RDA
        if self.ier & IER_THRE and self._thre_pending:
            return IIR_FIFO_BITS | IIR_THRE
        return IIR_FIFO_BITS | IIR_NONE

    def _read_locked(self, offset: int) -> tuple[int, bool]:
        if offset == DATA:
            if self.lcr & LCR_DLAB:
                return self.dll, False
            if not self._rx:
                self.metrics["missed_read_count"] += 1
                return 0, False
            self.metrics["read_count"] += 1
            value = self._rx.popleft()
            return value, bool(self._rx) and bool(self.ier & IER_RDA)
        if offset == IER:
            return (self.dlm if self.lcr & LCR_DLAB else self.ier), False
        if offset == IIR_FCR:
            iir = self._iir()
            if iir & 0x0F == IIR_THRE:
                self._thre_pending = False  # reading IIR clears a THRE interrupt
            return iir, False
        if offset == LCR:
            return self.lcr, False
        if offset == MCR:
            return self.mcr, False
        if offset == LSR:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0), False
        if offset == MSR:
            return self._msr(), False
        return self.scr, False

    def _msr(self) -> int:
        if not self.mcr & MCR_LOOP:
            return MSR_DEFAULT
        # Loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD (Linux's UART detection checks this).
        m = self.mcr
        return ((m & 0x01) << 5) | ((m & 0x02) << 3) | ((m & 0x04) << 4) | ((m & 0x08) << 4)

    def _write_locked(self, offset: int, value: int) -> tuple[bool, bytes | None]:
        if offset == DATA:
            if self.lcr & LCR_DLAB:
                self.dll = value
                return False, None
            if self.mcr & MCR_LOOP:
                if len(self._rx) < RX_FIFO_SIZE:
                    self._rx.append(value)
                return bool(self.ier & IER_RDA), None
            self.metrics["write_count"] += 1
            self._thre_pending = True
            return bool(self.ier & IER_THRE), bytes([value])
        if offset == IER:
            if self.lcr & LCR_DLAB:
                self.dlm = value
                return False, None
            enabling_thre = bool(value & IER_THRE) and not self.ier & IER_THRE
            self.ier = value & 0x0F
            if enabling_thre:
                self._thre_pending = True
            return enabling_thre or bool(self.ier & IER_RDA and self._rx), None
        if offset == IIR_FCR:
            if value & 0x02:  # clear receive FIFO
                self._rx.clear()
            return False, None
        if offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value
        elif offset == SCR:
            self.scr = value
        else:
            self.metrics["missed_write_count"] += 1
        return False, None
