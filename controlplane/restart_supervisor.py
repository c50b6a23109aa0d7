"""Restart supervision: a device worker that dies, or hangs (no heartbeat for the policy's
`hang_timeout_s`: the watchdog kills it), is replaced under the running guest with the same
fds and state area (docs/faults.md); past its restart policy the device gets a worker that
only sets DEVICE_NEEDS_RESET. Monitor thread only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable

import zmq

from controlplane.fault_control import FaultControl
from controlplane.faults import RestartPolicy
from controlplane.supervision import VCPU, DeviceSlot, Supervision
from controlplane.worker_handle import Groups, WorkerHandle
from controlplane.worker_spawner import VmStartError, WorkerSpawner
from controlplane.worker_trust import admit_metrics
from controlplane.worker_watch import WorkerWatch
from shared import fdpass
from shared import protocol as p
from shared.devstate import FATAL_CRASH, FATAL_HANG, read_area, read_state, take_fatal

log = logging.getLogger("embervm.microvm")

CONNECTION_GRACE_S = 0.05  # see _await_disconnected
RESTART_RETRY_S = 0.5  # after an error in the supervisor's own restart code


class RestartSupervisor:
    """Schedules, and at their time starts, the replacement of dead or hung device workers."""

    def __init__(
        self,
        sup: Supervision,
        spawner: WorkerSpawner,
        faults: FaultControl,
        watch: WorkerWatch,
        policy: RestartPolicy,
        drain: Callable[[], None],
    ) -> None:
        self._sup = sup
        self._spawner = spawner
        self._faults = faults
        self._watch = watch
        self._policy = policy  # the microVM's; each slot's tracker has the device's own
        self._drain = drain  # apply what the workers sent (the monitor's reading)

    def device_died(self, handle: WorkerHandle, slot: DeviceSlot, how: str) -> None:
        """A restartable device's worker died without saying why: find the cause, schedule
        its replacement."""
        self._last_counters(handle, slot)
        cause_kind, cause = self._death_cause(handle, slot, how)
        with self._sup.cond:
            handle.exit_reason = f"{handle.kind} worker {cause}"
        log.error("the %s worker (pid %d) %s: restarting it under the guest", handle.name, handle.pid, cause)
        self.schedule(slot, handle, cause_kind, cause)

    def schedule(self, slot: DeviceSlot, handle: WorkerHandle, cause_kind: str, cause: str) -> None:
        if handle.broken:
            log.error("the %s worker that reported DEVICE_NEEDS_RESET died too: the device is gone", handle.name)
            self._sup.send(VCPU.encode(), p.DeviceDown(handle.name))
            return
        delay = slot.tracker.on_death()
        if delay is None:
            slot.exhausted = True
            delay = 0.0
            log.error(
                "the %s worker died %d times within %g s: restart policy exhausted, the device goes to NEEDS_RESET",
                handle.name,
                slot.tracker.policy.max_restarts + 1,
                slot.tracker.policy.window_s,
            )
        with self._sup.cond:
            slot.history.record(cause_kind, cause)
        slot.restart_at = time.monotonic() + delay

    def _last_counters(self, handle: WorkerHandle, slot: DeviceSlot) -> None:
        """A killed worker could not send its last counters: take the newer of the ones it
        pushed and the ones it kept in its state area (counters only grow). The state area
        is the worker's, so what it says is checked as its messages are."""
        state = read_state(read_area(slot.state_fd)) or {}
        kept = state.get("metrics")
        if not isinstance(kept, dict):
            return
        groups: Groups = {
            group: {k: v for k, v in values.items() if isinstance(k, str) and type(v) is int}
            for group, values in kept.items()
            if isinstance(group, str) and isinstance(values, dict)
        }
        with self._sup.cond:
            for group, values in admit_metrics(handle, groups, self._sup.trust).items():
                target = handle.metrics.setdefault(group, {})
                for key, value in values.items():
                    if value > target.get(key, 0):
                        target[key] = value

    def _death_cause(self, handle: WorkerHandle, slot: DeviceSlot | None, how: str) -> tuple[str, str]:
        """(metric cause, human cause) of a device worker's death."""
        fatal = take_fatal(slot.state_fd) if slot is not None and slot.state_fd >= 0 else 0
        if fatal:
            self._faults.fired(handle.name)
        if handle.distrusted:
            return "protocol", f"killed by the supervisor: it sent {handle.distrusted}"
        if handle.hung:
            injected = " (injected hang)" if fatal == FATAL_HANG else ""
            timeout = slot.tracker.policy.hang_timeout_s if slot is not None else self._policy.hang_timeout_s
            return "hang", f"hung: no heartbeat for {timeout:g} s{injected}"
        if fatal == FATAL_CRASH:
            return "fault", f"injected crash ({how})"
        if how.startswith("killed by seccomp"):
            return "seccomp", how
        return ("signal" if how.startswith("killed by signal") else "exit"), how

    # --- timers ------------------------------------------------------------------------------
    def due(self) -> list[float]:
        """When a restart is due or a worker's heartbeat is late."""
        due = [slot.restart_at for slot in self._sup.slots.values() if slot.restart_at is not None]
        for handle in self._sup.workers.values():
            if handle.name in self._sup.slots and handle.alive and not handle.hung:
                due.append(handle.last_heartbeat + self._sup.slots[handle.name].tracker.policy.hang_timeout_s)
        return due

    def any_late(self, now: float) -> bool:
        """Whether a worker's heartbeat is late by what the monitor has read so far."""
        for handle in self._sup.workers.values():
            slot = self._sup.slots.get(handle.name)
            late = now - handle.last_heartbeat
            if slot is not None and handle.alive and not handle.hung and late > slot.tracker.policy.hang_timeout_s:
                return True
        return False

    def run_timers(self, now: float) -> None:
        """Kill the workers whose heartbeat is late (their death brings their restart) and
        start the replacements that are due."""
        for handle in list(self._sup.workers.values()):
            late = now - handle.last_heartbeat
            slot = self._sup.slots.get(handle.name)
            if slot is not None and handle.alive and not handle.hung and late > slot.tracker.policy.hang_timeout_s:
                log.error("the %s worker (pid %d) is hung (%.1f s without a heartbeat)", handle.name, handle.pid, late)
                handle.hung = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(handle.pid, signal.SIGKILL)
        for slot in self._sup.slots.values():
            if slot.restart_at is not None and slot.restart_at <= now:
                slot.restart_at = None
                self._restart_or_retry(slot)

    # --- replacing a worker -----------------------------------------------------------------
    def _restart_or_retry(self, slot: DeviceSlot) -> None:
        def restart() -> bool:
            self._restart(slot)
            return True

        if not self._sup.guarded(f"restarting the {slot.plan.name} worker", restart, False):
            slot.restart_at = time.monotonic() + RESTART_RETRY_S  # a bug of ours must not lose a device

    def _restart(self, slot: DeviceSlot) -> None:
        """Start a replacement worker for `slot`."""
        name = slot.plan.name
        old = self._sup.workers[name.encode()]
        if old.alive:
            return  # replaced already (a retry after an error past the spawn)
        self._await_disconnected(old)
        mmio_vcpu: socket.socket | None = None
        try:
            mmio_vcpu = self._spawner.spawn_device_worker(slot.plan, restore=True, needs_reset=slot.exhausted)
            failure = None
        except VmStartError as e:
            failure = str(e)
        new = self._sup.workers[name.encode()]
        with self._sup.cond:
            if new is not old:
                new.broken = slot.exhausted
                self._watch.forget(old)
                old.close()
            self._sup.cond.notify_all()
        if failure is not None:
            log.error("cannot restart the %s worker: %s", name, failure)
            self.schedule(slot, new, "exit", f"its replacement failed to start: {failure}")
            return
        self._watch.watch(new)
        self._device_up(name, mmio_vcpu)  # the window forwards to the new worker
        rearm = self._faults.rearm(name)
        if rearm is not None and not slot.exhausted:
            self._sup.send(new.identity, rearm)
        if slot.exhausted:
            log.error("the %s device needs a reset: its worker (pid %d) only reports DEVICE_NEEDS_RESET", name, new.pid)
        else:
            log.warning("restarted the %s worker: pid %d (restart %d)", name, new.pid, slot.history.restarts)

    def _await_disconnected(self, old: WorkerHandle, timeout: float = 1.0) -> None:
        """Wait until the ROUTER has dropped a dead worker's connection: libzmq ignores a new
        connection under an identity still in use, so a replacement that connected before
        would never be heard. The connection goes once what the worker left is read; a send
        to its identity then fails with EHOSTUNREACH (ROUTER_MANDATORY), and libzmq forgets
        the identity after one more exchange with its I/O thread (`CONNECTION_GRACE_S`)."""
        ctl = self._sup.ctl
        deadline = time.monotonic() + timeout
        closing_since: float | None = None
        while (now := time.monotonic()) < deadline:
            self._drain()
            try:
                ctl.send_multipart([old.identity, p.encode(p.FlushMetrics())], zmq.NOBLOCK)
                closing_since = None
            except zmq.ZMQError as e:
                if e.errno == zmq.EHOSTUNREACH:
                    closing_since = closing_since or now
                    if now - closing_since >= CONNECTION_GRACE_S:
                        return
            ctl.poll(5)  # takes libzmq's commands
        log.warning("the dead %s worker's connection is still open: its replacement may not be heard", old.name)

    def _device_up(self, name: str, mmio_vcpu: socket.socket | None) -> None:
        """Hand the vCPU worker its end of the replacement's MMIO channel, with DeviceUp."""
        vcpu = self._sup.workers.get(VCPU.encode())
        try:
            if mmio_vcpu is None or vcpu is None or vcpu.fd_channel is None:
                return
            fdpass.send_message(vcpu.fd_channel, p.DeviceUp(name), [mmio_vcpu.fileno()])
        except OSError as e:
            log.error("cannot hand the vCPU worker the %s worker's MMIO channel: %s", name, e)
        finally:
            if mmio_vcpu is not None:
                mmio_vcpu.close()
