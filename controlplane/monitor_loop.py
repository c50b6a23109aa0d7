"""The monitor thread of a running microVM: the only user of the control socket once the
guest runs. It forwards console output, runs what API threads post (`CommandInbox`),
applies worker messages, notices a worker's death at once through its pidfd and runs the
timers (update deadlines, heartbeats, restarts). The vCPU worker's death ends the microVM;
a device worker's goes to `RestartSupervisor`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import time
from typing import BinaryIO

import zmq

from controlplane.command_inbox import CommandInbox
from controlplane.device_updates import DeviceUpdates
from controlplane.fault_control import FaultControl
from controlplane.restart_supervisor import RestartSupervisor
from controlplane.supervision import (
    MAX_DETAIL,
    MAX_REASON,
    STOP_TIMEOUT_S,
    VCPU,
    DeviceSlot,
    Supervision,
    describe_wait_status,
)
from controlplane.worker_handle import WorkerHandle
from controlplane.worker_log import escape
from controlplane.worker_trust import admit_metrics
from controlplane.worker_watch import WorkerWatch
from devices.balloon.messages import BalloonStatus
from devices.vsock.messages import VsockConnect, VsockConnected, VsockRelease
from shared import exitcodes, fdpass
from shared import protocol as p
from shared.ratelimit import TokenBucket

log = logging.getLogger("embervm.microvm")

VSOCK_CONNECTS_PER_S = 256  # guest-initiated vsock connects the supervisor makes for one worker
MESSAGES_PER_WORKER_ROUND = 32  # fair draining: a round reads at most this many per worker

Outcome = tuple[int, str] | None  # the microVM's exit (code, reason) once the vCPU worker ends


class MonitorLoop:
    """The monitor thread's loop and its reactions to what workers send and do."""

    def __init__(
        self,
        sup: Supervision,
        watch: WorkerWatch,
        inbox: CommandInbox,
        updates: DeviceUpdates,
        faults: FaultControl,
        restarts: RestartSupervisor,
        console_out: BinaryIO,
    ) -> None:
        self._sup = sup
        self._watch = watch
        self._inbox = inbox
        self._updates = updates
        self._faults = faults
        self._restarts = restarts
        self._console_out = console_out
        self.console: socket.socket | None = None  # the supervisor's end, once the vCPU worker runs
        self._deferred_outcome: Outcome = None  # see _keep_outcome
        self._vsock_listeners: dict[int, tuple[DeviceSlot, socket.socket]] = {}  # fd -> its slot, our dup

    def run(self) -> tuple[int, str]:
        """The monitor loop, until the vCPU worker ends; then stop the device workers. Nothing a
        worker does, and no bug of ours, may end it: each step runs guarded
        (`Supervision.guarded`); only the vCPU worker's end does."""
        sup = self._sup
        poller = self._watch.poller
        poller.register(sup.ctl, zmq.POLLIN)
        poller.register(self._inbox.wake_fd, zmq.POLLIN)
        assert self.console is not None
        poller.register(self.console.fileno(), zmq.POLLIN)
        for handle in sup.workers.values():
            self._watch.watch(handle)
        for slot in sup.slots.values():
            if slot.kept_sockets is not None:  # vsock: the supervisor accepts host connections
                listener = socket.socket(fileno=os.dup(slot.plan.backend_fds[0]))
                self._vsock_listeners[listener.fileno()] = (slot, listener)
                poller.register(listener.fileno(), zmq.POLLIN)
        outcome: Outcome = None
        while outcome is None:
            outcome = sup.guarded("monitoring", self._round, None)
        sup.guarded("stopping the device workers", self._stop_device_workers, None)
        vcpu = sup.workers[VCPU.encode()]
        if vcpu.alive:
            sup.guarded("reaping the vCPU worker", lambda: sup.reap(vcpu), None)
        sup.guarded("forwarding console output", self.pump_console, None)
        for _, listener in self._vsock_listeners.values():
            listener.close()
        self._vsock_listeners.clear()
        return outcome

    def _round(self) -> Outcome:
        """One turn of the monitor loop: wait, then serve what is ready."""
        sup, watch = self._sup, self._watch
        assert self.console is not None
        console = self.console.fileno()
        events = sup.guarded("polling", lambda: dict(watch.poller.poll(self._next_timer_ms())), None)
        if events is None:
            time.sleep(0.01)  # a poll that fails at once must not spin
            events = {}
        if console in events:
            sup.guarded("forwarding console output", self.pump_console, None)
        if self._inbox.wake_fd in events:
            sup.guarded("taking API commands", self.run_inbox, None)
        outcome: Outcome = None
        if sup.ctl in events:
            outcome = sup.guarded("reading worker messages", self.drain_messages, None)
        for fd in [fd for fd in watch.stderrs if fd in events]:
            sup.guarded("reading a worker's stderr", lambda fd=fd: watch.read_stderr(fd), None)  # type: ignore[misc]
        for fd in [fd for fd in self._vsock_listeners if fd in events]:
            sup.guarded("accepting vsock host connections", lambda fd=fd: self._accept_vsock(fd), None)  # type: ignore[misc]
        for fd in [fd for fd in watch.pidfds if fd in events]:
            death = self._guarded_death(watch.died(fd), outcome or self._deferred_outcome)
            outcome = outcome or death  # an Exited read in this round says why, not the death
        if outcome is None:
            sup.guarded("running timers", self.run_timers, None)
        outcome, self._deferred_outcome = outcome or self._deferred_outcome, None
        return outcome

    def run_inbox(self) -> None:
        """Run what API threads posted, in order; one failing does not stop the rest."""
        self._inbox.run(lambda work: self._sup.guarded("running an API command", work, None))

    def take(self, handle: WorkerHandle, msg: p.Message) -> None:
        """Apply a message read outside the loop's own reading (while a worker starts)."""
        self._keep_outcome(self.apply(handle, msg))

    def take_all(self) -> None:
        """Apply what the workers sent, outside the loop's own reading (during a restart)."""
        self._keep_outcome(self.drain_messages())

    def _keep_outcome(self, outcome: Outcome) -> None:
        """An outcome (the vCPU worker's Exited) read outside the loop's own reading: the
        monitor round returns it."""
        if outcome is not None and self._deferred_outcome is None:
            self._deferred_outcome = outcome

    # --- timers ------------------------------------------------------------------------------
    def _next_timer_ms(self) -> int | None:
        """Until the next restart or update deadline is due or a worker's heartbeat is late
        (None: no timer)."""
        now = time.monotonic()
        due = self._restarts.due() + self._updates.deadlines()
        if not due:
            return None
        return max(0, int((min(due) - now) * 1000) + 1)

    def run_timers(self) -> None:
        now = time.monotonic()
        self._updates.expire(now)
        if self._restarts.any_late(now):
            # Before calling a worker hung, read what is queued: on a starved host the monitor
            # itself runs late, and heartbeats that arrived meanwhile wait unread in the socket.
            self.take_all()
            now = time.monotonic()
        self._restarts.run_timers(now)

    # --- deaths ------------------------------------------------------------------------------
    def _guarded_death(self, handle: WorkerHandle, read: Outcome) -> Outcome:
        """A worker died (`read`: the vCPU worker's Exited, if read already). Whatever goes
        wrong in handling it, a dead vCPU worker ends the microVM and a dead device worker is
        replaced."""
        sup = self._sup
        outcome: list[Outcome] = []

        def handle_death() -> bool:
            outcome.append(self._worker_died(handle, read))
            return True

        if sup.guarded(f"handling the {handle.name} worker's death", handle_death, False):
            return outcome[0]
        if handle.name == VCPU:
            sup.failed = True
            return exitcodes.GENERIC_ERROR, "vCPU worker died"
        slot = sup.slots.get(handle.name)
        if slot is not None and slot.state_fd >= 0 and slot.restart_at is None:
            with sup.cond:
                handle.alive = False
                sup.cond.notify_all()
            sup.guarded("scheduling a restart", lambda: self._restarts.schedule(slot, handle, "exit", "died"), None)
        return None

    def _worker_died(self, handle: WorkerHandle, read: Outcome = None) -> Outcome:
        sup = self._sup
        slot = sup.slots.get(handle.name)
        if slot is not None and slot.state_fd >= 0 and not handle.broken:
            sup.send(VCPU.encode(), p.DeviceRestarting(handle.name))  # its window waits for the new worker
        elif handle.name != VCPU:
            sup.send(VCPU.encode(), p.DeviceDown(handle.name))  # its window answers at once from now on
        self.pump_console()
        outcome = self.drain_messages() or read  # messages sent just before the exit
        status = sup.reap(handle)
        self._updates.forget(handle)
        how = sup.how(handle, status)
        with sup.cond:
            handle.exit_reason = handle.exit_reason or f"{handle.kind} worker {how}"
            sup.cond.notify_all()
        if handle.name == VCPU:
            if handle.distrusted:
                sup.failed = True
                reason = f"vCPU worker killed by the supervisor: it sent {handle.distrusted}"
                log.error("the vCPU worker (pid %d) was killed: it sent %s", handle.pid, handle.distrusted)
                return exitcodes.GENERIC_ERROR, reason
            if outcome is None and status is not None and os.WIFEXITED(status):
                outcome = self._await_exited(handle)  # it said why before exiting; ZeroMQ may lag the pidfd
            if outcome is None:
                code = describe_wait_status(status)[0] if status is not None else exitcodes.GENERIC_ERROR
                outcome = (code, f"vCPU worker {how}")
                sup.failed = True
                log.error("the vCPU worker (pid %d) %s", handle.pid, how)
            return outcome
        if slot is not None and slot.state_fd >= 0 and outcome is None:
            self._restarts.device_died(handle, slot, how)
            return outcome
        log.error(
            "the %s worker (pid %d) %s: %s %s is gone, the guest keeps running without it",
            handle.name,
            handle.pid,
            how,
            "drive" if handle.kind == "block" else "device",
            handle.device_id,
        )
        return None

    def _await_exited(self, handle: WorkerHandle, timeout: float = 1.0) -> Outcome:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and self._sup.ctl.poll(int(left * 1000) + 1):
            received = self._sup.recv()
            outcome = self.apply(*received) if received is not None else None
            if outcome is not None:
                return outcome
        return None

    def _stop_device_workers(self) -> None:
        """Stop every device worker with the guest: Stop, then SIGKILL for the slow ones."""
        sup = self._sup
        devices = [w for w in sup.workers.values() if w.name != VCPU and w.alive]
        for handle in devices:
            sup.send(handle.identity, p.Stop())
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for handle in devices:
            if not select.select([handle.pidfd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                log.warning("the %s worker did not stop in time: killing it", handle.name)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(handle.pid, signal.SIGKILL)
            sup.reap(handle)
        self.drain_messages()  # their final metrics

    # --- what workers send -------------------------------------------------------------------
    def drain_messages(self) -> Outcome:
        """Apply what the workers sent, in rounds of at most MESSAGES_PER_WORKER_ROUND per
        worker: the ROUTER queues its peers fairly (round-robin, one message each in turn),
        so a flooding worker gets its share of a round and every other worker gets theirs,
        and the loop gets back to deaths, timers and the console between rounds."""
        sup = self._sup
        outcome = None
        budget = MESSAGES_PER_WORKER_ROUND * max(1, len(sup.workers))  # dropped messages count too
        taken: dict[str, int] = {}
        while budget > 0 and sup.ctl.poll(0):
            budget -= 1
            received = sup.recv()
            if received is None:
                continue
            outcome = self.apply(*received) or outcome
            name = received[0].name
            taken[name] = taken.get(name, 0) + 1
            if taken[name] >= MESSAGES_PER_WORKER_ROUND:
                break  # the others had their turns in between (round-robin): the round is over
        return outcome

    def apply(self, handle: WorkerHandle, msg: p.Message) -> Outcome:
        with self._sup.cond:
            try:
                return self._apply_locked(handle, msg)
            finally:
                self._sup.cond.notify_all()

    def _apply_locked(self, handle: WorkerHandle, msg: p.Message) -> Outcome:
        """Act on one checked message (`Supervision.recv`: its type is one its kind may send)."""
        sup = self._sup
        handle.last_heartbeat = time.monotonic()  # any message shows its loop turns
        if isinstance(msg, p.Heartbeat):
            return None
        if isinstance(msg, p.FaultFired):
            self._faults.fired(handle.name)
        elif isinstance(msg, p.Metrics):
            handle.metrics = admit_metrics(handle, msg.groups, sup.trust)
            handle.metrics_seq += 1
        elif isinstance(msg, p.Log):
            sup.worker_logs.relay(handle.name, handle.pid, msg.level, msg.text)
        elif isinstance(msg, VsockConnect):
            self._broker_vsock_connect(handle, msg)
        elif isinstance(msg, VsockRelease):
            slot = sup.slots.get(handle.name)
            if slot is not None and slot.kept_sockets is not None:
                slot.kept_sockets.release(msg.sock_ids)
        elif isinstance(msg, BalloonStatus):
            sup.balloon.accept(msg)
        elif isinstance(msg, p.UpdateResult):
            self._updates.answer(handle, msg)
        elif isinstance(msg, p.VmState | p.DeviceHeld | p.DirtyPages):
            if not sup.snapshots.answer(handle.name, msg):
                sup.trust.bad_request_id += 1
                sup.distrust(handle, f"an unrequested {msg.TYPE!r} message")
        elif isinstance(msg, p.StateChanged):
            if msg.state not in ("Running", "Paused"):
                sup.trust.malformed += 1
                sup.distrust(handle, f"a state_changed message to state {msg.state[:40]!r}")
                return None
            sup.state = msg.state
        elif isinstance(msg, p.Exited):
            if not 0 <= msg.code <= 255:
                sup.trust.malformed += 1
                sup.distrust(handle, f"an exited message with exit code {msg.code}")
                return None
            if msg.detail:
                detail = escape(msg.detail[:MAX_DETAIL])
                log.error("[%s worker pid %d] %s: %s", handle.name, handle.pid, escape(msg.reason[:MAX_REASON]), detail)
            if handle.name == VCPU:
                sup.exit_detail = msg.detail[:MAX_DETAIL] or sup.exit_detail
                return msg.code, escape(msg.reason[:MAX_REASON])
            handle.exit_reason = escape(msg.reason[:MAX_REASON])
        return None

    def _accept_vsock(self, fd: int) -> None:
        """Host connections at uds_path: kept, and handed to the vsock worker (controlplane.vsock_sockets)."""
        slot, listener = self._vsock_listeners[fd]
        assert slot.kept_sockets is not None
        handle = self._sup.workers.get(slot.plan.name.encode())
        channel = handle.fd_channel if handle is not None and handle.alive else None
        slot.kept_sockets.accept(listener, channel)

    def _broker_vsock_connect(self, handle: WorkerHandle, msg: VsockConnect) -> None:
        """Connect to `<uds_path>_<port>` for the vsock worker, which has no filesystem and
        may create no socket, and hand it the connected socket (or a refusal) on its fd
        channel. Only a vsock worker may ask, at most VSOCK_CONNECTS_PER_S a second."""
        slot = self._sup.slots.get(handle.name)
        if handle.kind != "vsock" or slot is None or handle.fd_channel is None:
            log.error("the %s worker sent a vsock connect request: dropped", handle.name)
            return
        if handle.connect_budget is None:
            handle.connect_budget = TokenBucket(VSOCK_CONNECTS_PER_S)
        sock: socket.socket | None = None
        sock_id = 0
        if handle.connect_budget.reduce(1):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            try:
                sock.connect(f"{slot.plan.args['uds_path']}_{msg.port & 0xFFFFFFFF}")
                if slot.kept_sockets is not None:  # so the connection survives the worker
                    sock_id = slot.kept_sockets.keep(sock)
                    if not sock_id:
                        raise OSError("too many host sockets kept for the vsock worker")
            except OSError:  # nobody listens there (or its backlog is full): the guest gets RST
                sock.close()
                sock = None
        answer = VsockConnected(msg.port, msg.guest_port, sock is not None, sock_id)
        try:
            fdpass.send_message(handle.fd_channel, answer, [] if sock is None else [sock.fileno()])
        except OSError as e:
            log.error("cannot answer the vsock worker's connect request: %s", e)
            if sock_id and slot.kept_sockets is not None:
                slot.kept_sockets.release([sock_id])
        finally:
            if sock is not None:
                sock.close()

    def pump_console(self) -> None:
        assert self.console is not None
        while select.select([self.console], [], [], 0)[0]:
            try:
                data = self.console.recv(65536)
            except OSError:
                return
            if not data:
                return
            try:
                self._console_out.write(data)
                self._console_out.flush()
            except (OSError, ValueError):
                pass  # the console reader went away; the guest keeps running
