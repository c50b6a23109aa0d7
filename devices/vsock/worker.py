"""The virtio-vsock worker process: the guest's vsock device, in its own trust zone.

Entry `run(args, fds)` runs in a child forked by the zygote, which closed every other fd.
The worker keeps exactly these fds, in this order (`FDS`):

    memfd         guest RAM (rx buffers are filled and tx payloads read in place)
    irqfd         written to inject the device's GSI
    rx_notify     ioeventfd of queue 0 (rx)
    tx_notify     ioeventfd of queue 1 (tx)
    ev_notify     ioeventfd of queue 2 (event)
    listener      the AF_UNIX socket listening at uds_path, created by the supervisor
    fd_channel    SEQPACKET socket to the supervisor

    state         (when args["state_fd"]) the device's state area (shared.devstate), appended
                  by the supervisor; a replacement worker (args["restore"]) restores the
                  transport and sends the guest VIRTIO_VSOCK_EVENT_TRANSPORT_RESET

It opens no host path; it connects to `<uds_path>_<port>` for guest-initiated connections
(see policy.py). args: guest_cid, uds_path, mem_size, name, control_endpoint, mmio_endpoint.
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
from shared.confine import SeccompSettings
from shared.devworker import Channels, irq_trigger, run_device, split_recovery
from shared.eventloop import EventLoop
from shared.memory import GuestMemory
from shared.virtio.mmio import MmioTransport

FDS = ("memfd", "irqfd", "rx_notify", "tx_notify", "ev_notify", "listener", "fd_channel")
BACKEND = 100  # the muxer's epoll fd in the worker's loop
# A replacement worker restores the transport from the state area (docs/faults.md); its host
# connections died with the old worker, so it tells the guest with TRANSPORT_RESET.
RESTARTABLE = True

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


def build(args: dict[str, Any], fds: list[int]) -> tuple[MmioTransport, VsockHooks]:
    """The device behind its transport, from the spawn arguments and fds."""
    memfd, irqfd, _rx, _tx, _ev, listener_fd, _channel = fds
    mem = GuestMemory.map(memfd, int(args["mem_size"]))
    listener = socket.socket(fileno=listener_fd)
    muxer = UnixMuxer(int(args["guest_cid"]), str(args["uds_path"]), listener)
    device = VsockDevice(int(args["guest_cid"]), muxer)
    if args.get("restore"):
        # a replacement worker: the host sockets died with the old one, so the guest's
        # connections are gone; tell it once the restored device is active
        device.transport_reset()
    transport = MmioTransport(device, mem, trigger=irq_trigger(irqfd))
    return transport, VsockHooks(device, muxer, transport)


def run(args: dict[str, Any], fds: list[int]) -> int:
    """Worker entry point (in the forked child)."""
    fds, recovery = split_recovery(args, fds)
    if len(fds) != len(FDS):
        raise ValueError(f"the vsock worker takes {len(FDS)} fds ({', '.join(FDS)}), got {len(fds)}")
    _memfd, irqfd, rx, tx, ev, _listener, channel = fds
    channels = Channels(
        control_endpoint=str(args["control_endpoint"]),
        fd_channel=channel,
        queue_fds=[rx, tx, ev],
        irqfd=irqfd,
        name=str(args.get("name", "vsock")),
        **recovery,
    )
    return run_device(channels, lambda: build(args, fds), SeccompSettings.from_args(args), POLICY)
