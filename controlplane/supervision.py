"""What the parts of one microVM's supervisor share: its workers, their device slots, the
control socket they all speak on, and the microVM's status.

The parts (`controlplane.worker_spawner`, `.monitor_loop`, `.restart_supervisor`,
`.device_updates`) each do one job on this shared record. Once the microVM runs, only the
monitor thread changes it; API threads read the handles, the status and the counters under
`cond` and post what they want changed to the monitor (`controlplane.command_inbox`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import zmq

from controlplane.balloon import BalloonView
from controlplane.builder import DevicePlan
from controlplane.faults import RestartTracker
from controlplane.snapshot_replies import SnapshotReplies
from controlplane.vsock_sockets import KeptSockets
from controlplane.worker_handle import RestartHistory, WorkerHandle
from controlplane.worker_log import WorkerLogRelay, escape
from controlplane.worker_trust import MAX_FRAMES, TrustCounters, forbidden
from controlplane.zygote import Zygote
from shared import exitcodes
from shared import protocol as p
from shared.ratelimit import TokenBucket
from shared.seccomp import SeccompKillLog

if TYPE_CHECKING:
    from controlplane.snapshot_restore import LazyLoad

log = logging.getLogger("embervm.microvm")

VCPU = "vcpu"
STOP_TIMEOUT_S = 5.0
MAX_REASON, MAX_DETAIL = 1000, 16384  # what a worker's Exited may put in GET / and the log
T = TypeVar("T")


@dataclasses.dataclass
class DeviceSlot:
    """What the supervisor keeps of one device for its whole life, to restart its worker.

    Only the monitor thread changes a slot, once the microVM runs: API threads post their
    changes to it (`CommandInbox.post`), so a replacement worker is spawned from a plan nobody
    changes under it."""

    plan: DevicePlan  # with the supervisor's own copies of the fds
    state_fd: int  # the state area (shared.devstate); -1 for kinds that cannot restart
    tracker: RestartTracker
    history: RestartHistory = dataclasses.field(default_factory=RestartHistory)
    restart_at: float | None = None
    exhausted: bool = False  # the next worker only sets DEVICE_NEEDS_RESET
    dirty_fd: int = -1  # the device workers' dirty page log (shared.dirty), with track_dirty_pages
    kept_sockets: KeptSockets | None = None  # vsock: host sockets its connections survive on

    def close(self) -> None:
        self.plan.close()
        if self.kept_sockets is not None:
            self.kept_sockets.close()
        if self.dirty_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.dirty_fd)
            self.dirty_fd = -1
        if self.state_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.state_fd)
            self.state_fd = -1


def describe_wait_status(status: int, pid: int = 0, kills: SeccompKillLog | None = None) -> tuple[int, str]:
    """(microVM exit code, human reason) for worker `pid`'s raw wait status; with `kills`,
    a SIGSYS death is reported as a seccomp kill with the syscall that caused it."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        code = exitcodes.BAD_SYSCALL if sig == signal.SIGSYS else exitcodes.GENERIC_ERROR
        if sig == signal.SIGSYS and kills is not None:
            return code, f"killed by seccomp ({kills.describe(pid)})"
        return code, f"killed by signal {name}"
    return os.WEXITSTATUS(status), f"exited with status {os.WEXITSTATUS(status)}"


class Supervision:
    """One microVM's workers (by ZeroMQ identity), device slots (by worker name), control
    socket (a ROUTER, one identity per worker) and status, with the checks every message
    from a worker goes through."""

    def __init__(self, zygote: Zygote, seccomp_kills: SeccompKillLog, endpoint: str) -> None:
        self.zygote = zygote
        self.seccomp_kills = seccomp_kills
        self.endpoint = endpoint
        self._ctx = zmq.Context()
        self.ctl = self._ctx.socket(zmq.ROUTER)
        self.ctl.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.ctl.setsockopt(zmq.LINGER, 0)
        self.ctl.setsockopt(zmq.MAXMSGSIZE, p.MAX_MESSAGE_BYTES)  # libzmq drops a peer that sends more
        self.ctl.bind(endpoint)
        self.cond = threading.Condition()  # what API threads read; notified on every change
        self.state = "Starting"
        self.failed = False  # the vCPU worker died (not a guest exit)
        self.exit_detail = ""  # evidence for a failed guest, e.g. a register dump
        self.workers: dict[bytes, WorkerHandle] = {}
        self.slots: dict[str, DeviceSlot] = {}
        self.trust = TrustCounters()  # what workers sent that was refused (embervm_monitor)
        self.snapshots = SnapshotReplies()  # answers to controlplane.snapshot's questions
        self.lazy: LazyLoad | None = None  # a loaded microVM's memory being filled (docs/snapshots.md)
        self.worker_logs = WorkerLogRelay(log, self.trust)
        self.seccomp_faults = 0
        self.balloon = BalloonView()  # what the balloon worker last reported (controlplane.balloon)
        self._error_log_bucket = TokenBucket(10, 10, 1000)  # the monitor's own error lines

    def send(self, identity: bytes, msg: p.Message) -> None:
        if self.state == "Exited":
            return  # every worker is gone
        try:
            self.ctl.send_multipart([identity, p.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.error("cannot send %s to the %s worker: %s", msg.TYPE, identity.decode(errors="replace"), e)

    def recv(self) -> tuple[WorkerHandle, p.Message] | None:
        """One message from a worker, checked (`controlplane.worker_trust`); None when it was
        dropped, and its sender killed if it was hostile."""
        frames = [self.ctl.recv(copy=True)]
        count = 1
        while self.ctl.getsockopt(zmq.RCVMORE):
            frame = self.ctl.recv(copy=True)
            count += 1
            if count <= MAX_FRAMES:
                frames.append(frame)  # beyond that, frames are read and dropped at once
        handle = self.workers.get(frames[0])
        if handle is None:
            self.trust.unknown_identity += 1
            return None
        if handle.distrusted:
            return None  # it is being killed
        if count != MAX_FRAMES:
            self.trust.malformed += 1
            self.distrust(handle, f"a message of {count - 1} frames, not one")
            return None
        try:
            msg = p.decode(frames[1])
        except p.ProtocolError as e:
            self.trust.malformed += 1
            self.distrust(handle, f"a malformed message ({e})")
            return None
        why = forbidden(handle, msg)
        if why is not None:
            self.trust.forbidden_type += 1
            self.distrust(handle, why)
            return None
        return handle, msg

    def distrust(self, handle: WorkerHandle, what: str) -> None:
        """Kill a worker that sent `what`: its death is handled as any other (a device's worker
        is replaced, the vCPU worker's ends the microVM)."""
        if handle.distrusted:
            return
        with self.cond:
            handle.distrusted = escape(what)
            self.trust.workers_killed += 1
        log.error("the %s worker (pid %d) sent %s: killing it", handle.name, handle.pid, handle.distrusted)
        with contextlib.suppress(ProcessLookupError):
            os.kill(handle.pid, signal.SIGKILL)

    def reap(self, handle: WorkerHandle) -> int | None:
        status = self.zygote.wait_exit(handle.pid, STOP_TIMEOUT_S)
        with self.cond:
            handle.alive = False
            self.cond.notify_all()
        return status

    def how(self, handle: WorkerHandle, status: int | None) -> str:
        """How `handle` ended; a seccomp kill is counted in the `seccomp` metrics group."""
        if status is None:
            return "vanished"
        how = describe_wait_status(status, handle.pid, self.seccomp_kills)[1]
        if how.startswith("killed by seccomp"):
            with self.cond:
                self.seccomp_faults += 1
        return how

    def guarded(self, what: str, step: Callable[[], T], failed: T) -> T:
        """One step of the monitor thread: an exception is logged (rate-limited) and counted,
        and the thread goes on with `failed` for the step's result."""
        try:
            return step()
        except Exception:
            with self.cond:
                self.trust.monitor_errors += 1
            if self._error_log_bucket.reduce(1):
                log.exception("monitor thread: error while %s (the monitor carries on)", what)
            return failed

    def close(self) -> None:
        """Close the control socket, every worker's handle and every slot's fds."""
        self.ctl.close(linger=0)
        self._ctx.term()
        for handle in self.workers.values():
            handle.close()
        for slot in self.slots.values():
            slot.close()
