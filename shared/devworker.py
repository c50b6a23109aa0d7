"""The generic half of a device worker process: one epoll loop around one virtio device.

Every device worker (block, net, vsock) is the same loop; only its hooks
differ. Inputs, each an fd in the loop, dispatched by token:

    token        fd                                 what arrives
    CONTROL      ZeroMQ DEALER to the supervisor    Stop, FlushMetrics, device updates
    MMIO         SEQPACKET socket to the vCPU worker MmioRead/MmioWrite from vCPU threads
    FD_CHANNEL   SEQPACKET socket (shared.fdpass)   messages carrying fds (a new disk)
    QUEUE + i    queue i's ioeventfd                the guest kicked queue i (data path)

plus timers (`loop.add_timer`: rate limiters, the periodic metrics push, the heartbeat the
supervisor's hang watchdog listens for). The data path
is ioeventfd -> `transport.notify_queue(i)` -> device -> irqfd: ZeroMQ is only for
register accesses and control. The loop blocks in epoll; nothing polls.

The MMIO channel is one end of a socketpair the supervisor made (the vCPU worker holds the
other): the worker never connects to anything once it has left the host's filesystem
(`shared.isolation`). Only the ZeroMQ control socket is connected by path, and that happens
before the worker enters its empty root; it never reconnects.

ZeroMQ's own fd (`zmq.FD`) is edge-triggered and only says "look at zmq.EVENTS": each
socket is drained until EVENTS has no POLLIN, and a zero-delay timer re-drains whenever a
send may have swallowed an edge. Nothing a guest or a peer sends may end the loop: a
malformed message is logged and dropped, a device bug sets DEVICE_NEEDS_RESET (the
transport does that), and only Stop or the supervisor closing the fd channel stop it.

Restarts (docs/faults.md): the supervisor hands every worker of a device the same fds,
plus the device's state area (`shared.devstate`, `Channels.state_fd`). The worker writes
its transport snapshot there whenever status, features or queue set-up change; a
replacement worker (`Channels.restore`) loads it, takes the ring positions from the used
rings in guest memory (`restore(resync=True)`: chains popped but not completed by the dead
worker are served again), and kicks every queue. With `Channels.needs_reset` (the restart
policy ran out) it sets DEVICE_NEEDS_RESET instead of serving. Injected faults
(`shared.faultinject`) arrive as `InjectFault`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import zmq

from shared import exitcodes, fdpass, isolation, ratelimited_log
from shared import protocol as p
from shared.confine import SeccompSettings, attempt_forbidden, drop_privileges, install_filter
from shared.device_kinds import DeviceKind
from shared.devstate import StateArea, StateAreaError
from shared.dirty import DirtyLog
from shared.eventloop import EventLoop
from shared.faultinject import Fault, FaultInjector
from shared.kvm import host_address_of as host_address
from shared.memlimit import limit_memory
from shared.process import die_with_parent
from shared.ratelimit import BucketConfig, RateLimiter
from shared.seccomp import COMMON, Filter
from shared.spawn import DeviceSpawn
from shared.startup_trace import hold as hold_trace
from shared.startup_trace import mark
from shared.uffd import hand_over_mapping
from shared.virtio import constants as c
from shared.virtio.mmio import MmioTransport, TransportError
from shared.virtio.regpage import DeviceRegisters

CONTROL, MMIO, FD_CHANNEL, QUEUE = 0, 1, 2, 16
METRICS_INTERVAL_S = 5.0
HEARTBEAT_INTERVAL_S = 0.25
COUNTERS_SAVE_INTERVAL_S = 0.01  # how stale a killed worker's counters in its state area may be
MAX_PENDING_LOGS = 200
_MMIO_SIZES = (1, 2, 4, 8)
MMIO_BATCH = 64  # register accesses answered per loop turn before other fds get theirs
MMIO_MAX_BYTES = 256  # an MmioRead/MmioWrite is ~40 bytes; longer packets are cut and fail to decode
CONNECT_TIMEOUT_S = 10.0

log = logging.getLogger("embervm.devworker")


class DeviceHooks(Protocol):
    """What a device kind adds to the generic loop."""

    def install(self, loop: EventLoop, send: Callable[[p.Message], None]) -> None:
        """Add the device's own fds and timers (e.g. its rate limiter's) to the loop; `send`
        sends the supervisor a message of the device's own (e.g. vsock's VsockConnect)."""

    def metrics(self) -> dict[str, dict[str, int]]:
        """Cumulative counters, by Firecracker metric group (e.g. {"block_rootfs": {...}})."""

    def handle_control(self, msg: p.Message) -> p.Message | None:
        """A device-specific control message; the answer (if any) goes back to the supervisor."""

    def handle_fds(self, msg: p.Message, fds: list[int]) -> p.Message | None:
        """A fd-channel message; the hook owns `fds` (it must close what it does not keep)."""


@dataclass
class Channels:
    """The worker's ends of its channels, as handed over at spawn."""

    control_endpoint: str
    mmio_fd: int
    fd_channel: int
    queue_fds: list[int]
    irqfd: int
    name: str = "device"
    extra: dict[str, Any] = field(default_factory=dict)
    state_fd: int = -1  # the device's state area (shared.devstate); -1: none
    regs_fd: int = -1  # the device's register page (shared.virtio.regpage); -1: none
    restore: bool = False  # a replacement worker: restore the state area's snapshot
    needs_reset: bool = False  # ... and set DEVICE_NEEDS_RESET instead of serving
    isolation: dict[str, Any] = field(default_factory=dict)  # from the zygote: namespaces, host_pid
    dirty_fd: int = -1  # the dirty page log (shared.dirty); -1: dirty pages are not tracked
    uffd_dev: int = -1  # /dev/userfaultfd: guest memory is being loaded lazily (shared.uffd)


def irq_trigger(irqfd: int) -> Callable[[], None]:
    """The transport's `trigger`: one write to the irqfd injects the device's GSI."""
    return lambda: os.eventfd_write(irqfd, 1)


def bucket_from_api(config: dict[str, Any] | None) -> BucketConfig | None:
    """A Firecracker API TokenBucket ({size, refill_time, one_time_burst}) as a BucketConfig."""
    if not config:
        return None
    return BucketConfig(int(config["size"]), int(config.get("one_time_burst") or 0), int(config["refill_time"]))


def rate_limiter_from_api(config: dict[str, Any] | None) -> RateLimiter | None:
    """A Firecracker API RateLimiter ({bandwidth, ops}) as a RateLimiter; None when it limits nothing."""
    if not config:
        return None
    bandwidth, ops = bucket_from_api(config.get("bandwidth")), bucket_from_api(config.get("ops"))
    if bandwidth is None and ops is None:
        return None
    return RateLimiter(bandwidth, ops)


class _ForwardingHandler(logging.Handler):
    """Keeps this process's log records for the loop to send to the supervisor as `Log`."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.pending: collections.deque[tuple[str, str]] = collections.deque(maxlen=MAX_PENDING_LOGS)

    def emit(self, record: logging.LogRecord) -> None:
        level = "info"
        if record.levelno >= logging.WARNING:
            level = "error" if record.levelno >= logging.ERROR else "warning"
        try:
            self.pending.append((level, self.format(record)))
        except Exception:  # a bad format string in a log call must not break the loop
            self.handleError(record)


class DeviceWorker:
    """Runs one device's transport and hooks until the supervisor says Stop."""

    def __init__(self, transport: MmioTransport, hooks: DeviceHooks, channels: Channels, control: zmq.Socket) -> None:
        self.transport = transport
        self.hooks = hooks
        self.channels = channels
        self.loop = EventLoop()
        self.control = control
        self.mmio = socket.socket(fileno=channels.mmio_fd)
        self.mmio.setblocking(False)
        self.fd_channel = socket.socket(fileno=channels.fd_channel)
        self.fd_channel.setblocking(False)
        self.mmio_requests = 0
        self.bad_messages = 0
        self.state = StateArea(channels.state_fd) if channels.state_fd >= 0 else None
        if channels.regs_fd >= 0:  # InterruptStatus and the config copy the vCPU worker answers from
            transport.attach_registers(DeviceRegisters(channels.regs_fd))
        self._persisted: tuple[Any, ...] | None = None
        self.faults = FaultInjector(self._record_fatal, lambda kind, left: self.send(p.FaultFired(kind, left)))
        # A device that checks faults per request has a `faults` attribute; others are checked per kick.
        self._device_checks_faults = hasattr(transport.device, "faults")
        if self._device_checks_faults:
            transport.device.faults = self.faults  # type: ignore[attr-defined]
        if self.state is not None:
            for index, queue in enumerate(transport.queues):
                queue.pop_hook = lambda value, i=index: self.state.set_popped(i, value)  # type: ignore[union-attr]
        self._next_heartbeat = time.monotonic()
        self._next_counters_save = 0.0
        self.test_hooks = False  # SeccompSettings.test_hooks: act on TestSyscall
        self._outcome: tuple[int, str] = (exitcodes.OK, "stopped by the supervisor")
        self._next_metrics = time.monotonic() + METRICS_INTERVAL_S
        self._logs = _ForwardingHandler()
        root = logging.getLogger()
        self._inherited_handlers, root.handlers = root.handlers, [self._logs]  # logs go to the supervisor only
        root.setLevel(logging.INFO)
        self._register()
        hooks.install(self.loop, self.send)

    def _register(self) -> None:
        self.loop.register(int(self.control.getsockopt(zmq.FD)), CONTROL, self)
        self.loop.register(self.mmio.fileno(), MMIO, self)
        self.loop.register(self.fd_channel.fileno(), FD_CHANNEL, self)
        for index, fd in enumerate(self.channels.queue_fds):
            self.loop.register(fd, QUEUE + index, self)
        self.loop.add_timer(self._backlog_delay, self._drain_backlog, always=True)
        self.loop.add_timer(lambda: self._next_metrics - time.monotonic(), self._push_metrics, always=True)
        self.loop.add_timer(lambda: self._next_heartbeat - time.monotonic(), self._heartbeat, always=True)

    # --- sending -------------------------------------------------------------------------

    def send(self, msg: p.Message) -> None:
        """A message to the supervisor (dropped, not blocked on, if it cannot take it)."""
        with contextlib.suppress(zmq.ZMQError):
            self.control.send(p.encode(msg), zmq.NOBLOCK)

    def metrics(self) -> dict[str, dict[str, int]]:
        """The device's groups, each with the worker's own counters added."""
        own = {"mmio_requests": self.mmio_requests, "bad_messages": self.bad_messages}
        own["log_lines_suppressed"] = ratelimited_log.suppressed_total()
        return {group: {**values, **own} for group, values in self.hooks.metrics().items()}

    def _push_metrics(self) -> None:
        self._next_metrics = time.monotonic() + METRICS_INTERVAL_S
        self.send(p.Metrics(self.metrics()))

    def _heartbeat(self) -> None:
        self._next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL_S
        self.send(p.Heartbeat())
        self.persist_state(force=True)  # with the counters: a killed worker's are read from here

    # --- durable state -------------------------------------------------------------------

    def _record_fatal(self, code: int) -> None:
        if self.state is not None:
            self.state.set_fatal(code)

    def _state_key(self) -> tuple[Any, ...]:
        t = self.transport
        queues = tuple(
            (q.size, q.ready, q.desc_addr, q.avail_addr, q.used_addr, q.event_idx, q.indirect) for q in t.queues
        )
        sels = (t.queue_sel, t.device_features_sel, t.driver_features_sel)
        return (t.status, t.driver_features, t.config_generation, t.activated, sels, queues, self._device_state())

    def _device_state(self) -> Any:
        """The device's own durable state (`save_state()`, e.g. the balloon's actual pages), if
        it has any beyond its transport and rings; a replacement gets it back (`load_state`)."""
        save = getattr(self.transport.device, "save_state", None)
        return save() if save is not None else None

    def persist_state(self, force: bool = False) -> None:
        """Write the transport snapshot (and the counters) to the state area if the durable
        part changed, or with `force`."""
        if self.state is None:
            return
        key = self._state_key()
        if key == self._persisted and not force:
            return
        try:
            state = {"transport": self.transport.snapshot(), "metrics": self.metrics()}
            if key[-1] is not None:
                state["device"] = key[-1]
            self.state.write(state)
        except StateAreaError as e:
            log.error("%s", e)
        self._persisted = key

    def recover(self) -> None:
        """A replacement worker: load the dead worker's state, then serve what it left."""
        snapshot = self.state.read() if self.state is not None else None
        load = getattr(self.transport.device, "load_state", None)
        if snapshot is not None and load is not None and "device" in snapshot:
            try:
                load(snapshot["device"])  # before the transport re-activates the device
            except (KeyError, TypeError, ValueError) as e:
                log.error("cannot restore the device's own state: %s", e)
        if snapshot is not None:
            try:
                self.transport.restore(snapshot["transport"], resync=True)
            except (TransportError, KeyError, TypeError, ValueError) as e:
                log.error("cannot restore the device state: %s", e)
                self.transport.signal_needs_reset(f"state restore failed: {e}")
        resume = getattr(self.transport.device, "resume", None)
        if resume is not None:  # device state of its own (vsock: its connections), or let it go
            resume(snapshot is not None and self.transport.serving and not self.channels.needs_reset)
        if self.channels.needs_reset:
            self.transport.signal_needs_reset("its device worker was restarted too often")
        elif snapshot is not None:
            self._recover_in_flight()
            self.transport.kick_all()  # kicks and interrupts may have been lost meanwhile
        self.persist_state()

    def _recover_in_flight(self) -> None:
        """Hand the chains the dead worker had popped but not completed to the device's
        `recover_in_flight(queue_index, count)`, if it has one: it pops them (they come first)
        and completes those it cannot execute again with its error status. Without the hook
        they are simply served again (right for block and net tx: idempotent)."""
        recover = getattr(self.transport.device, "recover_in_flight", None)
        if recover is None or self.state is None or not self.transport.serving:
            return
        for index, queue in enumerate(self.transport.queues):
            count = self.state.in_flight(index, queue.next_used, queue.size)
            if count:
                log.warning("queue %d: %d request(s) were in flight when the last worker died", index, count)
                recover(index, count)

    def _flush_logs(self) -> None:
        while self._logs.pending:
            level, text = self._logs.pending.popleft()
            self.send(p.Log(level, text))

    # --- the loop ------------------------------------------------------------------------

    def serve(self) -> int:
        """Announce readiness, then dispatch until Stop; returns the exit code."""
        if self.channels.restore:
            self.recover()
        else:
            self.persist_state()
        self.transport.publish_registers()
        self.send(p.Ready(os.getpid()))
        mark(f"{self.channels.name}: ready")
        self.loop.run()
        self._flush_logs()
        self.send(p.Metrics(self.metrics()))
        self.send(p.Exited(self._outcome[0], self._outcome[1], ""))
        return self._outcome[0]

    def process(self, token: int, events: int) -> None:
        try:
            if token == CONTROL:
                self._drain(self.control, self._on_control)
            elif token == MMIO:
                self._on_mmio_channel()
            elif token == FD_CHANNEL:
                self._on_fd_channel()
            else:
                self._on_queue(token - QUEUE)
        except Exception:  # a bug in our own code: report it, keep serving
            log.error("device worker error (token %d):\n%s", token, traceback.format_exc())
        if token < QUEUE:
            self.persist_state()  # a register write, an update: the durable part may have changed
            self.transport.publish_registers()  # ... and config space (a new disk's size)
        else:  # queue work changes no set-up, at most the status (NEEDS_RESET); counters every 10 ms
            now = time.monotonic()
            save_counters = now >= self._next_counters_save
            if save_counters:
                self._next_counters_save = now + COUNTERS_SAVE_INTERVAL_S
            if save_counters or self._persisted is None or self._persisted[0] != self.transport.status:
                self.persist_state(force=save_counters)
        self._flush_logs()

    def _backlog_delay(self) -> float | None:
        pending = self._logs.pending or int(self.control.getsockopt(zmq.EVENTS)) & zmq.POLLIN
        return 0.0 if pending else None

    def _drain_backlog(self) -> None:
        self.process(CONTROL, 0)

    @staticmethod
    def _drain(sock: zmq.Socket, handle: Callable[[list[bytes]], None]) -> None:
        while int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            handle(sock.recv_multipart(zmq.NOBLOCK))

    def _on_queue(self, index: int) -> None:
        try:
            os.eventfd_read(self.channels.queue_fds[index])
        except BlockingIOError:
            return
        generic = not self._device_checks_faults and self.faults.fault is not None and self.transport.serving
        if generic and self.faults.check() == "crash":
            self.faults.crash()
        self.transport.notify_queue(index)

    # --- MMIO ----------------------------------------------------------------------------

    def _on_mmio_channel(self) -> None:
        """Answer the register accesses waiting on the MMIO channel (level-triggered: a
        bounded batch per turn keeps the other fds served)."""
        for _ in range(MMIO_BATCH):
            try:
                payload = self.mmio.recv(MMIO_MAX_BYTES)
            except BlockingIOError:
                return
            except OSError:
                payload = b""
            if not payload:  # the vCPU worker is gone: the guest is ending
                self.loop.unregister(self.mmio.fileno())
                return
            self._on_mmio(payload)

    def _on_mmio(self, payload: bytes) -> None:
        try:
            msg = p.decode(payload)
        except p.ProtocolError as e:
            self.bad_messages += 1
            log.warning("bad MMIO request dropped: %s", e)
            return
        if isinstance(msg, p.MmioRead | p.MmioWrite):
            self.mmio_requests += 1
            value = self.mmio_access(msg)
            with contextlib.suppress(OSError):  # a vCPU that stopped waiting: it times out
                self.mmio.send(p.encode(p.MmioDone(msg.seq, value)))

    def mmio_access(self, msg: p.MmioRead | p.MmioWrite) -> int:
        """Apply one register access; out-of-window or odd-sized ones read all-ones."""
        if msg.size not in _MMIO_SIZES or not 0 <= msg.offset <= c.MMIO_WINDOW_SIZE - msg.size:
            return (1 << (8 * msg.size)) - 1 if msg.size in _MMIO_SIZES else 0xFFFFFFFF
        if isinstance(msg, p.MmioRead):
            return self.transport.read(msg.offset, msg.size) & ((1 << (8 * msg.size)) - 1)
        self.transport.write(msg.offset, msg.size, msg.value & ((1 << (8 * msg.size)) - 1))
        return 0

    # --- control ---------------------------------------------------------------------------

    def _on_control(self, frames: list[bytes]) -> None:
        try:
            msg = p.decode(frames[-1])
        except p.ProtocolError as e:
            self.bad_messages += 1
            log.warning("bad control message dropped: %s", e)
            return
        if isinstance(msg, p.Stop):
            self.loop.stop()
        elif isinstance(msg, p.FlushMetrics):
            self._push_metrics()
        elif isinstance(msg, p.HoldDevice):
            self.hold(msg.hold)
        elif isinstance(msg, p.InjectFault):
            fault = None
            if msg.kind:
                fault = Fault(msg.kind, msg.after_requests, msg.probability, msg.count, msg.delay_ms)
            try:
                self.faults.arm(fault)
            except ValueError as e:
                log.warning("fault not armed: %s", e)
        elif isinstance(msg, p.TestSyscall) and self.test_hooks:
            log.warning("test syscall survived: %s", attempt_forbidden(msg.what))
        elif isinstance(msg, p.TestSendRaw) and self.test_hooks:
            with contextlib.suppress(zmq.ZMQError):
                self.control.send_multipart(msg.frames, zmq.NOBLOCK)
        elif isinstance(msg, p.RedTeam) and self.test_hooks:
            from shared import redteam  # loaded before the filter by confine's test hooks

            send = lambda frames: self.control.send_multipart(frames, zmq.NOBLOCK)  # noqa: E731
            self.send(p.Log("warning", redteam.run(msg, redteam.Context(self.channels.name, send))))
        else:
            answer = self.hooks.handle_control(msg)
            if answer is not None:
                self.send(answer)

    def hold(self, hold: bool) -> None:
        """Snapshot (`HoldDevice`): stop serving the queues and the backends (only the control,
        MMIO and fd channels stay), so neither guest memory nor the state area changes while
        the supervisor copies them; the state area is written first. A released worker sees
        at once the kicks and backend data that came meanwhile (level-triggered epoll)."""
        if hold:
            keep = {int(self.control.getsockopt(zmq.FD)), self.mmio.fileno(), self.fd_channel.fileno()}
            self.loop.hold(keep)
            self.persist_state(force=True)
        else:
            self.loop.release()
        self.send(p.DeviceHeld(hold))

    def _on_fd_channel(self) -> None:
        try:
            received = fdpass.recv_message(self.fd_channel)
        except BlockingIOError:
            return
        except (fdpass.FdChannelError, OSError) as e:
            self.bad_messages += 1
            log.warning("bad fd-channel message dropped: %s", e)
            return
        if received is None:
            self._outcome = (exitcodes.OK, "the supervisor closed the fd channel")
            self.loop.stop()
            return
        answer = self.hooks.handle_fds(*received)
        if answer is not None:
            self.send(answer)

    def close(self) -> None:
        logging.getLogger().handlers = self._inherited_handlers
        if self.state is not None:
            self.state.close()
        if self.transport.registers is not None:
            self.transport.registers.close()
        self.loop.close()
        self.mmio.close()
        self.control.close()
        self.fd_channel.close()


def wait_for_zmq_threads(ctx: zmq.Context, timeout_s: float = 2.0) -> bool:
    """Return once libzmq's background threads have finished starting (False on timeout).

    libzmq starts its I/O and reaper threads with the first socket; each thread asks for its
    scheduling parameters (sched_getparam, sched_getscheduler) and then names itself
    "ZMQbg/...". A seccomp filter loaded before that would kill the worker on a slow start
    (seen under CPU load), so wait until every one of them carries its name.
    """
    expected = int(ctx.get(zmq.IO_THREADS)) + 1  # + the reaper
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        names = []
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read())
        if sum(name.startswith("ZMQbg/") for name in names) >= expected:
            return True
        time.sleep(0.001)
    return False


def connect_control(ctx: zmq.Context, endpoint: str, identity: str) -> zmq.Socket:
    """The worker's DEALER to the supervisor, connected before this returns.

    ZeroMQ connects from its I/O thread, later; a worker about to leave the host's
    filesystem (`shared.isolation`) must wait until the connection exists, and must never
    try again (a reconnect would need socket() and the path, neither of which it keeps).
    """
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.setsockopt(zmq.RECONNECT_IVL, -1)
    monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED)
    try:
        sock.connect(endpoint)
        if not monitor.poll(int(CONNECT_TIMEOUT_S * 1000)):
            raise ConnectionError(f"no connection to the supervisor at {endpoint} within {CONNECT_TIMEOUT_S:g} s")
        monitor.recv_multipart()
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
    return sock


def enter_confinement(ctx: zmq.Context, isolation_args: dict[str, Any]) -> None:
    """Leave the host (empty root, own uid) once connected, then drop every privilege.

    With namespaces, the zygote left this process only the capabilities the move needs;
    without (--no-namespaces), `drop_privileges` ran before any thread started."""
    if isolation_args.get("namespaces"):
        wait_for_zmq_threads(ctx)  # reads /proc: the last look at the host's filesystem
        isolation.isolate_after_connect(int(isolation_args.get("host_pid", 0)))
        die_with_parent(signal.SIGKILL)  # a change of uid cleared it
        drop_privileges(threads_started=True)


Build = Callable[[DeviceSpawn], tuple[MmioTransport, DeviceHooks]]


def run_device_worker(
    kind: DeviceKind,
    args: dict[str, Any],
    fds: list[int],
    build: Build,
    policy: Filter | Callable[[DeviceSpawn], Filter],
) -> int:
    """A device worker's `run(args, fds)`: parse the spawn contract (`shared.spawn`), then
    `run_device` with the device `build(spawn)` makes and its kind's seccomp `policy` (or
    `policy(spawn)`, for a policy whose argument filters name one of the worker's fds)."""
    spawn = DeviceSpawn.from_zygote(kind, args, fds)
    if not isinstance(policy, Filter):
        policy = policy(spawn)
    channels = Channels(
        control_endpoint=spawn.control_endpoint,
        mmio_fd=spawn.mmio_channel,
        fd_channel=spawn.fd_channel,
        queue_fds=spawn.queue_fds,
        irqfd=spawn.irqfd,
        name=spawn.name,
        state_fd=spawn.state_fd,
        regs_fd=spawn.regs_fd,
        restore=spawn.restore,
        needs_reset=spawn.needs_reset,
        isolation=spawn.isolation,
        dirty_fd=spawn.dirty_fd,
        uffd_dev=spawn.uffd_dev,
    )
    return run_device(channels, lambda: build(spawn), SeccompSettings.from_args(args), policy)


def run_device(
    channels: Channels,
    build: Callable[[], tuple[MmioTransport, DeviceHooks]],
    seccomp: SeccompSettings | None = None,
    policy: Filter = COMMON,
) -> int:
    """Worker skeleton: connect, leave the host and drop privileges, build the device, load
    the seccomp `policy`, serve it, always tell the supervisor how it ended (shared.confine
    and shared.isolation explain the order)."""
    seccomp = seccomp or SeccompSettings()
    namespaced = bool(channels.isolation.get("namespaces"))
    hold_trace()  # its later marks are written under the filter
    mark(f"{channels.name}: run")
    if not namespaced:
        drop_privileges()  # before ZeroMQ starts its threads: capabilities are per thread
    ctx = zmq.Context()
    worker: DeviceWorker | None = None
    try:
        try:
            control = connect_control(ctx, channels.control_endpoint, channels.name)
        except (ConnectionError, zmq.ZMQError) as e:
            print(f"{channels.name} worker cannot reach the supervisor: {e}", file=sys.stderr)
            return exitcodes.BAD_CONFIGURATION
        try:
            enter_confinement(ctx, channels.isolation)
            mark(f"{channels.name}: confined")
            transport, hooks = build()
            mark(f"{channels.name}: device built")
            if channels.uffd_dev >= 0:  # before anything reads guest memory
                mapping = transport.mem.host_mapping
                hand_over_mapping(channels.uffd_dev, host_address(mapping), len(mapping), channels.fd_channel)
            if channels.dirty_fd >= 0:
                transport.mem.dirty = DirtyLog(channels.dirty_fd)
            worker = DeviceWorker(transport, hooks, channels, control)
            worker.test_hooks = seccomp.test_hooks
            if not namespaced:
                wait_for_zmq_threads(ctx)  # libzmq's threads start with sched_getparam: not under the filter
            base = int(channels.isolation.get("base_vm_size", 0))
            limit_memory(transport.mem.size, base=base)  # the ceiling: a runaway worker dies, the host lives
            install_filter(seccomp, policy)  # set-up is over: from here on, only the policy's syscalls
            mark(f"{channels.name}: filter loaded")
        except Exception as e:
            _report_start_failure(control, channels, e)
            control.close()
            return exitcodes.BAD_CONFIGURATION
        try:
            return worker.serve()
        finally:
            worker.close()
    finally:
        ctx.term()


def _report_start_failure(control: zmq.Socket, channels: Channels, error: Exception) -> None:
    reason = f"{channels.name} worker cannot start: {error}"
    control.send(p.encode(p.Exited(exitcodes.BAD_CONFIGURATION, reason, traceback.format_exc())))
