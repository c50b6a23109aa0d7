"""The virtio-vsock worker process: the guest's vsock device, in its own trust zone.

Entry `run(args, fds)` runs in a child forked by the zygote, which closed every other fd.
Its fds and args are the spawn contract (`shared.spawn.DeviceSpawn`) with the `vsock` row of
`shared.device_kinds`: queues rx, tx and event, and as its backend the AF_UNIX socket the
supervisor created listening at uds_path. Rx buffers are filled and tx payloads read in
place in guest memory. A replacement worker (`DeviceSpawn.restore`) restores the transport
and sends the guest VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.

It opens no host path; the supervisor connects to `<uds_path>_<port>` for it on
guest-initiated connections (`VsockConnect`, see policy.py). Its own args: guest_cid, uds_path.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from devices.vsock.backend import COUNTER_NAMES, UnixMuxer
from devices.vsock.device import VsockDevice
from devices.vsock.messages import VsockConnect, VsockConnected, VsockTransportReset
from devices.vsock.policy import POLICY
from shared import protocol as p
from shared.device_kinds import VSOCK
from shared.devworker import irq_trigger, run_device_worker
from shared.eventloop import EventLoop
from shared.memory import GuestMemory
from shared.spawn import DeviceSpawn
from shared.virtio.mmio import MmioTransport

BACKEND = 100  # the muxer's epoll fd in the worker's loop

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
        if isinstance(msg, VsockConnected) and len(fds) == int(msg.ok) <= 1:
            sock = socket.socket(fileno=fds[0]) if msg.ok else None
            self._guarded(lambda: self._connected(msg, sock))
            return None
        for fd in fds:
            os.close(fd)
        log.warning("vsock worker ignored fd-channel message %r with %d fds", msg.TYPE, len(fds))
        return None

    def _connected(self, msg: VsockConnected, sock: socket.socket | None) -> None:
        """The supervisor's answer to a guest-initiated connect: RESPONSE or RST to the guest."""
        self.muxer.guest_connected(msg.port, msg.guest_port, sock)
        self.device.process_backend(self.transport.serving)


def build(spawn: DeviceSpawn) -> tuple[MmioTransport, VsockHooks]:
    """The device behind its transport, from the spawn contract."""
    args = spawn.args
    mem = GuestMemory.map(spawn.memfd, spawn.mem_size)
    listener = socket.socket(fileno=spawn.backend_fds[0])
    muxer = UnixMuxer(int(args["guest_cid"]), str(args["uds_path"]), listener)
    device = VsockDevice(int(args["guest_cid"]), muxer)
    if spawn.restore:
        # a replacement worker: the host sockets died with the old one, so the guest's
        # connections are gone; tell it once the restored device is active
        device.transport_reset()
    transport = MmioTransport(device, mem, trigger=irq_trigger(spawn.irqfd))
    return transport, VsockHooks(device, muxer, transport)


def run(args: dict[str, Any], fds: list[int]) -> int:
    """Worker entry point (in the forked child)."""
    return run_device_worker(VSOCK, args, fds, build, POLICY)
