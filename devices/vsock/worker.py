"""The virtio-vsock worker process: the guest's vsock device, in its own trust zone.

Entry `run(args, fds)` runs in a child forked by the zygote, which closed every other fd.
Its fds and args are the spawn contract (`shared.spawn.DeviceSpawn`) with the `vsock` row of
`shared.device_kinds`: queues rx, tx and event, and as its backend the AF_UNIX socket the
supervisor created listening at uds_path. Rx buffers are filled and tx payloads read in
place in guest memory. A replacement worker (`DeviceSpawn.restore`) restores the transport
and the connections: their state from the connection table in the state area
(`devices.vsock.durable`), their host sockets from the supervisor's copies (`VsockKept`,
waiting on the fd channel when it starts). Without a readable table it sends the guest
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, as a worker that cannot resume must.

It opens no host path; the supervisor connects to `<uds_path>_<port>` for it on
guest-initiated connections (`VsockConnect`, see policy.py). Its own args: guest_cid, uds_path.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from collections.abc import Callable
from typing import Any

from devices.vsock.backend import COUNTER_NAMES, UnixMuxer
from devices.vsock.device import VsockDevice
from devices.vsock.durable import RESUME_CONNECTIONS, ConnTable
from devices.vsock.messages import (
    VsockAccepted,
    VsockConnect,
    VsockConnected,
    VsockKept,
    VsockRelease,
    VsockTransportReset,
)
from devices.vsock.policy import POLICY
from shared import fdpass
from shared import protocol as p
from shared.device_kinds import VSOCK
from shared.devstate import StateArea
from shared.devworker import irq_trigger, run_device_worker
from shared.eventloop import EventLoop
from shared.memory import GuestMemory
from shared.spawn import DeviceSpawn
from shared.virtio.mmio import MmioTransport

BACKEND = 100  # the muxer's epoll fd in the worker's loop
KEPT_TIMEOUT_S = 5.0  # a replacement waits this long for the supervisor's VsockKept list

log = logging.getLogger("embervm.vsock")

__all__ = ["COUNTER_NAMES", "VsockHooks", "build", "run"]


class VsockHooks:
    """What the vsock worker adds to the generic loop: the muxer's fd and timer, metrics,
    the transport-reset command."""

    def __init__(self, device: VsockDevice, muxer: UnixMuxer, transport: MmioTransport) -> None:
        self.device = device
        self.muxer = muxer
        self.transport = transport
        self.broken = False  # an internal error stopped the backend
        self.loop: EventLoop | None = None

    def install(self, loop: EventLoop, send: Callable[[p.Message], None]) -> None:
        self.loop = loop
        self.muxer.connector = lambda port, guest_port: send(VsockConnect(port, guest_port))
        self.muxer.release = lambda sock_id: send(VsockRelease([sock_id]))
        loop.register(self.muxer.fileno(), BACKEND, self)
        loop.add_timer(lambda: None if self.broken else self.muxer.next_timeout(), self._on_timer)

    def process(self, token: int, events: int) -> None:
        self._guarded(lambda: self.device.process_backend(self.transport.serving))

    def _on_timer(self) -> None:
        self._guarded(lambda: self.device.process_timer(self.transport.serving))

    def _guarded(self, work: Callable[[], None]) -> None:
        if self.broken:
            return
        try:
            work()
        except Exception as e:  # a bug of ours: the muxer's state is suspect and its fd may stay
            # readable (a level-triggered loop would spin): drop every connection, stop polling
            # the backend, and tell the guest the device needs a reset (until the worker restarts)
            self.muxer.counters["muxer_event_fails"] += 1
            log.exception("vsock backend error: the vsock device stops")
            self.broken = True
            if self.loop is not None:
                self.loop.unregister(self.muxer.fileno())
            self.muxer.reset()
            self.transport.signal_needs_reset(f"internal error: {e!r}")

    def metrics(self) -> dict[str, dict[str, int]]:
        return {"vsock": {**self.device.metrics, **self.muxer.counters, "conns_open": len(self.muxer.conns)}}

    def handle_control(self, msg: p.Message) -> p.Message | None:
        if isinstance(msg, VsockTransportReset):
            self.device.transport_reset()
            return p.UpdateResult(msg.request_id, True, "")
        log.warning("vsock worker ignored control message %r", msg.TYPE)
        return None

    def handle_fds(self, msg: p.Message, fds: list[int]) -> p.Message | None:
        if isinstance(msg, VsockAccepted) and len(fds) == 1:
            accepted = socket.socket(fileno=fds[0])
            self._guarded(lambda: self._accepted(accepted, msg.sock_id))
            return None
        if isinstance(msg, VsockConnected) and len(fds) == int(msg.ok) <= 1:
            sock = socket.socket(fileno=fds[0]) if msg.ok else None
            self._guarded(lambda: self._connected(msg, sock))
            return None
        for fd in fds:
            os.close(fd)
        log.warning("vsock worker ignored fd-channel message %r with %d fds", msg.TYPE, len(fds))
        return None

    def _accepted(self, sock: socket.socket, sock_id: int) -> None:
        self.muxer.adopt_accepted(sock, sock_id)
        self.device.process_backend(self.transport.serving)

    def _connected(self, msg: VsockConnected, sock: socket.socket | None) -> None:
        """The supervisor's answer to a guest-initiated connect: RESPONSE or RST to the guest."""
        self.muxer.guest_connected(msg.port, msg.guest_port, sock, msg.sock_id)
        self.device.process_backend(self.transport.serving)


def receive_kept(
    channel_fd: int, timeout_s: float = KEPT_TIMEOUT_S
) -> tuple[dict[int, socket.socket], frozenset[int]] | None:
    """A replacement's host sockets, by id, and the ids of those accepted at uds_path, from
    the supervisor's VsockKept messages (None if the list did not arrive whole: then
    nothing can be resumed)."""
    channel = socket.socket(fileno=channel_fd)
    kept: dict[int, socket.socket] = {}
    accepted: set[int] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([channel], [], [], left)[0]:
                break
            received = fdpass.recv_message(channel)
            if received is None:
                break
            msg, fds = received
            if not isinstance(msg, VsockKept) or len(fds) != len(msg.sock_ids):
                for fd in fds:
                    os.close(fd)
                log.warning("vsock worker: unexpected %r while waiting for its kept sockets", msg.TYPE)
                continue
            for sock_id, fd in zip(msg.sock_ids, fds, strict=True):
                kept[sock_id] = socket.socket(fileno=fd)
            accepted.update(msg.accepted)
            if msg.last:
                return kept, frozenset(accepted)
    except (fdpass.FdChannelError, OSError) as e:
        log.warning("vsock worker: cannot receive its kept sockets: %s", e)
    finally:
        channel.detach()  # the device worker's loop owns the channel
    for sock in kept.values():
        sock.close()
    return None


def build(spawn: DeviceSpawn) -> tuple[MmioTransport, VsockHooks]:
    """The device behind its transport, from the spawn contract."""
    args = spawn.args
    mem = GuestMemory.map(spawn.memfd, spawn.mem_size)
    listener: socket.socket | None = socket.socket(fileno=spawn.backend_fds[0])
    table = ConnTable(StateArea(spawn.state_fd).ext()) if spawn.state_fd >= 0 else None
    if table is not None and RESUME_CONNECTIONS and listener is not None:
        listener.close()  # the supervisor accepts (VsockAccepted), so that it keeps every host socket
        listener = None
    muxer = UnixMuxer(int(args["guest_cid"]), str(args["uds_path"]), listener, table=table)
    device = VsockDevice(int(args["guest_cid"]), muxer)
    if spawn.restore:
        kept = receive_kept(spawn.fd_channel) if table is not None and RESUME_CONNECTIONS else None
        if kept is None:
            # nothing to resume from: the guest's connections are gone; tell it once the
            # restored device is active
            if table is not None:
                table.clear()
            device.transport_reset()
        else:
            device.kept_sockets = kept  # resumed once the transport is restored (VsockDevice.resume)
    elif table is not None:
        table.clear()
    transport = MmioTransport(device, mem, trigger=irq_trigger(spawn.irqfd))
    return transport, VsockHooks(device, muxer, transport)


def run(args: dict[str, Any], fds: list[int]) -> int:
    """Worker entry point (in the forked child)."""
    return run_device_worker(VSOCK, args, fds, build, POLICY)
