"""Supervisor side of a running microVM: its worker processes and their channels.

`controlplane.launcher.Launcher` lays out the devices and guest memory, then `MicroVm`
asks the zygote for these, in this order, and waits for all of them at once
(`controlplane.worker_spawner`, `controlplane.worker_start`):

1. one worker per virtio device (`DevicePlan`: a block worker per drive, a net worker per
   network interface, ...), holding guest memory, its irqfd and queue eventfds, its
   backend fds (disk, TAP) and its fd channel; each binds its MMIO endpoint and says Ready;
2. the vCPU worker, holding /dev/kvm, guest memory, the console socket and every
   device's eventfds, which it registers with KVM (ioeventfd on QueueNotify, irqfd on
   the GSI); it forwards other accesses to a device window to that device's worker. Its
   vCPUs run once every device worker is Ready.

Then the monitor thread (`controlplane.monitor_loop`) is the only user of the control
socket and the only thread that changes the device slots; `MicroVm`'s methods, called by
API threads, read its status under a lock and post commands to it
(`controlplane.command_inbox`). Its parts, one job each:

- `controlplane.supervision`: what the parts share (workers, slots, control socket, status);
- `controlplane.worker_spawner`: spawning workers, keeping the fds a replacement needs;
- `controlplane.monitor_loop` + `.worker_watch`: the monitor thread and what it polls;
- `controlplane.restart_supervisor`: replacing dead or hung device workers (docs/faults.md);
- `controlplane.device_updates`: run-time updates (PATCH /drives, /network-interfaces, /mmds,
  /balloon);
- `controlplane.fault_control`: the faults armed through the fault API.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from controlplane.balloon import BalloonReport
from controlplane.builder import DevicePlan, GuestPlan, remove_vsock_socket
from controlplane.command_inbox import CommandInbox
from controlplane.device_updates import DeviceUpdateError, DeviceUpdates, Limits
from controlplane.fault_control import DISARM, FaultControl, FaultError
from controlplane.faults import FaultSpec, RestartPolicy
from controlplane.monitor_loop import MonitorLoop
from controlplane.restart_supervisor import RestartSupervisor
from controlplane.snapshot_restore import LazyLoad, seed_state_area
from controlplane.supervision import STOP_TIMEOUT_S, VCPU, DeviceSlot, Supervision
from controlplane.vm_spec import VmSpec
from controlplane.worker_handle import merge_metrics
from controlplane.worker_spawner import VmStartError, WorkerSpawner
from controlplane.worker_trust import TrustCounters
from controlplane.worker_watch import WorkerWatch
from shared import protocol as p
from shared.memory import resident_bytes

if TYPE_CHECKING:
    from controlplane.launcher import Launcher

__all__ = ["DeviceUpdateError", "ExitCallback", "FaultError", "MicroVm", "VmStartError"]

log = logging.getLogger("embervm.microvm")

ExitCallback = Callable[[int, str], None]
R = TypeVar("R", bound=p.Message)


class MicroVm:
    """A running microVM as the supervisor sees it: the verbs the API calls on it."""

    def __init__(
        self, launcher: Launcher, spec: VmSpec, console_out: BinaryIO, on_exit: ExitCallback, prefix: str
    ) -> None:
        self.launcher = launcher
        self.spec = spec
        self.cmdline = ""
        self.exit_code: int | None = None
        self.exit_reason: str | None = None
        self.policy = RestartPolicy.from_dict(spec.restart_policy)
        self._on_exit = on_exit
        self._console: socket.socket | None = None
        self._sup = Supervision(launcher.zygote, launcher.seccomp_kills, f"ipc://{prefix}-ctl")
        self._inbox = CommandInbox()
        self._faults = FaultControl(spec.enable_fault_injection, self._sup.slots)
        self._updates = DeviceUpdates(self._sup, spec, self._inbox.post)
        self._spawner = WorkerSpawner(self._sup, spec, lambda h, m: self._monitor.take(h, m))
        self._watch = WorkerWatch(self._sup)
        self._restarts = RestartSupervisor(
            self._sup,
            self._spawner,
            self._faults,
            self._watch,
            self.policy,
            lambda: self._monitor.take_all(),
        )
        self._monitor = MonitorLoop(
            self._sup, self._watch, self._inbox, self._updates, self._faults, self._restarts, console_out
        )
        self._thread = threading.Thread(target=self._run, name="vm-monitor", daemon=True)

    # --- status (the monitor thread changes it; read under the lock) ----------------------------
    @property
    def state(self) -> str:
        return self._sup.state

    @property
    def failed(self) -> bool:
        """The vCPU worker died (not a guest exit)."""
        return self._sup.failed

    @property
    def exit_detail(self) -> str:
        """Evidence for a failed guest, e.g. a register dump."""
        return self._sup.exit_detail

    @property
    def trust(self) -> TrustCounters:
        """What workers sent that was refused (embervm_monitor)."""
        return self._sup.trust

    # --- start-up and end -----------------------------------------------------------------------
    def _start(
        self, kvm_fd: int, plan: GuestPlan, devices: list[DevicePlan], restored: dict[str, Any] | None = None
    ) -> None:
        """Spawn the workers; `restored`: per device name, a snapshot's state for its worker."""
        restored = restored or {}
        try:
            self._spawner.keep(plan.memfd, devices)
            for name, saved in restored.items():
                seed_state_area(self._sup.slots[name].state_fd, saved)
            self._console = self._spawner.start_workers(
                kvm_fd, plan.memfd, plan.vcpu_args, devices, restored.keys(), plan.fill
            )
        except VmStartError:
            self._abort_start()
            raise
        self._monitor.console = self._console
        self._sup.state = "Running"
        self._thread.start()

    def _abort_start(self) -> None:
        for handle in self._sup.workers.values():
            if handle.alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(handle.pid, signal.SIGKILL)
                self._sup.reap(handle)
        self._close()

    def _run(self) -> None:
        """The monitor thread: its loop, then the microVM's end."""
        self._finish(*self._monitor.run())

    def _finish(self, code: int, reason: str) -> None:
        sup = self._sup
        sup.guarded("removing the vsock socket", lambda: remove_vsock_socket(self.spec), None)  # before "Exited"
        with sup.cond:
            self.exit_code, self.exit_reason = code, reason
            vcpu = sup.workers[VCPU.encode()]
            vcpu.exit_reason = vcpu.exit_reason or reason
            sup.state = "Exited"
            self._inbox.close()  # from here on API threads are told at once
            sup.cond.notify_all()
        self._monitor.run_inbox()  # what was posted before: each finds the microVM stopped
        self._updates.fail_all("the microVM has stopped")
        sup.guarded("closing the microVM's resources", self._close, None)
        try:
            self._on_exit(code, reason)
        except Exception:
            log.exception("on_exit callback failed")

    def _close(self) -> None:
        if self._sup.lazy is not None:
            self._sup.lazy.close()
        self._sup.close()
        self._inbox.close_fds()
        if self._console is not None:
            self._console.close()
        self._spawner.close()
        remove_vsock_socket(self.spec)  # the listening socket at uds_path is the supervisor's

    # --- commands to the monitor thread -------------------------------------------------------
    def _command(self, msg: p.Message, to: bytes = VCPU.encode()) -> None:
        self._inbox.post(lambda: self._sup.send(to, msg))

    def _command_and_wait(self, msg: p.Message, done: Callable[[], bool]) -> None:
        self._command(msg)
        with self._sup.cond:
            if not self._sup.cond.wait_for(done, timeout=STOP_TIMEOUT_S):
                raise TimeoutError(f"the vCPU worker did not answer {msg.TYPE!r}")

    # --- snapshots (controlplane.snapshot) ----------------------------------------------------
    def ask(self, worker: str, msg: p.Message, reply: type[R], timeout: float) -> R:
        """Send `msg` to `worker` and wait for its `reply` (TimeoutError when none comes)."""
        sup = self._sup
        with sup.cond:
            sup.snapshots.expect(worker, reply)
        self._command(msg, worker.encode())
        with sup.cond:
            sup.cond.wait_for(lambda: sup.snapshots.has(worker) or self.state == "Exited", timeout)
            answer = sup.snapshots.take(worker)
        if not isinstance(answer, reply):
            raise TimeoutError(f"the {worker} worker did not answer {msg.TYPE!r}")
        return answer

    def device_slots(self) -> dict[str, DeviceSlot]:
        return dict(self._sup.slots)

    @property
    def memfd(self) -> int:
        return self._spawner.memfd

    @property
    def lazy(self) -> LazyLoad | None:
        return self._sup.lazy

    def set_lazy(self, lazy: LazyLoad) -> None:
        """Before `_start`: guest memory is filled by `lazy` (a snapshot load)."""
        self._sup.lazy = lazy

    def started_paused(self) -> None:
        """A snapshot loaded without resume_vm: the vCPU worker's vCPUs wait for Resume."""
        with self._sup.cond:
            self._sup.state = "Paused"

    @property
    def has_snapshot_base(self) -> bool:
        return self._sup.snapshots.has_base

    def snapshot_taken(self) -> None:
        self._sup.snapshots.has_base = True

    def take_device_dirty_pages(self) -> int:
        """The pages device workers wrote since the last call, as a bitmap integer."""
        return self._sup.snapshots.take_device_dirty(self._sup.slots)

    # --- the API's verbs ------------------------------------------------------------------------
    def pause(self) -> None:
        self._command_and_wait(p.Pause(), lambda: self.state in ("Paused", "Exited"))

    def resume(self) -> None:
        self._command_and_wait(p.Resume(), lambda: self.state in ("Running", "Exited"))

    def send_ctrl_alt_del(self) -> None:
        self._command(p.CtrlAltDel())

    def send_console_input(self, data: bytes) -> None:
        """Bytes for the guest's serial port. Blocks while the console socket is full: the
        vCPU worker reads it only as fast as the guest empties the UART's receive FIFO."""
        if self._console is not None and self.state != "Exited":
            with contextlib.suppress(OSError):
                self._console.sendall(data)

    def metrics(self) -> dict[str, dict[str, int]]:
        """Every worker's cumulative counters, refreshed from the workers that answer in time."""
        sup = self._sup
        with sup.cond:
            live = [w for w in sup.workers.values() if w.alive]
            seqs = {w.name: w.metrics_seq for w in live}
        if self.state != "Exited":
            for handle in live:
                self._command(p.FlushMetrics(), handle.identity)
            with sup.cond:
                sup.cond.wait_for(
                    lambda: self.state == "Exited" or all(w.metrics_seq > seqs[w.name] or not w.alive for w in live),
                    timeout=1.0,
                )
        with sup.cond:
            merged = merge_metrics(list(sup.workers.values()))
            merged["embervm_workers"]["vcpu_failed"] = int(sup.failed)
            merged["embervm_monitor"] = {**sup.trust.as_group(), "balloon_status_rejected": sup.balloon.rejected}
            merged["embervm_memory"] = self._memory_figures()
            return {**merged, "seccomp": {"num_faults": sup.seccomp_faults}}

    def _memory_figures(self) -> dict[str, int]:
        """Guest RAM as configured and as the host holds it (the memfd's allocated pages)."""
        figures = {"guest_memory_bytes": self.spec.mem_size, "guest_memory_resident_bytes": 0}
        if self._spawner.memfd >= 0:
            with contextlib.suppress(OSError):
                figures["guest_memory_resident_bytes"] = resident_bytes(self._spawner.memfd)
        return figures

    def workers(self) -> list[dict[str, object]]:
        """Each worker process (the vCPU worker first) with its pid and whether it lives."""
        with self._sup.cond:
            handles = sorted(self._sup.workers.values(), key=lambda w: w.name != VCPU)
            return [w.describe() for w in handles]

    def stop(self) -> None:
        """Stop the guest and its workers (idempotent)."""
        if self.state != "Exited":
            self._command(p.Stop())
            if self.wait(STOP_TIMEOUT_S) is None:
                vcpu = self._sup.workers.get(VCPU.encode())
                if vcpu is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(vcpu.pid, signal.SIGKILL)
                self.wait(STOP_TIMEOUT_S)

    def wait(self, timeout: float | None = None) -> int | None:
        with self._sup.cond:
            self._sup.cond.wait_for(lambda: self.state == "Exited", timeout=timeout)
            return self.exit_code

    # --- run-time device updates (controlplane.device_updates) -------------------------------
    def update_net(self, iface_id: str, rx_rate_limiter: Limits = None, tx_rate_limiter: Limits = None) -> None:
        """Give interface `iface_id`'s worker new rx/tx rate limiters (buckets not given are kept)."""
        self._updates.update_net(iface_id, rx_rate_limiter, tx_rate_limiter)

    def update_drive(
        self,
        drive_id: str,
        path_on_host: str | None = None,
        rate_limiter: dict[str, Any] | None = None,
        backing_fd: int | None = None,
    ) -> None:
        """Give drive `drive_id`'s worker a new backing file (`backing_fd`, already open, or
        `path_on_host` opened now) and/or rate limiter, and wait for it."""
        self._updates.update_drive(drive_id, path_on_host, rate_limiter, backing_fd)

    def update_mmds(self, document: dict[str, Any] | None) -> None:
        """Push a new MMDS snapshot to every net worker that serves MMDS."""
        self._updates.update_mmds(document)

    def vsock_transport_reset(self) -> None:
        """Make the vsock worker drop its connections and send the guest a transport reset."""
        self._updates.vsock_transport_reset()

    def update_balloon(self, amount_mib: int) -> None:
        """PATCH /balloon: a new target for the balloon's worker."""
        self._updates.update_balloon(amount_mib)

    def update_balloon_stats(self, interval_s: int) -> None:
        """PATCH /balloon/statistics: a new statistics polling interval."""
        self._updates.update_balloon_stats(interval_s)

    def balloon_report(self) -> BalloonReport:
        """The balloon's `actual` and statistics as its worker last reported them."""
        return self._sup.balloon.report

    # --- fault injection (PUT/DELETE/GET /faults, --enable-fault-injection) --------------------
    def inject_fault(self, device_id: str, spec: FaultSpec) -> None:
        """Arm `spec` on the device's worker (it replaces the device's previous fault); the
        supervisor re-arms what remains of it on every replacement worker."""
        name, msg = self._faults.arm(device_id, spec, stopped=self.state == "Exited")
        self._command(msg, name.encode())

    def clear_fault(self, device_id: str) -> bool:
        """Disarm the device's fault; False if it had none."""
        name, had = self._faults.disarm(device_id)
        if self.state != "Exited":
            self._command(DISARM, name.encode())
        return had

    def faults(self) -> list[dict[str, Any]]:
        return self._faults.describe()

    # --- test hooks (armed by VmSpec.seccomp_test_hooks) --------------------------------------
    def test_syscall(self, worker: str, what: str) -> None:
        """Tests only: ask `worker` to attempt a forbidden syscall."""
        self._command(p.TestSyscall(what), worker.encode())

    def test_send_raw(self, worker: str, frames: list[bytes]) -> None:
        """Tests only: make device worker `worker` send `frames` to the supervisor as they are."""
        self._command(p.TestSendRaw(frames), worker.encode())
