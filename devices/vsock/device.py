"""The virtio-vsock device (spec 5.10): three queues, config space guest_cid, and a backend.

Queues: 0 rx (the device writes packets into the guest's buffers), 1 tx (the guest's
packets), 2 event (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET). The device knows its queues, guest
memory, an `Interrupt` and a `VsockBackend`; the worker wires ioeventfds to
`process_queue`, the backend's fd to `process_backend`, and a timer to `process_timer`.

Guest errors never escape: a malformed chain or packet is completed with length 0 and
counted, a packet with the wrong source CID (or for another CID than the host's) is
dropped and counted; what the backend refuses (unknown op, unknown connection) becomes an
RST. A corrupt ring asks for DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Sequence
from typing import Any

from devices.vsock.backend import VsockBackend
from devices.vsock.packet import EVENT, EVENT_TRANSPORT_RESET, HEADER_SIZE, HOST_CID, PacketError, parse_tx
from shared.memory import GuestMemory
from shared.ratelimited_log import RateLimitedLog
from shared.virtio import constants as c
from shared.virtio.chain import ChainError, DescriptorChain
from shared.virtio.device import DeviceError, Interrupt, config_slice
from shared.virtio.queue import Queue, QueueError

_log = RateLimitedLog(logging.getLogger(__name__))

RX, TX, EVQ = 0, 1, 2
QUEUE_SIZE = 256
_CONFIG = struct.Struct("<Q")  # guest_cid

METRIC_NAMES = (
    "activate_fails",
    "cfg_fails",
    "rx_queue_event_fails",
    "tx_queue_event_fails",
    "ev_queue_event_fails",
    "rx_queue_event_count",
    "tx_queue_event_count",
    "ev_queue_event_count",
    "rx_packets_count",
    "tx_packets_count",
    "tx_malformed_packets",
    "tx_bad_cid_packets",
    "rx_bad_buffers",
    "transport_reset_events",
    "needs_reset_count",
)


class VsockDevice:
    """virtio-vsock for the guest with CID `guest_cid`, over `backend`."""

    device_type = c.VIRTIO_ID_VSOCK

    def __init__(self, guest_cid: int, backend: VsockBackend, *, queue_size: int = QUEUE_SIZE) -> None:
        if not 3 <= guest_cid <= 0xFFFFFFFF:
            raise ValueError(f"guest_cid must be in [3, 2^32), got {guest_cid}")
        self.guest_cid = guest_cid
        self.backend = backend
        self.queue_max_sizes: Sequence[int] = (queue_size, queue_size, queue_size)
        self.metrics = dict.fromkeys(METRIC_NAMES, 0)
        self._queues: Sequence[Queue] = ()
        self._interrupt: Interrupt | None = None
        self._pending_events = 0  # TRANSPORT_RESET events waiting for an event buffer
        self.kept_sockets: tuple[dict[int, socket.socket], frozenset[int]] | None = None  # until `resume`

    # --- identity and configuration ------------------------------------------------------
    @property
    def avail_features(self) -> int:
        return sum(c.feature(b) for b in (c.VIRTIO_F_VERSION_1, c.VIRTIO_F_EVENT_IDX, c.VIRTIO_F_INDIRECT_DESC))

    def read_config(self, offset: int, size: int) -> bytes:
        return config_slice(_CONFIG.pack(self.guest_cid), offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        self.metrics["cfg_fails"] += 1
        _log.warning("Guest wrote vsock config space at %#x (read-only)", offset)

    # --- lifecycle -------------------------------------------------------------------------
    def activate(self, mem: GuestMemory, queues: Sequence[Queue], interrupt: Interrupt, features: int) -> None:
        if len(queues) != 3:
            self.metrics["activate_fails"] += 1
            raise DeviceError(f"virtio-vsock has three queues, got {len(queues)}")
        self._queues, self._interrupt = queues, interrupt
        if self._pending_events:  # a transport reset asked for before activation (a restored worker)
            self._run(self._process_event_queue)
        if self.kept_sockets is None:  # a replacement serves only once its connections are back (resume)
            self.process_backend()  # host connections that arrived meanwhile

    def reset(self) -> None:
        self._queues, self._interrupt = (), None
        self.backend.reset()

    @property
    def active(self) -> bool:
        return bool(self._queues)

    # --- entry points ------------------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        if not self.active or self._interrupt is None:
            return
        if index == RX:
            self.metrics["rx_queue_event_count"] += 1
        elif index == TX:
            self.metrics["tx_queue_event_count"] += 1
        elif index == EVQ:
            self.metrics["ev_queue_event_count"] += 1
        else:
            return
        self._run(lambda: self._process_event_queue() if index == EVQ else self._process_tx_rx())

    def process_backend(self, serving: bool = True) -> None:
        """The backend's fd is readable: let it work, then move packets both ways (not while
        the transport is not `serving`: failed, or waiting for a reset)."""
        self.backend.notify()
        if self.active and serving:
            self._run(self._process_tx_rx)

    def process_timer(self, serving: bool = True) -> None:
        self.backend.on_timer()
        if self.active and serving:
            self._run(self._process_tx_rx)

    def transport_reset(self) -> None:
        """Send VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (after a snapshot restore: every connection is gone)."""
        self.backend.reset()
        self._pending_events += 1
        if self.active:
            self._run(self._process_event_queue)

    def _run(self, work: object) -> None:
        interrupt = self._interrupt
        assert interrupt is not None and callable(work)
        try:
            work()
        except QueueError as e:
            self.metrics["needs_reset_count"] += 1
            interrupt.signal_needs_reset(str(e))
            return
        if any(q.needs_notification() for q in list(self._queues)):  # each queue's counter is reset
            interrupt.signal_used_queue()

    # --- tx then rx ------------------------------------------------------------------------------
    def _process_tx_rx(self) -> None:
        self._process_rx()  # first: rx buffers the guest just gave may unblock tx
        self._process_tx()
        self._process_rx()  # what the tx packets produced (RESPONSE, RST, credit, data)

    def _pop(self, queue: Queue, counter: str) -> DescriptorChain | None:
        while True:
            try:
                return queue.pop()
            except ChainError as e:
                _log.warning("%s", str(e))
                self.metrics[counter] += 1
                queue.add_used(e.head, 0)

    def _process_tx(self) -> None:
        """Hand the guest's packets to the backend; stop while the rx side is backlogged
        (the guest's next rx buffers kick us and tx goes on)."""
        queue = self._queues[TX]
        while True:
            if self.backend.rx_backlogged():
                self._process_rx()
                if self.backend.rx_backlogged():
                    return
            chain = self._pop(queue, "tx_malformed_packets")
            if chain is None:
                if queue.enable_notification():
                    continue
                return
            position = (queue.next_avail - 1) & 0xFFFF
            if self._serve_tx(chain, position):
                queue.undo_pop()  # held: its bytes stay in guest memory until the host takes them
                return
            self.backend.tx_applied(position)
            queue.add_used(chain.head, 0)
            self._signal_if_due(queue)

    def _signal_if_due(self, queue: Queue) -> None:
        """Mid-batch: interrupt now if the driver's used_event asks for it (`Queue.notify_due`)."""
        if queue.notify_due() and self._interrupt is not None:
            self._interrupt.signal_used_queue()

    def _serve_tx(self, chain: DescriptorChain, position: int = -1) -> bool:
        """Hand one tx chain's packet to the backend; True if the backend holds it."""
        try:
            pkt = parse_tx(chain)
        except PacketError as e:
            _log.warning("vsock: malformed packet dropped: %s", str(e))
            self.metrics["tx_malformed_packets"] += 1
            return False
        h = pkt.header
        if h.src_cid != self.guest_cid or h.dst_cid != HOST_CID:
            _log.warning(
                "vsock: packet from CID %d to CID %d dropped (guest is %d)", h.src_cid, h.dst_cid, self.guest_cid
            )
            self.metrics["tx_bad_cid_packets"] += 1
            return False
        self.metrics["tx_packets_count"] += 1
        return self.backend.send_pkt(pkt, position)

    def _process_rx(self) -> None:
        queue = self._queues[RX]
        while self.backend.has_pending_rx():
            chain = self._pop(queue, "rx_bad_buffers")
            if chain is None:
                if queue.enable_notification():
                    continue
                return  # the guest's next rx buffers will kick us
            if chain.writable_len < HEADER_SIZE:
                self.metrics["rx_bad_buffers"] += 1
                queue.add_used(chain.head, 0)
                continue
            length = self.backend.recv_pkt(chain, queue.next_used)
            if length is None:
                queue.undo_pop()
                return
            queue.add_used(chain.head, length)
            self.backend.rx_published()
            self.metrics["rx_packets_count"] += 1
            self._signal_if_due(queue)

    # --- a replacement worker -------------------------------------------------------------------
    def resume(self, serving: bool) -> None:
        """After the transport's restore (devworker): rebuild the dead worker's connections
        from the table and the kept host sockets (`UnixMuxer.resume`)."""
        kept, self.kept_sockets = self.kept_sockets, None
        muxer: Any = self.backend
        table = getattr(muxer, "table", None)
        if kept is None or table is None:
            return
        sockets, accepted = kept
        if not serving or not self.active:  # nothing to resume into: the host sockets go
            muxer.resume({}, sockets, 0)
            table.clear()
            return
        resumed = muxer.resume(table.records(), sockets, self._queues[RX].next_used, accepted)
        _log.warning("vsock: %d connection(s) resumed after a worker restart", resumed)

    def recover_in_flight(self, index: int, count: int) -> None:
        """The dead worker's tx chains popped and not completed (devworker): a packet it
        had applied is completed without being applied again; the rest are served. Rx
        chains need nothing here (the connection table settles their packets)."""
        if index != TX or not self.active:
            return
        queue = self._queues[TX]
        for _ in range(count):
            chain = self._pop(queue, "tx_malformed_packets")
            if chain is None:
                return
            position = (queue.next_avail - 1) & 0xFFFF
            skip = False
            try:
                pkt = parse_tx(chain)
                skip = self.backend.skip_in_flight_tx(pkt, position)  # type: ignore[attr-defined]
            except PacketError:
                pass
            if not skip and self._serve_tx(chain, position):
                queue.undo_pop()  # held: served again once the host socket takes more
                return
            self.backend.tx_applied(position)
            queue.add_used(chain.head, 0)

    # --- event queue -------------------------------------------------------------------------------
    def _process_event_queue(self) -> None:
        queue = self._queues[EVQ]
        while self._pending_events:
            chain = self._pop(queue, "ev_queue_event_fails")
            if chain is None:
                if queue.enable_notification():
                    continue
                return
            try:
                chain.writer().write(EVENT.pack(EVENT_TRANSPORT_RESET))
            except ChainError as e:
                _log.warning("%s", str(e))
                self.metrics["ev_queue_event_fails"] += 1
                queue.add_used(chain.head, 0)
                continue
            queue.add_used(chain.head, EVENT.size)
            self._pending_events -= 1
            self.metrics["transport_reset_events"] += 1
