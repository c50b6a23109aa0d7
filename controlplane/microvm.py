"""Supervisor side of a running microVM: its worker processes and their channels.

`Launcher` owns the worker zygote (forked before any thread exists) and a private run
directory for ZeroMQ endpoints. `Launcher.start_vm` lays out the devices and guest
memory (`controlplane.builder`), then forks, in order:

1. one worker per virtio device (`DevicePlan`: a block worker per drive, a net worker per
   network interface, ...), holding guest memory, its irqfd and queue eventfds, its
   backend fds (disk, TAP) and its fd channel; each binds its MMIO endpoint and says Ready;
2. the vCPU worker, holding /dev/kvm, guest memory, the console socket and every
   device's eventfds, which it registers with KVM (ioeventfd on QueueNotify, irqfd on
   the GSI); it forwards other accesses to a device window to that device's worker.

`MicroVm`'s monitor thread is the only user of the control socket (a ZeroMQ ROUTER,
one identity per worker): it forwards console output, applies worker messages and
notices a worker's death at once through its pidfd. The vCPU worker's death ends the
microVM. A device worker that dies, or hangs (no heartbeat for the policy's
`hang_timeout_s`: the watchdog kills it), is replaced under the running guest with the
same fds, which the supervisor keeps for that, and the device's state area
(docs/faults.md); past the restart policy the device gets a worker that only sets
DEVICE_NEEDS_RESET and is reported broken. Restarts and their causes are logged and
counted (`metrics()`, `workers()`); faults can be injected (`inject_fault`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import queue
import select
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, BinaryIO, TypeVar

import zmq

from controlplane.builder import (
    DevicePlan,
    GuestPlan,
    build_guest,
    open_backing_file,
    plan_devices,
    remove_vsock_socket,
)
from controlplane.faults import (
    NOT_ENABLED,
    FaultEntry,
    FaultSpec,
    RestartPolicy,
    RestartTracker,
)
from controlplane.vm_spec import VmSpec
from controlplane.vsock_sockets import KeptSockets
from controlplane.worker_handle import (
    VCPU_GROUPS,
    Groups,
    RestartHistory,
    WorkerHandle,
    WorkerStderr,
    merge_metrics,
)
from controlplane.worker_log import WorkerLogRelay, escape
from controlplane.worker_trust import MAX_FRAMES, TrustCounters, admit_metrics, forbidden
from controlplane.zygote import Zygote, ZygoteError
from devices.vsock.durable import RESUME_CONNECTIONS
from devices.vsock.messages import VsockConnect, VsockConnected, VsockRelease, VsockTransportReset
from shared import exitcodes, fdpass
from shared import protocol as p
from shared.boot.errors import BootError
from shared.confine import settings_for
from shared.device_kinds import BLOCK, NET, VSOCK
from shared.devstate import FATAL_CRASH, FATAL_HANG, create_state_memfd, read_area, read_state, take_fatal
from shared.devworker_client import channel_pair as mmio_channel_pair
from shared.kvm import Kvm, KvmError, open_kvm
from shared.ratelimit import TokenBucket
from shared.seccomp import Filter, PolicyError, SeccompKillLog, load_filter_file
from shared.spawn import DeviceSpawn, VcpuDevice, VcpuSpawn

log = logging.getLogger("embervm.microvm")

READY_TIMEOUT_S = 30.0
VSOCK_CONNECTS_PER_S = 256  # guest-initiated vsock connects the supervisor makes for one worker
STOP_TIMEOUT_S = 5.0
UPDATE_TIMEOUT_S = 5.0
# How long an API thread waits for the monitor thread to take its command: the monitor may be
# busy starting a replacement worker (up to READY_TIMEOUT_S).
COMMAND_TIMEOUT_S = READY_TIMEOUT_S + UPDATE_TIMEOUT_S
LATE_REPLY_GRACE_S = 60.0  # a reply this late after its request timed out is hostile
CONNECTION_GRACE_S = 0.05  # see _await_disconnected
RESTART_RETRY_S = 0.5  # after an error in the supervisor's own restart code
MESSAGES_PER_WORKER_ROUND = 32  # fair draining: a round reads at most this many per worker
MAX_REASON, MAX_DETAIL = 1000, 16384  # what a worker's Exited may put in GET / and the log
VCPU = "vcpu"

ExitCallback = Callable[[int, str], None]
T = TypeVar("T")
Limits = dict[str, Any] | None  # the API's RateLimiter body


class VmStartError(Exception):
    """The microVM could not start; the message is fit for an API `fault_message`."""


class DeviceUpdateError(Exception):
    """A run-time device update was refused or its worker could not apply it."""


class FaultError(Exception):
    """A fault-injection request was refused; the message is fit for an API `fault_message`."""


@dataclasses.dataclass
class DeviceSlot:
    """What the supervisor keeps of one device for its whole life, to restart its worker.

    Only the monitor thread changes a slot, once the microVM runs: API threads post their
    changes to it (`MicroVm._post`), so a replacement worker is spawned from a plan nobody
    changes under it."""

    plan: DevicePlan  # with the supervisor's own copies of the fds
    state_fd: int  # the state area (shared.devstate); -1 for kinds that cannot restart
    tracker: RestartTracker
    history: RestartHistory = dataclasses.field(default_factory=RestartHistory)
    restart_at: float | None = None
    exhausted: bool = False  # the next worker only sets DEVICE_NEEDS_RESET
    kept_sockets: KeptSockets | None = None  # vsock: host sockets its connections survive on

    def close(self) -> None:
        self.plan.close()
        if self.kept_sockets is not None:
            self.kept_sockets.close()
        if self.state_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.state_fd)
            self.state_fd = -1


@dataclasses.dataclass
class PendingUpdate:
    """A run-time update sent to a worker, until its `UpdateResult` (monitor thread only)."""

    handle: WorkerHandle | None  # None until the monitor thread has looked it up
    what: str  # "block worker of drive rootfs", for errors
    deadline: float
    future: Future[None]
    fd: int = -1  # passed with the request: the supervisor's copy, kept on success
    on_ok: Callable[[], None] | None = None  # what success changes in the device's slot

    def fail(self, why: str) -> None:
        """Close the fd and give the API thread `why` (a no-op once answered)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if not self.future.done():
            self.future.set_exception(DeviceUpdateError(why))


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


class Launcher:
    """Forks workers for microVMs. Create it first thing in `main()`."""

    def __init__(self, zygote: Zygote, run_dir: str) -> None:
        self.zygote = zygote
        self.run_dir = run_dir
        self._count = 0
        self.seccomp_kills = SeccompKillLog.open()  # which syscall a filter killed a worker for

    @classmethod
    def start(cls, seccomp: bool = True) -> Launcher:
        zygote = Zygote.start(seccomp)  # seccomp False: --no-seccomp
        run_dir = tempfile.mkdtemp(prefix="embervm-")
        return cls(zygote, run_dir)

    def start_vm(self, spec: VmSpec, console_out: BinaryIO, on_exit: ExitCallback) -> MicroVm:
        """Lay out devices and memory, spawn the workers, wait until the guest runs."""
        self._count += 1
        try:
            kvm_fd = open_kvm()
        except KvmError as e:
            raise VmStartError(str(e)) from None
        devices: list[DevicePlan] = []
        try:
            Kvm(kvm_fd).check()
            devices = plan_devices(spec)
            plan = build_guest(spec, devices)
        except (KvmError, BootError, OSError, ValueError) as e:
            os.close(kvm_fd)
            for device in devices:
                device.close()
            if any(d.kind == "vsock" for d in devices):
                remove_vsock_socket(spec)  # ours: plan_devices created it
            raise VmStartError(str(e)) from None
        vm = MicroVm(self, spec, console_out, on_exit, f"{self.run_dir}/vm{self._count}")
        try:
            vm._start(kvm_fd, plan, devices)
        finally:
            os.close(kvm_fd)
            os.close(plan.memfd)
            for device in devices:
                device.close()
        vm.cmdline = plan.cmdline
        return vm

    def shutdown(self) -> None:
        self.zygote.shutdown()
        self.seccomp_kills.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)


class MicroVm:
    """A running microVM as the supervisor sees it."""

    def __init__(
        self, launcher: Launcher, spec: VmSpec, console_out: BinaryIO, on_exit: ExitCallback, prefix: str
    ) -> None:
        self.launcher = launcher
        self.spec = spec
        self.cmdline = ""
        self.state = "Starting"
        self.exit_code: int | None = None
        self.exit_reason: str | None = None
        self.exit_detail = ""  # evidence for a failed guest, e.g. a register dump
        self._console_out = console_out
        self._on_exit = on_exit
        self._prefix = prefix
        self._endpoint = f"ipc://{prefix}-ctl"
        self._ctx = zmq.Context()
        self._ctl = self._ctx.socket(zmq.ROUTER)
        self._ctl.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._ctl.setsockopt(zmq.LINGER, 0)
        self._ctl.setsockopt(zmq.MAXMSGSIZE, p.MAX_MESSAGE_BYTES)  # libzmq drops a peer that sends more
        self._ctl.bind(self._endpoint)
        self._cond = threading.Condition()
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()  # run by the monitor
        self._inbox_closed = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._workers: dict[bytes, WorkerHandle] = {}
        self._request_ids = itertools.count(1)
        self._requests: dict[int, PendingUpdate] = {}  # by request id (monitor thread only)
        self.trust = TrustCounters()  # what workers sent that was refused (embervm_monitor)
        self._worker_logs = WorkerLogRelay(log, self.trust)
        self._error_log_bucket = TokenBucket(10, 10, 1000)  # the monitor's own error lines
        self._deferred_outcome: tuple[int, str] | None = None  # see _keep_outcome
        self._console: socket.socket | None = None
        self._thread = threading.Thread(target=self._monitor, name="vm-monitor", daemon=True)
        self._seccomp_filters: dict[str, Filter] | None = None  # --seccomp-filter, by worker kind
        self._seccomp_faults = 0
        self._mmds_workers: list[str] = []  # net workers serving MMDS (update_mmds)
        self.policy = RestartPolicy.from_dict(spec.restart_policy)
        self.failed = False  # the vCPU worker died (not a guest exit)
        self._memfd = -1  # the supervisor's copy of guest memory's fd, for replacement workers
        self._slots: dict[str, DeviceSlot] = {}
        self._faults: dict[str, FaultEntry] = {}  # by worker name
        self._poller = zmq.Poller()
        self._pidfds: dict[int, WorkerHandle] = {}
        self._stderrs: dict[int, WorkerStderr] = {}
        self._vsock_listeners: dict[int, tuple[DeviceSlot, socket.socket]] = {}  # fd -> its slot, our dup

    # --- start-up -------------------------------------------------------------------------
    def _start(self, kvm_fd: int, plan: GuestPlan, devices: list[DevicePlan]) -> None:
        mmio: dict[str, socket.socket] = {}  # device name -> the vCPU worker's end of its MMIO channel
        try:
            self._memfd = os.dup(plan.memfd)
            for device in devices:
                self._keep(device)
            for device in devices:
                mmio[device.name] = self._spawn_device_worker(self._slots[device.name].plan, self._memfd)
            self._spawn_vcpu_worker(kvm_fd, plan.memfd, plan.vcpu_args, devices, mmio)
        except VmStartError:
            self._abort_start()
            raise
        finally:
            for channel in mmio.values():
                channel.close()  # the vCPU worker holds its own copies
        self.state = "Running"
        self._thread.start()

    def _keep(self, device: DevicePlan) -> None:
        """The supervisor's own copies of a device's fds (the vCPU worker keeps its own too),
        and its state area: what a replacement worker is given."""
        kept = dataclasses.replace(
            device,
            backend_fds=[os.dup(fd) for fd in device.backend_fds],
            queue_fds=[os.dup(fd) for fd in device.queue_fds],
            irqfd=os.dup(device.irqfd),
        )
        state_fd = create_state_memfd(device.name) if device.device_kind.restartable else -1
        policy = RestartPolicy.from_dict(self.spec.restart_policy, device.device_id)
        self._slots[device.name] = DeviceSlot(kept, state_fd, RestartTracker(policy))
        if device.kind == "vsock" and RESUME_CONNECTIONS:
            self._slots[device.name].kept_sockets = KeptSockets()

    def _spawn(self, kind: str, name: str, args: dict[str, Any], fds: list[int], what: str) -> WorkerHandle:
        namespaces = not self.spec.no_namespaces
        if not namespaces:
            log.warning("namespaces are OFF (--no-namespaces): the %s worker sees the host's files and sockets", kind)
        stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            seccomp = self._seccomp_settings(kind)
            full_args = {**args, "name": name, "seccomp": seccomp}
            pid = self.launcher.zygote.spawn(kind, name, full_args, fds, namespaces=namespaces, stderr_fd=stderr_w)
        except (ZygoteError, OSError, PolicyError) as e:
            os.close(stderr_r)
            raise VmStartError(f"cannot start the {what}: {e}") from None
        finally:
            os.close(stderr_w)
        handle = WorkerHandle(name, kind, pid, os.pidfd_open(pid), stderr=WorkerStderr(name, pid, stderr_r))
        with self._cond:
            old = self._workers.get(handle.identity)
            slot = self._slots.get(name)
            if slot is not None:
                handle.history = slot.history
                if old is not None:  # a replacement: the dead worker's counters join the device's
                    slot.history.retire(old.metrics)
            self._workers[handle.identity] = handle
        return handle

    def _seccomp_settings(self, kind: str) -> dict[str, Any]:
        """The "seccomp" argument of a worker of `kind` (see shared.confine)."""
        spec = self.spec
        if spec.no_seccomp:
            log.warning("seccomp is OFF (--no-seccomp): the %s worker runs without a syscall filter", kind)
        elif spec.seccomp_filter and self._seccomp_filters is None:
            self._seccomp_filters = load_filter_file(spec.seccomp_filter)
        return settings_for(kind, spec.no_seccomp, self._seccomp_filters, spec.seccomp_test_hooks).to_arg()

    def test_syscall(self, worker: str, what: str) -> None:
        """Tests only: ask `worker` to attempt a forbidden syscall (armed by VmSpec.seccomp_test_hooks)."""
        self._command(p.TestSyscall(what), worker.encode())

    def test_send_raw(self, worker: str, frames: list[bytes]) -> None:
        """Tests only: make device worker `worker` send `frames` to the supervisor as they are
        (armed by VmSpec.seccomp_test_hooks, like test_syscall)."""
        self._command(p.TestSendRaw(frames), worker.encode())

    def _spawn_device_worker(
        self, device: DevicePlan, memfd: int, restore: bool = False, needs_reset: bool = False
    ) -> socket.socket:
        """Any virtio device's worker, under the spawn contract (`shared.spawn.DeviceSpawn`):
        the plan's fds and args + mem_size and the control endpoint (+ its state area and the
        restart flags). Returns the vCPU worker's end of the new MMIO channel."""
        mine, theirs = fdpass.channel_pair()
        mmio_vcpu, mmio_device = mmio_channel_pair()
        slot = self._slots.get(device.name)
        spawn = DeviceSpawn(
            device.device_kind,
            memfd=memfd,
            irqfd=device.irqfd,
            queue_fds=device.queue_fds,
            backend_fds=device.backend_fds,
            fd_channel=theirs.fileno(),
            mmio_channel=mmio_device.fileno(),
            args={**device.args, "mem_size": self.spec.mem_size, "control_endpoint": self._endpoint},
            state_fd=slot.state_fd if slot is not None else -1,
            restore=restore,
            needs_reset=needs_reset,
        )
        try:
            try:
                args, fds = spawn.to_zygote()
            except ValueError as e:
                raise VmStartError(f"cannot start the {device.what}: {e}") from None
            handle = self._spawn(device.kind, device.name, args, fds, device.what)
        except VmStartError:
            mine.close()
            mmio_vcpu.close()
            raise
        finally:
            theirs.close()
            mmio_device.close()  # only the worker holds it: its death closes the channel
        if restore and slot is not None and slot.kept_sockets is not None:
            try:
                slot.kept_sockets.hand_over(mine)  # the connections it resumes
            except OSError as e:
                log.error("cannot hand the %s its kept host sockets: %s", device.what, e)
        handle.device_id, handle.fd_channel = device.device_id, mine
        handle.metric_groups = device.device_kind.metric_groups(device.device_id, device.args)
        if device.kind == NET.name and device.args.get("mmds"):
            self._mmds_workers.append(device.name)
        if device.kind == BLOCK.name:
            handle.drive_id = device.device_id
        try:
            self._await_ready(handle)
        except VmStartError:
            mmio_vcpu.close()
            raise
        handle.last_heartbeat = time.monotonic()
        return mmio_vcpu

    def _spawn_vcpu_worker(
        self,
        kvm_fd: int,
        memfd: int,
        vcpu_args: dict[str, object],
        devices: list[DevicePlan],
        mmio: dict[str, socket.socket],
    ) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._console = mine
        channel_mine, channel_theirs = fdpass.channel_pair()
        spawn = VcpuSpawn(
            kvm_fd,
            memfd,
            theirs.fileno(),
            channel_theirs.fileno(),
            [VcpuDevice(d.name, d.base, d.gsi, mmio[d.name].fileno(), d.queue_fds, d.irqfd) for d in devices],
            {**vcpu_args, "control_endpoint": self._endpoint},
        )
        args, fds = spawn.to_zygote()
        try:
            handle = self._spawn("vcpu", VCPU, args, fds, "vCPU worker")
        except VmStartError:
            channel_mine.close()
            raise
        finally:
            theirs.close()
            channel_theirs.close()
        handle.fd_channel = channel_mine
        handle.metric_groups = VCPU_GROUPS
        self._await_ready(handle)

    def _await_ready(self, handle: WorkerHandle) -> None:
        """Wait for `handle`'s Ready; VmStartError if it exits or stays silent instead."""
        poller = zmq.Poller()
        poller.register(self._ctl, zmq.POLLIN)
        poller.register(handle.pidfd, zmq.POLLIN)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while (remaining := deadline - time.monotonic()) > 0:
            events = dict(poller.poll(timeout=int(remaining * 1000) + 1))
            if self._ctl in events:
                received = self._recv()
                if received is None:
                    continue
                sender, msg = received
                if sender is handle and isinstance(msg, p.Ready):
                    return
                if sender is handle and isinstance(msg, p.Exited):
                    if msg.detail:
                        reason, detail = escape(msg.reason[:MAX_REASON]), escape(msg.detail[:MAX_DETAIL])
                        log.error("[%s worker pid %d] %s: %s", sender.name, sender.pid, reason, detail)
                    raise VmStartError(msg.reason)
                self._keep_outcome(self._apply(sender, msg))
            elif handle.pidfd in events:
                status = self._reap(handle)
                how = self._how(handle, status)
                raise VmStartError(f"the {handle.name} worker {how} before it was ready")
        raise VmStartError(f"the {handle.name} worker did not start within {READY_TIMEOUT_S:g} s")

    def _abort_start(self) -> None:
        for handle in self._workers.values():
            if handle.alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(handle.pid, signal.SIGKILL)
                self._reap(handle)
        self._close()

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
        with self._cond:
            live = [w for w in self._workers.values() if w.alive]
            seqs = {w.name: w.metrics_seq for w in live}
        if self.state != "Exited":
            for handle in live:
                self._command(p.FlushMetrics(), handle.identity)
            with self._cond:
                self._cond.wait_for(
                    lambda: self.state == "Exited" or all(w.metrics_seq > seqs[w.name] or not w.alive for w in live),
                    timeout=1.0,
                )
        with self._cond:
            merged = merge_metrics(list(self._workers.values()))
            merged["embervm_workers"]["vcpu_failed"] = int(self.failed)
            merged["embervm_monitor"] = self.trust.as_group()
            return {**merged, "seccomp": {"num_faults": self._seccomp_faults}}

    def workers(self) -> list[dict[str, object]]:
        """Each worker process (the vCPU worker first) with its pid and whether it lives."""
        with self._cond:
            handles = sorted(self._workers.values(), key=lambda w: w.name != VCPU)
            return [w.describe() for w in handles]

    def stop(self) -> None:
        """Stop the guest and its workers (idempotent)."""
        if self.state != "Exited":
            self._command(p.Stop())
            if self.wait(STOP_TIMEOUT_S) is None:
                vcpu = self._workers.get(VCPU.encode())
                if vcpu is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(vcpu.pid, signal.SIGKILL)
                self.wait(STOP_TIMEOUT_S)

    def wait(self, timeout: float | None = None) -> int | None:
        with self._cond:
            self._cond.wait_for(lambda: self.state == "Exited", timeout=timeout)
            return self.exit_code

    # --- fault injection (PUT/DELETE/GET /faults, --enable-fault-injection) --------------------------
    def _slot_for(self, device_id: str) -> DeviceSlot:
        for slot in self._slots.values():
            if device_id in (slot.plan.device_id, slot.plan.name):
                return slot
        raise FaultError(f"no device {device_id!r} in this microVM")

    def inject_fault(self, device_id: str, spec: FaultSpec) -> None:
        """Arm `spec` on the device's worker (it replaces the device's previous fault); the
        supervisor re-arms what remains of it on every replacement worker."""
        if not self.spec.enable_fault_injection:
            raise FaultError(NOT_ENABLED)
        slot = self._slot_for(device_id)
        kinds = slot.plan.device_kind.fault_kinds
        if spec.kind not in kinds:
            kind = slot.plan.kind
            raise FaultError(f"{kind} devices do not implement {spec.kind!r} faults (only {', '.join(kinds)})")
        if self.state == "Exited":
            raise FaultError("the microVM has stopped")
        entry = FaultEntry(slot.plan.device_id, slot.plan.name, spec)
        with self._cond:
            self._faults[slot.plan.name] = entry
        log.warning("fault injection: %s on the %s worker", spec.model_dump(), slot.plan.name)
        self._command(self._fault_message(entry), slot.plan.name.encode())

    def clear_fault(self, device_id: str) -> bool:
        """Disarm the device's fault; False if it had none."""
        slot = self._slot_for(device_id)
        with self._cond:
            entry = self._faults.pop(slot.plan.name, None)
        if self.state != "Exited":
            self._command(p.InjectFault("", 0, 1.0, 0, 0), slot.plan.name.encode())
        return entry is not None

    def faults(self) -> list[dict[str, Any]]:
        with self._cond:
            return [entry.describe() for entry in self._faults.values()]

    @staticmethod
    def _fault_message(entry: FaultEntry) -> p.InjectFault:
        spec = entry.spec
        count = 0 if spec.count == 0 else entry.remaining
        return p.InjectFault(spec.kind, spec.after_requests, float(spec.probability), count, spec.delay_ms)

    # --- run-time device updates (PATCH /drives, PATCH /network-interfaces, PUT /mmds) ------------
    # API threads never touch a device's slot or its worker's channels: they post the update to
    # the monitor thread (`_update`), which sends it, and on the worker's answer changes the slot
    # (what a replacement worker starts with) before the API thread is told.
    def update_net(self, iface_id: str, rx_rate_limiter: Limits = None, tx_rate_limiter: Limits = None) -> None:
        """Give interface `iface_id`'s worker new rx/tx rate limiters (buckets not given are kept)."""
        name = NET.worker_name(iface_id)
        if name not in self._slots:
            raise DeviceUpdateError(f"no network interface {iface_id!r} in this microVM")

        def keep() -> None:  # a replacement worker starts with the limiters as updated
            args = self._slots[name].plan.args
            for key, given in (("rx_rate_limiter", rx_rate_limiter), ("tx_rate_limiter", tx_rate_limiter)):
                if given:
                    kept = dict(args.get(key) or {})
                    kept.update({k: v for k, v in given.items() if k in ("bandwidth", "ops") and v is not None})
                    args[key] = kept

        what = f"net worker of interface {iface_id}"
        self._update(name, what, lambda rid: p.UpdateNetRateLimiters(rid, rx_rate_limiter, tx_rate_limiter), keep)

    def update_mmds(self, document: dict[str, Any] | None) -> None:
        """Push a new MMDS snapshot to every net worker that serves MMDS (after PUT/PATCH /mmds);
        a worker being replaced gets it as it starts."""
        data = json.dumps(document).encode() if document is not None else b""
        self._post(lambda: self._set_mmds(data))

    def _set_mmds(self, data: bytes) -> None:
        for name in self._mmds_workers:
            slot = self._slots.get(name)
            if slot is not None and slot.plan.args.get("mmds"):  # what a replacement worker starts with
                slot.plan.args["mmds"] = {**slot.plan.args["mmds"], "document": data}
            handle = self._workers.get(name.encode())
            if handle is not None and handle.alive and self.state != "Exited":
                self._send(handle.identity, p.MmdsData(data))

    def vsock_transport_reset(self) -> None:
        """Make the vsock worker drop its connections and send the guest
        VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (what a snapshot restore needs)."""
        name = VSOCK.worker_name(VSOCK.name)
        if name not in self._slots:
            raise DeviceUpdateError("no running vsock device in this microVM")
        self._update(name, "vsock worker", VsockTransportReset)

    def update_drive(
        self, drive_id: str, path_on_host: str | None = None, rate_limiter: dict[str, Any] | None = None
    ) -> None:
        """Give drive `drive_id`'s worker a new backing file and/or rate limiter, and wait for it."""
        name = BLOCK.worker_name(drive_id)
        drive = next((d for d in self.spec.drives if d.drive_id == drive_id), None)
        if name not in self._slots or drive is None:
            raise DeviceUpdateError(f"no drive {drive_id!r} in this microVM")
        what = f"block worker of drive {drive_id}"
        if path_on_host is not None:
            try:
                fd = open_backing_file(drive, path_on_host)
            except BootError as e:
                raise DeviceUpdateError(str(e)) from None
            self._update(name, what, p.ReplaceBackingFile, fd=fd, on_ok=lambda: self._keep_backend(name, fd))
            drive.path_on_host = path_on_host
        if rate_limiter is not None:
            limits = {k: rate_limiter.get(k) for k in ("bandwidth", "ops")}

            def keep() -> None:  # a replacement worker starts with the limiter as updated
                args = self._slots[name].plan.args
                kept = dict(args.get("rate_limiter") or {})
                kept.update({k: v for k, v in limits.items() if v is not None})
                args["rate_limiter"] = kept

            self._update(name, what, lambda rid: p.UpdateRateLimiter(rid, limits["bandwidth"], limits["ops"]), keep)

    def _keep_backend(self, name: str, fd: int) -> None:
        """A device's new backend fd (PATCH): the supervisor's copy for replacement workers."""
        slot = self._slots[name]
        for old in slot.plan.backend_fds:
            with contextlib.suppress(OSError):
                os.close(old)
        slot.plan.backend_fds = [fd]

    def _update(
        self,
        name: str,
        what: str,
        make: Callable[[int], p.Message],
        on_ok: Callable[[], None] | None = None,
        fd: int = -1,
    ) -> None:
        """Have the monitor thread send worker `name` the update `make(request_id)` (with `fd`
        on its fd channel) and wait for the answer; `on_ok` runs in the monitor thread on
        success. The fd is the supervisor's from here on (kept by `on_ok` or closed)."""
        future: Future[None] = Future()
        if not self._post(lambda: self._start_update(name, what, make, on_ok, fd, future)):
            if fd >= 0:
                os.close(fd)
            raise DeviceUpdateError("the microVM has stopped")
        try:
            future.result(timeout=COMMAND_TIMEOUT_S)
        except FutureTimeout:
            if future.cancel():  # the monitor never took it; it closes the fd when it does
                raise DeviceUpdateError(f"the {what} did not answer") from None
            try:  # sent: the monitor's own deadline (UPDATE_TIMEOUT_S) ends it
                future.result(timeout=UPDATE_TIMEOUT_S + 1.0)
            except FutureTimeout:
                raise DeviceUpdateError(f"the {what} did not answer") from None

    def _start_update(
        self,
        name: str,
        what: str,
        make: Callable[[int], p.Message],
        on_ok: Callable[[], None] | None,
        fd: int,
        future: Future[None],
    ) -> None:
        """In the monitor thread: send the update and remember it until its answer."""
        pending = PendingUpdate(None, what, time.monotonic() + UPDATE_TIMEOUT_S, future, fd, on_ok)
        if not future.set_running_or_notify_cancel():
            pending.fail("cancelled")
            return
        try:
            handle = pending.handle = self._workers[name.encode()]
            if not handle.alive or handle.distrusted or self.state == "Exited":
                pending.fail(f"the {what} is not running")
                return
            request_id = next(self._request_ids)
            msg = make(request_id)
            if fd >= 0:
                assert handle.fd_channel is not None
                fdpass.send_message(handle.fd_channel, msg, [fd])
            else:
                self._ctl.send_multipart([handle.identity, p.encode(msg)], zmq.NOBLOCK)
        except (OSError, zmq.ZMQError) as e:
            pending.fail(f"cannot reach the {what}: {e}")
            return
        except Exception as e:  # a bug of ours: the API thread is told, the monitor logs it
            pending.fail(f"cannot send the update to the {what}: {e}")
            raise
        self._requests[request_id] = pending

    def _answer(self, handle: WorkerHandle, msg: p.UpdateResult) -> None:
        """A worker's UpdateResult: only for a request sent to that very worker."""
        pending = self._requests.get(msg.request_id)
        if pending is None or pending.handle is not handle:
            self.trust.bad_request_id += 1
            self._distrust(handle, f"a reply to request {msg.request_id}, which was not sent to it")
            return
        del self._requests[msg.request_id]
        if pending.future.done():
            return  # answered after its deadline: the API was told it failed
        if not msg.ok:
            pending.fail(escape(msg.error[:1000]))
            return
        try:
            if pending.on_ok is not None:
                pending.on_ok()
            pending.future.set_result(None)
        except Exception as e:
            pending.fail(f"the {pending.what} applied the update, but the supervisor could not keep it: {e}")
            raise

    def _expire_requests(self, now: float) -> None:
        for request_id, pending in list(self._requests.items()):
            if now >= pending.deadline:
                pending.fail(f"the {pending.what} did not answer")
            if now >= pending.deadline + LATE_REPLY_GRACE_S:
                del self._requests[request_id]

    def _forget_requests(self, handle: WorkerHandle) -> None:
        """`handle` died: fail what it did not answer."""
        for request_id, pending in list(self._requests.items()):
            if pending.handle is handle:
                pending.fail(f"the {pending.what} died")
                del self._requests[request_id]

    # --- monitor thread ---------------------------------------------------------------------------
    def _post(self, work: Callable[[], None]) -> bool:
        """Have the monitor thread run `work` (False: the microVM has stopped, nothing runs it)."""
        with self._cond:
            if self._inbox_closed:
                return False
            self._inbox.put(work)
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"c")
        return True

    def _command(self, msg: p.Message, to: bytes = VCPU.encode()) -> None:
        self._post(lambda: self._send(to, msg))

    def _command_and_wait(self, msg: p.Message, done: Callable[[], bool]) -> None:
        self._command(msg)
        with self._cond:
            if not self._cond.wait_for(done, timeout=STOP_TIMEOUT_S):
                raise TimeoutError(f"the vCPU worker did not answer {msg.TYPE!r}")

    def _recv(self) -> tuple[WorkerHandle, p.Message] | None:
        """One message from a worker, checked (`controlplane.worker_trust`); None when it was
        dropped, and its sender killed if it was hostile."""
        frames = [self._ctl.recv(copy=True)]
        count = 1
        while self._ctl.getsockopt(zmq.RCVMORE):
            frame = self._ctl.recv(copy=True)
            count += 1
            if count <= MAX_FRAMES:
                frames.append(frame)  # beyond that, frames are read and dropped at once
        handle = self._workers.get(frames[0])
        if handle is None:
            self.trust.unknown_identity += 1
            return None
        if handle.distrusted:
            return None  # it is being killed
        if count != MAX_FRAMES:
            self.trust.malformed += 1
            self._distrust(handle, f"a message of {count - 1} frames, not one")
            return None
        try:
            msg = p.decode(frames[1])
        except p.ProtocolError as e:
            self.trust.malformed += 1
            self._distrust(handle, f"a malformed message ({e})")
            return None
        why = forbidden(handle, msg)
        if why is not None:
            self.trust.forbidden_type += 1
            self._distrust(handle, why)
            return None
        return handle, msg

    def _distrust(self, handle: WorkerHandle, what: str) -> None:
        """Kill a worker that sent `what`: its death is handled as any other (a device's worker
        is replaced, the vCPU worker's ends the microVM)."""
        if handle.distrusted:
            return
        with self._cond:
            handle.distrusted = escape(what)
            self.trust.workers_killed += 1
        log.error("the %s worker (pid %d) sent %s: killing it", handle.name, handle.pid, handle.distrusted)
        with contextlib.suppress(ProcessLookupError):
            os.kill(handle.pid, signal.SIGKILL)

    def _watch(self, handle: WorkerHandle) -> None:
        self._pidfds[handle.pidfd] = handle
        self._poller.register(handle.pidfd, zmq.POLLIN)
        if handle.stderr is not None:
            self._stderrs[handle.stderr.fd] = handle.stderr
            self._poller.register(handle.stderr.fd, zmq.POLLIN)

    def _read_stderr(self, fd: int) -> None:
        """A worker wrote to its stderr: log it, labelled and bounded (WorkerStderr)."""
        stderr = self._stderrs[fd]
        lines = stderr.read_lines()
        for line in [stderr.rest()] if lines is None else lines:
            if line:
                self._worker_logs.relay(stderr.name, stderr.pid, "warning", line)
        if lines is None:
            self._poller.unregister(fd)
            del self._stderrs[fd]

    def _monitor(self) -> None:
        """The monitor loop. Nothing a worker does, and no bug of ours, may end it: each step
        runs guarded (`_guarded`); only the vCPU worker's end does."""
        poller = self._poller
        poller.register(self._ctl, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        assert self._console is not None
        poller.register(self._console.fileno(), zmq.POLLIN)
        for handle in self._workers.values():
            self._watch(handle)
        for slot in self._slots.values():
            if slot.kept_sockets is not None:  # vsock: the supervisor accepts host connections
                listener = socket.socket(fileno=os.dup(slot.plan.backend_fds[0]))
                self._vsock_listeners[listener.fileno()] = (slot, listener)
                poller.register(listener.fileno(), zmq.POLLIN)
        outcome: tuple[int, str] | None = None
        while outcome is None:
            outcome = self._guarded("monitoring", self._monitor_round, None)
        self._guarded("stopping the device workers", self._stop_device_workers, None)
        vcpu = self._workers[VCPU.encode()]
        if vcpu.alive:
            self._guarded("reaping the vCPU worker", lambda: self._reap(vcpu), None)
        self._guarded("forwarding console output", self._pump_console, None)
        self._finish(*outcome)

    def _monitor_round(self) -> tuple[int, str] | None:
        """One turn of the monitor loop: wait, then serve what is ready."""
        assert self._console is not None
        console = self._console.fileno()
        events = self._guarded("polling", lambda: dict(self._poller.poll(self._next_timer_ms())), None)
        if events is None:
            time.sleep(0.01)  # a poll that fails at once must not spin
            events = {}
        if console in events:
            self._guarded("forwarding console output", self._pump_console, None)
        if self._wake_r in events:
            self._guarded("taking API commands", self._run_inbox, None)
        outcome: tuple[int, str] | None = None
        if self._ctl in events:
            outcome = self._guarded("reading worker messages", self._drain_messages, None)
        for fd in [fd for fd in self._stderrs if fd in events]:
            self._guarded("reading a worker's stderr", lambda fd=fd: self._read_stderr(fd), None)  # type: ignore[misc]
        for fd in [fd for fd in self._vsock_listeners if fd in events]:
            self._guarded("accepting vsock host connections", lambda fd=fd: self._accept_vsock(fd), None)  # type: ignore[misc]
        for fd in [fd for fd in self._pidfds if fd in events]:
            outcome = self._guarded_death(self._pidfds.pop(fd)) or outcome
        if outcome is None:
            self._guarded("running timers", self._run_timers, None)
        outcome, self._deferred_outcome = outcome or self._deferred_outcome, None
        return outcome

    def _guarded_death(self, handle: WorkerHandle) -> tuple[int, str] | None:
        """A worker died. Whatever goes wrong in handling it, a dead vCPU worker ends the
        microVM and a dead device worker is replaced."""
        self._guarded("unwatching a dead worker", lambda: self._poller.unregister(handle.pidfd), None)
        outcome: list[tuple[int, str] | None] = []

        def handle_death() -> bool:
            outcome.append(self._worker_died(handle))
            return True

        if self._guarded(f"handling the {handle.name} worker's death", handle_death, False):
            return outcome[0]
        if handle.name == VCPU:
            self.failed = True
            return exitcodes.GENERIC_ERROR, "vCPU worker died"
        slot = self._slots.get(handle.name)
        if slot is not None and slot.state_fd >= 0 and slot.restart_at is None:
            with self._cond:
                handle.alive = False
                self._cond.notify_all()
            self._guarded("scheduling a restart", lambda: self._schedule_restart(slot, handle, "exit", "died"), None)
        return None

    def _guarded(self, what: str, step: Callable[[], T], failed: T) -> T:
        """One step of the monitor loop: an exception is logged (rate-limited) and counted,
        and the loop goes on with `failed` for the step's result."""
        try:
            return step()
        except Exception:
            with self._cond:
                self.trust.monitor_errors += 1
            if self._error_log_bucket.reduce(1):
                log.exception("monitor thread: error while %s (the monitor carries on)", what)
            return failed

    def _run_inbox(self) -> None:
        """Run what API threads posted (`_post`), in order; one failing does not stop the rest."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 256):
                pass
        while True:
            try:
                work = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._guarded("running an API command", work, None)

    def _drain_messages(self) -> tuple[int, str] | None:
        """Apply what the workers sent, in rounds of at most MESSAGES_PER_WORKER_ROUND per
        worker: the ROUTER queues its peers fairly (round-robin, one message each in turn),
        so a flooding worker gets its share of a round and every other worker gets theirs,
        and the loop gets back to deaths, timers and the console between rounds."""
        outcome = None
        budget = MESSAGES_PER_WORKER_ROUND * max(1, len(self._workers))  # dropped messages count too
        taken: dict[str, int] = {}
        while budget > 0 and self._ctl.poll(0):
            budget -= 1
            received = self._recv()
            if received is None:
                continue
            outcome = self._apply(*received) or outcome
            name = received[0].name
            taken[name] = taken.get(name, 0) + 1
            if taken[name] >= MESSAGES_PER_WORKER_ROUND:
                break  # the others had their turns in between (round-robin): the round is over
        return outcome

    # --- restarts ----------------------------------------------------------------------------
    def _next_timer_ms(self) -> int | None:
        """Until the next restart or update deadline is due or a worker's heartbeat is late
        (None: no timer)."""
        now = time.monotonic()
        due = [slot.restart_at for slot in self._slots.values() if slot.restart_at is not None]
        due += [r.deadline for r in self._requests.values() if not r.future.done()]
        for handle in self._workers.values():
            if handle.name in self._slots and handle.alive and not handle.hung:
                due.append(handle.last_heartbeat + self._slots[handle.name].tracker.policy.hang_timeout_s)
        if not due:
            return None
        return max(0, int((min(due) - now) * 1000) + 1)

    def _run_timers(self) -> None:
        now = time.monotonic()
        self._expire_requests(now)
        for handle in list(self._workers.values()):
            late = now - handle.last_heartbeat
            slot = self._slots.get(handle.name)
            if slot is not None and handle.alive and not handle.hung and late > slot.tracker.policy.hang_timeout_s:
                log.error("the %s worker (pid %d) is hung (%.1f s without a heartbeat)", handle.name, handle.pid, late)
                handle.hung = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(handle.pid, signal.SIGKILL)
        for slot in self._slots.values():
            if slot.restart_at is not None and slot.restart_at <= now:
                slot.restart_at = None
                self._restart_or_retry(slot)

    def _restart_or_retry(self, slot: DeviceSlot) -> None:
        def restart() -> bool:
            self._restart(slot)
            return True

        if not self._guarded(f"restarting the {slot.plan.name} worker", restart, False):
            slot.restart_at = time.monotonic() + RESTART_RETRY_S  # a bug of ours must not lose a device

    def _restart(self, slot: DeviceSlot) -> None:
        """Start a replacement worker for `slot` (in the monitor thread)."""
        name = slot.plan.name
        old = self._workers[name.encode()]
        if old.alive:
            return  # replaced already (a retry after an error past the spawn)
        self._await_disconnected(old)
        mmio_vcpu: socket.socket | None = None
        try:
            mmio_vcpu = self._spawn_device_worker(slot.plan, self._memfd, restore=True, needs_reset=slot.exhausted)
            failure = None
        except VmStartError as e:
            failure = str(e)
        new = self._workers[name.encode()]
        with self._cond:
            if new is not old:
                new.broken = slot.exhausted
                if old.pidfd in self._pidfds:
                    self._poller.unregister(old.pidfd)
                    del self._pidfds[old.pidfd]
                if old.stderr is not None and old.stderr.fd in self._stderrs:
                    self._read_stderr(old.stderr.fd)  # its last words, then forget the pipe
                    if old.stderr.fd in self._stderrs:
                        self._poller.unregister(old.stderr.fd)
                        del self._stderrs[old.stderr.fd]
                old.close()
            self._cond.notify_all()
        if failure is not None:
            log.error("cannot restart the %s worker: %s", name, failure)
            self._schedule_restart(slot, new, "exit", f"its replacement failed to start: {failure}")
            return
        self._watch(new)
        self._device_up(name, mmio_vcpu)  # the window forwards to the new worker
        entry = self._faults.get(name)
        if entry is not None and entry.active and not slot.exhausted:
            self._send(new.identity, self._fault_message(entry))
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
        deadline = time.monotonic() + timeout
        closing_since: float | None = None
        while (now := time.monotonic()) < deadline:
            self._keep_outcome(self._drain_messages())
            try:
                self._ctl.send_multipart([old.identity, p.encode(p.FlushMetrics())], zmq.NOBLOCK)
                closing_since = None
            except zmq.ZMQError as e:
                if e.errno == zmq.EHOSTUNREACH:
                    closing_since = closing_since or now
                    if now - closing_since >= CONNECTION_GRACE_S:
                        return
            self._ctl.poll(5)  # takes libzmq's commands
        log.warning("the dead %s worker's connection is still open: its replacement may not be heard", old.name)

    def _keep_outcome(self, outcome: tuple[int, str] | None) -> None:
        """An outcome (the vCPU worker's Exited) read outside the loop's own reading: the
        monitor round returns it."""
        if outcome is not None and self._deferred_outcome is None:
            self._deferred_outcome = outcome

    def _device_up(self, name: str, mmio_vcpu: socket.socket | None) -> None:
        """Hand the vCPU worker its end of the replacement's MMIO channel, with DeviceUp."""
        vcpu = self._workers.get(VCPU.encode())
        try:
            if mmio_vcpu is None or vcpu is None or vcpu.fd_channel is None:
                return
            fdpass.send_message(vcpu.fd_channel, p.DeviceUp(name), [mmio_vcpu.fileno()])
        except OSError as e:
            log.error("cannot hand the vCPU worker the %s worker's MMIO channel: %s", name, e)
        finally:
            if mmio_vcpu is not None:
                mmio_vcpu.close()

    def _schedule_restart(self, slot: DeviceSlot, handle: WorkerHandle, cause_kind: str, cause: str) -> None:
        if handle.broken:
            log.error("the %s worker that reported DEVICE_NEEDS_RESET died too: the device is gone", handle.name)
            self._send(VCPU.encode(), p.DeviceDown(handle.name))
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
        with self._cond:
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
        with self._cond:
            for group, values in admit_metrics(handle, groups, self.trust).items():
                target = handle.metrics.setdefault(group, {})
                for key, value in values.items():
                    if value > target.get(key, 0):
                        target[key] = value

    def _death_cause(self, handle: WorkerHandle, slot: DeviceSlot | None, how: str) -> tuple[str, str]:
        """(metric cause, human cause) of a device worker's death."""
        fatal = take_fatal(slot.state_fd) if slot is not None and slot.state_fd >= 0 else 0
        entry = self._faults.get(handle.name)
        if fatal and entry is not None:
            with self._cond:
                entry.fired += 1
                if not entry.active:
                    del self._faults[handle.name]
        if handle.distrusted:
            return "protocol", f"killed by the supervisor: it sent {handle.distrusted}"
        if handle.hung:
            injected = " (injected hang)" if fatal == FATAL_HANG else ""
            timeout = slot.tracker.policy.hang_timeout_s if slot is not None else self.policy.hang_timeout_s
            return "hang", f"hung: no heartbeat for {timeout:g} s{injected}"
        if fatal == FATAL_CRASH:
            return "fault", f"injected crash ({how})"
        if how.startswith("killed by seccomp"):
            return "seccomp", how
        return ("signal" if how.startswith("killed by signal") else "exit"), how

    def _worker_died(self, handle: WorkerHandle) -> tuple[int, str] | None:
        slot = self._slots.get(handle.name)
        if slot is not None and slot.state_fd >= 0 and not handle.broken:
            self._send(VCPU.encode(), p.DeviceRestarting(handle.name))  # its window waits for the new worker
        elif handle.name != VCPU:
            self._send(VCPU.encode(), p.DeviceDown(handle.name))  # its window answers at once from now on
        self._pump_console()
        outcome = self._drain_messages()  # messages sent just before the exit
        status = self._reap(handle)
        self._forget_requests(handle)
        how = self._how(handle, status)
        with self._cond:
            handle.exit_reason = handle.exit_reason or f"{handle.kind} worker {how}"
            self._cond.notify_all()
        if handle.name == VCPU:
            if handle.distrusted:
                self.failed = True
                reason = f"vCPU worker killed by the supervisor: it sent {handle.distrusted}"
                log.error("the vCPU worker (pid %d) was killed: it sent %s", handle.pid, handle.distrusted)
                return exitcodes.GENERIC_ERROR, reason
            if outcome is None and status is not None and os.WIFEXITED(status):
                outcome = self._await_exited(handle)  # it said why before exiting; ZeroMQ may lag the pidfd
            if outcome is None:
                code = describe_wait_status(status)[0] if status is not None else exitcodes.GENERIC_ERROR
                outcome = (code, f"vCPU worker {how}")
                self.failed = True
                log.error("the vCPU worker (pid %d) %s", handle.pid, how)
            return outcome
        if slot is not None and slot.state_fd >= 0 and outcome is None:
            self._last_counters(handle, slot)
            cause_kind, cause = self._death_cause(handle, slot, how)
            with self._cond:
                handle.exit_reason = f"{handle.kind} worker {cause}"
            log.error("the %s worker (pid %d) %s: restarting it under the guest", handle.name, handle.pid, cause)
            self._schedule_restart(slot, handle, cause_kind, cause)
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

    def _await_exited(self, handle: WorkerHandle, timeout: float = 1.0) -> tuple[int, str] | None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and self._ctl.poll(int(left * 1000) + 1):
            received = self._recv()
            outcome = self._apply(*received) if received is not None else None
            if outcome is not None:
                return outcome
        return None

    def _pump_console(self) -> None:
        assert self._console is not None
        while select.select([self._console], [], [], 0)[0]:
            try:
                data = self._console.recv(65536)
            except OSError:
                return
            if not data:
                return
            try:
                self._console_out.write(data)
                self._console_out.flush()
            except (OSError, ValueError):
                pass  # the console reader went away; the guest keeps running

    def _send(self, identity: bytes, msg: p.Message) -> None:
        if self.state == "Exited":
            return  # every worker is gone
        try:
            self._ctl.send_multipart([identity, p.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.error("cannot send %s to the %s worker: %s", msg.TYPE, identity.decode(errors="replace"), e)

    def _apply(self, handle: WorkerHandle, msg: p.Message) -> tuple[int, str] | None:
        with self._cond:
            try:
                return self._apply_locked(handle, msg)
            finally:
                self._cond.notify_all()

    def _apply_locked(self, handle: WorkerHandle, msg: p.Message) -> tuple[int, str] | None:
        """Act on one checked message (`_recv`: its type is one its kind may send)."""
        handle.last_heartbeat = time.monotonic()  # any message shows its loop turns
        if isinstance(msg, p.Heartbeat):
            return None
        if isinstance(msg, p.FaultFired):
            entry = self._faults.get(handle.name)
            if entry is not None:
                entry.fired += 1
                if not entry.active:
                    del self._faults[handle.name]
        elif isinstance(msg, p.Metrics):
            handle.metrics = admit_metrics(handle, msg.groups, self.trust)
            handle.metrics_seq += 1
        elif isinstance(msg, p.Log):
            self._worker_logs.relay(handle.name, handle.pid, msg.level, msg.text)
        elif isinstance(msg, VsockConnect):
            self._broker_vsock_connect(handle, msg)
        elif isinstance(msg, VsockRelease):
            slot = self._slots.get(handle.name)
            if slot is not None and slot.kept_sockets is not None:
                slot.kept_sockets.release(msg.sock_ids)
        elif isinstance(msg, p.UpdateResult):
            self._answer(handle, msg)
        elif isinstance(msg, p.StateChanged):
            if msg.state not in ("Running", "Paused"):
                self.trust.malformed += 1
                self._distrust(handle, f"a state_changed message to state {msg.state[:40]!r}")
                return None
            self.state = msg.state
        elif isinstance(msg, p.Exited):
            if not 0 <= msg.code <= 255:
                self.trust.malformed += 1
                self._distrust(handle, f"an exited message with exit code {msg.code}")
                return None
            if msg.detail:
                detail = escape(msg.detail[:MAX_DETAIL])
                log.error("[%s worker pid %d] %s: %s", handle.name, handle.pid, escape(msg.reason[:MAX_REASON]), detail)
            if handle.name == VCPU:
                self.exit_detail = msg.detail[:MAX_DETAIL] or self.exit_detail
                return msg.code, escape(msg.reason[:MAX_REASON])
            handle.exit_reason = escape(msg.reason[:MAX_REASON])
        return None

    def _accept_vsock(self, fd: int) -> None:
        """Host connections at uds_path: kept, and handed to the vsock worker (controlplane.vsock_sockets)."""
        slot, listener = self._vsock_listeners[fd]
        assert slot.kept_sockets is not None
        handle = self._workers.get(slot.plan.name.encode())
        channel = handle.fd_channel if handle is not None and handle.alive else None
        slot.kept_sockets.accept(listener, channel)

    def _broker_vsock_connect(self, handle: WorkerHandle, msg: VsockConnect) -> None:
        """Connect to `<uds_path>_<port>` for the vsock worker, which has no filesystem and
        may create no socket, and hand it the connected socket (or a refusal) on its fd
        channel. Only a vsock worker may ask, at most VSOCK_CONNECTS_PER_S a second."""
        slot = self._slots.get(handle.name)
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

    def _stop_device_workers(self) -> None:
        """Stop every device worker with the guest: Stop, then SIGKILL for the slow ones."""
        devices = [w for w in self._workers.values() if w.name != VCPU and w.alive]
        for handle in devices:
            self._send(handle.identity, p.Stop())
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for handle in devices:
            if not select.select([handle.pidfd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                log.warning("the %s worker did not stop in time: killing it", handle.name)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(handle.pid, signal.SIGKILL)
            self._reap(handle)
        self._drain_messages()  # their final metrics

    def _how(self, handle: WorkerHandle, status: int | None) -> str:
        """How `handle` ended; a seccomp kill is counted in the `seccomp` metrics group."""
        if status is None:
            return "vanished"
        how = describe_wait_status(status, handle.pid, self.launcher.seccomp_kills)[1]
        if how.startswith("killed by seccomp"):
            with self._cond:
                self._seccomp_faults += 1
        return how

    def _reap(self, handle: WorkerHandle) -> int | None:
        status = self.launcher.zygote.wait_exit(handle.pid, STOP_TIMEOUT_S)
        with self._cond:
            handle.alive = False
            self._cond.notify_all()
        return status

    def _finish(self, code: int, reason: str) -> None:
        self._guarded("removing the vsock socket", lambda: remove_vsock_socket(self.spec), None)  # before "Exited"
        for _, listener in self._vsock_listeners.values():
            listener.close()
        self._vsock_listeners.clear()
        with self._cond:
            self.exit_code, self.exit_reason = code, reason
            vcpu = self._workers[VCPU.encode()]
            vcpu.exit_reason = vcpu.exit_reason or reason
            self.state = "Exited"
            self._inbox_closed = True  # from here on API threads are told at once
            self._cond.notify_all()
        self._run_inbox()  # what was posted before: each finds the microVM stopped
        for pending in self._requests.values():
            pending.fail("the microVM has stopped")
        self._requests.clear()
        self._guarded("closing the microVM's resources", self._close, None)
        try:
            self._on_exit(code, reason)
        except Exception:
            log.exception("on_exit callback failed")

    def _close(self) -> None:
        self._ctl.close(linger=0)
        self._ctx.term()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        for handle in self._workers.values():
            handle.close()
        if self._console is not None:
            self._console.close()
        for slot in self._slots.values():
            slot.close()
        if self._memfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._memfd)
            self._memfd = -1
        remove_vsock_socket(self.spec)  # the listening socket at uds_path is the supervisor's
