"""One thread per vCPU: KVM_RUN, then dispatch the exit.

A vCPU leaves KVM_RUN to be paused or stopped when it is "kicked": `immediate_exit`
is set in its kvm_run page (so a KVM_RUN about to start returns at once) and a signal
is sent to its thread (so a KVM_RUN in progress returns EINTR).
"""

from __future__ import annotations

import ctypes
import signal
import threading
import traceback
from collections.abc import Callable

from shared import exitcodes
from shared import kvm_abi as abi
from shared.kvm import Vcpu
from shared.startup_trace import mark
from vcpu_worker.bus import Bus
from vcpu_worker.mmio_bus import MmioBus

KICK_SIGNAL = signal.SIGUSR1

ExitCallback = Callable[[int, str, str], None]


def install_kick_handler() -> None:
    """A no-op handler, installed from the main thread, so the kick signal only interrupts."""
    signal.signal(KICK_SIGNAL, lambda *_: None)


def describe_registers(vcpu: Vcpu) -> str:
    """A one-paragraph register dump for reports of guest failures."""
    try:
        r, s = vcpu.get_regs(), vcpu.get_sregs()
    except Exception as e:  # the report must not fail because the vCPU is broken
        return f"(registers unavailable: {e})"
    gp = " ".join(f"{name}={getattr(r, name):#x}" for name, *_ in abi.kvm_regs._fields_)
    sr = " ".join(f"{name}={getattr(s, name):#x}" for name in ("cr0", "cr2", "cr3", "cr4", "efer"))
    return f"vCPU {vcpu.id}: {gp} {sr} cs={s.cs.selector:#x} ss={s.ss.selector:#x}"


class VcpuThread:
    """Runs one vCPU until stopped; reports a guest exit through `on_exit`."""

    def __init__(self, vcpu: Vcpu, pio: Bus, mmio: MmioBus, on_exit: ExitCallback) -> None:
        self.vcpu = vcpu
        self._pio = pio
        self._mmio = mmio
        self._on_exit = on_exit
        self._cond = threading.Condition()
        self._paused = False
        self._stopping = False
        self._parked = False
        self._thread = threading.Thread(target=self._main, name=f"vcpu{vcpu.id}", daemon=True)
        self.metrics = {
            "exit_io_in": 0,
            "exit_io_out": 0,
            "exit_mmio_read": 0,
            "exit_mmio_write": 0,
            "failures": 0,
        }

    def start(self) -> None:
        self._thread.start()

    def hold_at_start(self) -> None:
        """Park the thread before its first KVM_RUN (a snapshot loaded without resume_vm)."""
        with self._cond:
            self._paused = True

    def pause(self) -> None:
        """Stop running guest code; returns once the vCPU is out of KVM_RUN."""
        with self._cond:
            self._paused = True
        self._kick()
        with self._cond:
            self._cond.wait_for(lambda: self._parked or not self._thread.is_alive(), timeout=5)

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self.vcpu.run.immediate_exit = 0
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._kick()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _kick(self) -> None:
        self.vcpu.run.immediate_exit = 1
        ident = self._thread.ident
        if ident is not None and self._thread.is_alive() and self._thread is not threading.current_thread():
            signal.pthread_kill(ident, KICK_SIGNAL)

    def _wait_while_paused(self) -> bool:
        """Park while paused; False when the thread should end."""
        with self._cond:
            if self._paused and not self._stopping:
                self._parked = True
                self._cond.notify_all()
                self._cond.wait_for(lambda: not self._paused or self._stopping)
                self._parked = False
            if not self._stopping:
                self.vcpu.run.immediate_exit = 0
            return not self._stopping

    def _main(self) -> None:
        first = True
        try:
            while self._wait_while_paused():
                if first:  # (a vCPU held at start marks when it is released)
                    mark(f"vcpu {self.vcpu.id}: first KVM_RUN")
                    first = False
                reason = self.vcpu.run_once()
                if not self._handle_exit(reason):
                    return
        except Exception:
            self.metrics["failures"] += 1
            self._on_exit(exitcodes.UNEXPECTED_ERROR, f"vCPU {self.vcpu.id} failed", traceback.format_exc())

    def _handle_exit(self, reason: int) -> bool:
        """Handle one VM exit; False when this vCPU must stop running."""
        run = self.vcpu.run
        if reason == abi.KVM_EXIT_IO:
            self._handle_io(run)
        elif reason == abi.KVM_EXIT_MMIO:
            self._handle_mmio(run)
        elif reason in (abi.KVM_EXIT_INTR, abi.KVM_EXIT_HLT):
            pass
        elif reason == abi.KVM_EXIT_SHUTDOWN:
            self._on_exit(
                exitcodes.GENERIC_ERROR,
                "guest triple-faulted (KVM_EXIT_SHUTDOWN)",
                describe_registers(self.vcpu),
            )
            return False
        elif reason == abi.KVM_EXIT_SYSTEM_EVENT:
            kind = run.exit.system_event.type
            if kind in (abi.KVM_SYSTEM_EVENT_SHUTDOWN, abi.KVM_SYSTEM_EVENT_RESET):
                self._on_exit(exitcodes.OK, "guest requested shutdown (system event)", "")
            else:
                self._on_exit(exitcodes.GENERIC_ERROR, f"guest system event {kind}", describe_registers(self.vcpu))
            return False
        else:
            self.metrics["failures"] += 1
            name = abi.EXIT_REASON_NAMES.get(reason, str(reason))
            detail = describe_registers(self.vcpu)
            if reason == abi.KVM_EXIT_INTERNAL_ERROR:
                detail = f"suberror {run.exit.internal.suberror}; {detail}"
            self._on_exit(exitcodes.GENERIC_ERROR, f"unhandled VM exit KVM_EXIT_{name} on vCPU {self.vcpu.id}", detail)
            return False
        return True

    def _handle_io(self, run: abi.kvm_run) -> None:
        io = run.exit.io
        page = self.vcpu.run_page
        size, count, offset = io.size, io.count, io.data_offset
        if offset + size * count > len(page):
            raise RuntimeError("KVM gave an I/O data offset outside the kvm_run page")
        for i in range(count):
            at = offset + i * size
            if io.direction == abi.KVM_EXIT_IO_OUT:
                self.metrics["exit_io_out"] += 1
                self._pio.write(io.port, bytes(page[at : at + size]))
            else:
                self.metrics["exit_io_in"] += 1
                page[at : at + size] = self._pio.read(io.port, size)

    def _handle_mmio(self, run: abi.kvm_run) -> None:
        mmio = run.exit.mmio
        length = min(mmio.len, 8)
        if mmio.is_write:
            self.metrics["exit_mmio_write"] += 1
            self._mmio.write(mmio.phys_addr, bytes(mmio.data[:length]))
        else:
            self.metrics["exit_mmio_read"] += 1
            data = self._mmio.read(mmio.phys_addr, length)
            ctypes.memmove(mmio.data, data, length)
