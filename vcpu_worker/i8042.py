"""The i8042 keyboard controller, only as far as a microVM needs it (as Firecracker).

Its jobs: let the guest reset the machine (command 0xFE on port 0x64 ends the microVM,
the way Linux's `reboot=k` restarts), answer the probes Linux's i8042 driver makes, and
deliver a Ctrl+Alt+Del key sequence (IRQ 1) so the API can ask the guest to shut down.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from vcpu_worker.port_state import SavedPort

DATA_PORT_OFFSET = 0  # 0x60
COMMAND_PORT_OFFSET = 4  # 0x64

SB_OUT_DATA_AVAIL = 0x01
SB_I8042_CMD_DATA = 0x08
SB_KBD_ENABLED = 0x10

CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_DISABLE_AUX = 0xA7
CMD_ENABLE_AUX = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_DISABLE_KBD = 0xAD
CMD_ENABLE_KBD = 0xAE
CMD_READ_OUTP = 0xD0
CMD_WRITE_OUTP = 0xD1
CMD_RESET_CPU = 0xFE

CTR_KBD_INT = 0x01
KBD_ACK = 0xFA
KBD_RESET_OK = 0xAA
BUFFER_SIZE = 16

# Set-2 scan codes Firecracker sends for Ctrl, Alt, Del (make codes).
CTRL_ALT_DEL = bytes([0x14, 0x11, 0xE0, 0x71])


class I8042:
    """Port 0x60/0x64 model; `on_reset` is called when the guest asks for a CPU reset."""

    def __init__(self, on_reset: Callable[[], None], raise_irq: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self._raise_irq = raise_irq
        self._lock = threading.Lock()
        self._buf: deque[int] = deque()
        self._status = SB_KBD_ENABLED
        self._ctr = CTR_KBD_INT
        self._outp = 0
        self._pending_cmd = 0
        self.metrics = {
            "read_count": 0,
            "write_count": 0,
            "reset_count": 0,
            "missed_read_count": 0,
            "missed_write_count": 0,
            "error_count": 0,
        }

    def save_state(self) -> dict[str, Any]:
        """What the guest's driver has set (control and output port, a command awaiting its
        data byte) and the bytes it has not read, for a snapshot."""
        with self._lock:
            return {
                "status": self._status,
                "ctr": self._ctr,
                "outp": self._outp,
                "pending_cmd": self._pending_cmd,
                "buf": bytes(self._buf),
            }

    def restore_state(self, state: Any) -> None:
        """Take a snapshot's state (`save_state`), each field cut to its width and the buffer
        to its size; ValueError for a state that is not a map."""
        saved = SavedPort(state, "i8042")
        with self._lock:
            self._status = saved.byte("status", self._status) & ~SB_OUT_DATA_AVAIL  # derived from the buffer
            self._ctr = saved.byte("ctr", self._ctr)
            self._outp = saved.byte("outp", 0)
            pending = saved.byte("pending_cmd", 0)
            self._pending_cmd = pending if pending in (CMD_WRITE_CTR, CMD_WRITE_OUTP) else 0
            self._buf = deque(saved.buffer("buf", BUFFER_SIZE))

    def read(self, offset: int) -> int:
        with self._lock:
            self.metrics["read_count"] += 1
            if offset == COMMAND_PORT_OFFSET:
                return self._status | (SB_OUT_DATA_AVAIL if self._buf else 0)
            if not self._buf:
                self.metrics["missed_read_count"] += 1
                return 0
            value = self._buf.popleft()
            more = bool(self._buf) and bool(self._ctr & CTR_KBD_INT)
        if more:
            self._raise_irq()
        return value

    def write(self, offset: int, value: int) -> None:
        reset = False
        with self._lock:
            self.metrics["write_count"] += 1
            if offset == COMMAND_PORT_OFFSET:
                reset = self._command(value)
            else:
                self._data(value)
        if reset:
            self.metrics["reset_count"] += 1
            self._on_reset()

    def send_ctrl_alt_del(self) -> None:
        """Queue the Ctrl+Alt+Del make codes and interrupt the guest."""
        with self._lock:
            if len(self._buf) + len(CTRL_ALT_DEL) > BUFFER_SIZE:
                self.metrics["error_count"] += 1
                return
            self._buf.extend(CTRL_ALT_DEL)
        self._raise_irq()

    def _push(self, value: int) -> None:
        if len(self._buf) < BUFFER_SIZE:
            self._buf.append(value)

    def _command(self, cmd: int) -> bool:
        self._status |= SB_I8042_CMD_DATA
        replies = {
            CMD_READ_CTR: self._ctr,
            CMD_READ_OUTP: self._outp,
            CMD_SELF_TEST: 0x55,
            CMD_KBD_TEST: 0x00,
            CMD_AUX_TEST: 0x00,
        }
        if cmd in replies:
            self._push(replies[cmd])
        elif cmd in (CMD_WRITE_CTR, CMD_WRITE_OUTP):
            self._pending_cmd = cmd
        elif cmd == CMD_RESET_CPU:
            return True
        elif cmd == CMD_DISABLE_KBD:
            self._status &= ~SB_KBD_ENABLED
        elif cmd == CMD_ENABLE_KBD:
            self._status |= SB_KBD_ENABLED
        elif cmd not in (CMD_DISABLE_AUX, CMD_ENABLE_AUX):
            self.metrics["missed_write_count"] += 1
        return False

    def _data(self, value: int) -> None:
        self._status &= ~SB_I8042_CMD_DATA
        if self._pending_cmd == CMD_WRITE_CTR:
            self._ctr = value
        elif self._pending_cmd == CMD_WRITE_OUTP:
            self._outp = value
        else:  # a command for the keyboard itself: acknowledge, and answer a reset
            self._push(KBD_ACK)
            if value == 0xFF:
                self._push(KBD_RESET_OK)
        self._pending_cmd = 0
