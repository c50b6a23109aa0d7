"""The virtio-net device: rx queue 0, tx queue 1, a TAP behind it, MMDS beside it.

It knows its queues, guest memory, an `Interrupt`, a `NetBackend` (the TAP fd), its rate
limiters and optionally an `MmdsStack`; no transport, no eventfds, no process. The worker
wires ioeventfds -> `process_queue(i)`, the TAP fd (when `wants_tap_input()`) ->
`process_tap()`, and timers on `throttle_delay()` / the stack's timeout.

Features are Firecracker's: VERSION_1, EVENT_IDX, CSUM, GUEST_CSUM, GUEST_TSO4/6, GUEST_UFO,
HOST_TSO4/6, HOST_UFO, MRG_RXBUF, and MAC when a `guest_mac` is configured (config space:
the MAC). Every frame carries the 12-byte virtio-net header, the TAP's too
(TUNSETVNETHDRSZ 12), so frames move between guest buffers and the TAP unchanged; the
guest's offloads are mirrored on the TAP with TUNSETOFFLOAD at activation.

TX (guest -> TAP): each chain's readable buffers go to the TAP with one writev straight
from guest memory. A chain shorter than the header or longer than header + 65550 bytes is
malformed (counted, completed with length 0). Frames for the MMDS address go to the stack,
never to the TAP. After a pass that sent frames the device reads the TAP before raising the
interrupt: the kernel's tun hands a written frame to the host stack inside the writev, so
the peer's answer (a TCP ACK, mostly) is often there already and one interrupt carries both.
With a guest's TCP sending one or two frames per round trip, that halves the interrupts per
MiB (each costs an InterruptStatus read and an ACK write; docs/net.md, bench/guest_io.py).

RX (TAP -> guest): the device pops enough chains for the largest frame (one chain without
MRG_RXBUF) and readv()s from the TAP straight into their buffers, then writes
`num_buffers` into the header. When the guest has no buffers the device stops watching the
TAP: frames wait in the TAP's own queue (bounded by its txqueuelen; the kernel counts
overflow as the TAP's tx drops) until a rx notification. A frame that did not fit the
buffers on hand (MRG_RXBUF with few buffers) or that the rx rate limiter held back waits,
copied, in a bounded `pending` queue together with the MMDS stack's answers; frames that
cannot ever fit (a frame bigger than a non-mergeable buffer) are dropped and counted.
"""

from __future__ import annotations

import errno
import logging
import struct
from collections import deque
from collections.abc import Sequence

from devices.net import tap
from devices.net.backend import NetBackend
from devices.net.stack import MmdsStack
from shared.memory import GuestMemory
from shared.ratelimit import RateLimiter
from shared.ratelimited_log import RateLimitedLog
from shared.virtio import constants as c
from shared.virtio.chain import ChainError, DescriptorChain
from shared.virtio.device import DeviceError, Interrupt, config_slice
from shared.virtio.queue import Queue, QueueError

_log = RateLimitedLog(logging.getLogger(__name__))

RX, TX = 0, 1
# Feature bits (spec 5.1.3).
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15

VNET_HDR_SIZE = 12
MAX_FRAME = 65550  # Firecracker's: 64 KiB of payload behind Ethernet + VLAN headers
MAX_BUFFER = VNET_HDR_SIZE + MAX_FRAME
TYPICAL_BUFFER = VNET_HDR_SIZE + 1514  # a full-size frame without VLAN tag or GSO
MAX_PENDING = 64  # frames waiting (copied) for rx buffers or the rx rate limiter
_NUM_BUFFERS = struct.Struct("<H")

# Guest offload feature -> TUNSETOFFLOAD flag (what the TAP may hand the guest).
_OFFLOADS = (
    (VIRTIO_NET_F_GUEST_CSUM, tap.TUN_F_CSUM),
    (VIRTIO_NET_F_GUEST_TSO4, tap.TUN_F_TSO4),
    (VIRTIO_NET_F_GUEST_TSO6, tap.TUN_F_TSO6),
    (VIRTIO_NET_F_GUEST_UFO, tap.TUN_F_UFO),
)

METRIC_NAMES = (
    "activate_fails",
    "rx_queue_event_count",
    "rx_tap_event_count",
    "rx_bytes_count",
    "rx_packets_count",
    "rx_count",
    "rx_fails",
    "rx_rate_limiter_throttled",
    "rx_event_rate_limiter_count",
    "rx_dropped_frames",
    "rx_deferred_frames",
    "rx_flushed_buffers",
    "no_rx_avail_buffer",
    "tx_queue_event_count",
    "tx_bytes_count",
    "tx_packets_count",
    "tx_count",
    "tx_fails",
    "tx_malformed_frames",
    "tx_rate_limiter_throttled",
    "tx_rate_limiter_event_count",
    "tap_read_fails",
    "tap_write_fails",
    "mmds_frames",
    "needs_reset_count",
)


def parse_mac(text: str | None) -> bytes | None:
    return None if not text else bytes(int(part, 16) for part in text.split(":"))


class NetDevice:
    """virtio-net with one rx/tx queue pair."""

    device_type = c.VIRTIO_ID_NET

    def __init__(
        self,
        backend: NetBackend,
        *,
        iface_id: str,
        mac: bytes | None = None,
        rx_rate_limiter: RateLimiter | None = None,
        tx_rate_limiter: RateLimiter | None = None,
        mmds: MmdsStack | None = None,
        queue_size: int = c.DEFAULT_QUEUE_SIZE,
    ) -> None:
        self.backend = backend
        self.iface_id = iface_id
        self.mac = mac
        self.rx_rate_limiter = rx_rate_limiter
        self.tx_rate_limiter = tx_rate_limiter
        self.mmds = mmds
        self.queue_max_sizes: Sequence[int] = (queue_size, queue_size)
        self.metrics = dict.fromkeys(METRIC_NAMES, 0)
        self.pending: deque[bytes] = deque()
        self._scratch = memoryview(bytearray(MAX_BUFFER))
        self._mem: GuestMemory | None = None
        self._queues: Sequence[Queue] = ()
        self._interrupt: Interrupt | None = None
        self._features = 0
        self._rx_starved = False  # the guest had no rx buffers: stop reading the TAP
        self._rx_throttled = False
        self._tx_throttled = False

    # --- identity and configuration ------------------------------------------------------

    @property
    def avail_features(self) -> int:
        bits = [
            c.VIRTIO_F_VERSION_1,
            c.VIRTIO_F_EVENT_IDX,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_UFO,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_UFO,
            VIRTIO_NET_F_MRG_RXBUF,
        ]
        if self.mac is not None:
            bits.append(VIRTIO_NET_F_MAC)
        return sum(c.feature(bit) for bit in bits)

    def read_config(self, offset: int, size: int) -> bytes:
        return config_slice(self.mac or bytes(6), offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        _log.warning("Guest wrote net config space at %#x (read-only)", offset)

    @property
    def mergeable(self) -> bool:
        return bool(self._features & c.feature(VIRTIO_NET_F_MRG_RXBUF))

    # --- lifecycle ---------------------------------------------------------------------------

    def activate(self, mem: GuestMemory, queues: Sequence[Queue], interrupt: Interrupt, features: int) -> None:
        if len(queues) != 2:
            self.metrics["activate_fails"] += 1
            raise DeviceError(f"virtio-net has an rx and a tx queue, got {len(queues)}")
        offload = sum(flag for bit, flag in _OFFLOADS if features & c.feature(bit))
        try:
            self.backend.set_offload(offload)
        except OSError as e:
            self.metrics["activate_fails"] += 1
            raise DeviceError(f"cannot set the TAP's offloads: {e}") from None
        self._mem, self._queues, self._interrupt, self._features = mem, queues, interrupt, features
        self._rx_starved = False

    def reset(self) -> None:
        self._mem, self._queues, self._interrupt = None, (), None
        self._rx_throttled = self._tx_throttled = self._rx_starved = False
        self.pending.clear()
        if self.mmds is not None:
            self.mmds.conns.clear()
            self.mmds.output.clear()

    @property
    def active(self) -> bool:
        return bool(self._queues)

    def wants_tap_input(self) -> bool:
        """Whether the worker should watch the TAP for frames now."""
        return self.active and not self._rx_starved and not self._rx_throttled and not self.pending

    def throttle_delay(self) -> float | None:
        """Seconds until a throttled direction should be retried; None if none is."""
        waits = []
        if self._rx_throttled and self.rx_rate_limiter is not None:
            waits.append(self.rx_rate_limiter.time_until_ready())
        if self._tx_throttled and self.tx_rate_limiter is not None:
            waits.append(self.tx_rate_limiter.time_until_ready())
        return min(waits) if waits else None

    def on_throttle_timer(self) -> None:
        if self._rx_throttled:
            self._rx_throttled = False
            self.metrics["rx_event_rate_limiter_count"] += 1
            self._run(self._rx)
        if self._tx_throttled:
            self._tx_throttled = False
            self.metrics["tx_rate_limiter_event_count"] += 1
            self._run(self._tx)

    # --- entry points ------------------------------------------------------------------------

    def process_queue(self, index: int) -> None:
        if not self.active:
            return
        if index == RX:
            self.metrics["rx_queue_event_count"] += 1
            self._rx_starved = False
            self._run(self._rx)
        elif index == TX:
            self.metrics["tx_queue_event_count"] += 1
            self._run(self._tx)

    def process_tap(self) -> None:
        """The TAP has frames."""
        if self.active:
            self.metrics["rx_tap_event_count"] += 1
            self._run(self._rx)

    def process_mmds_timer(self) -> None:
        """The MMDS stack's timer fired (retransmissions); deliver what it produced."""
        if self.mmds is not None:
            self.mmds.on_timer()
            if self.active:
                self._queue_mmds_output()
                self._run(self._rx)
            else:
                self.mmds.output.clear()

    def _run(self, work: object) -> None:
        interrupt = self._interrupt
        if interrupt is None:
            return
        try:
            work()  # type: ignore[operator]
        except QueueError as e:
            self.metrics["needs_reset_count"] += 1
            interrupt.signal_needs_reset(str(e))
            return
        if any(q.needs_notification() for q in list(self._queues)):
            interrupt.signal_used_queue()

    def _pop(self, queue: Queue, counter: str) -> DescriptorChain | None:
        """The next well-formed chain; malformed ones are completed with length 0."""
        while True:
            try:
                return queue.pop()
            except ChainError as e:
                _log.warning("%s", str(e))
                self.metrics[counter] += 1
                queue.add_used(e.head, 0)

    # --- TX ----------------------------------------------------------------------------------

    def _signal_if_due(self, queue: Queue) -> None:
        """Mid-batch: interrupt now if the driver's used_event asks for it (`Queue.notify_due`)."""
        if queue.notify_due() and self._interrupt is not None:
            self._interrupt.signal_used_queue()

    def _tx(self) -> None:
        queue = self._queues[TX]
        sent = 0
        while True:
            while (chain := self._pop(queue, "tx_malformed_frames")) is not None:
                if not self._send(queue, chain):
                    return
                sent += 1
                self._signal_if_due(queue)
            if not queue.enable_notification():
                break
        # The TAP's peer handles a frame inside our writev (tun delivers it synchronously),
        # so its answer -- a TCP ACK, mostly -- is usually in the TAP already. Delivering it
        # now lets one interrupt carry both the tx completions and the answer, instead of a
        # second interrupt a moment later (each costs the guest an InterruptStatus read and
        # an ACK write, and a guest's TCP sends no more until both have arrived).
        if self.pending or (sent and self.wants_tap_input()):
            self._rx()

    def _send(self, queue: Queue, chain: DescriptorChain) -> bool:
        """Transmit one chain; False (chain given back) when the rate limiter says wait."""
        length = chain.readable_len
        if length < VNET_HDR_SIZE or length > MAX_BUFFER:
            _log.warning("Guest sent a malformed frame of %d bytes on %s", length, self.iface_id)
            self.metrics["tx_malformed_frames"] += 1
            queue.add_used(chain.head, 0)
            return True
        if self.tx_rate_limiter is not None and not self.tx_rate_limiter.consume(length - VNET_HDR_SIZE):
            self.metrics["tx_rate_limiter_throttled"] += 1
            self._tx_throttled = True
            queue.undo_pop()
            return False
        views = chain.reader().views(length)
        self.metrics["tx_count"] += 1
        if self.mmds is not None and self.mmds.is_mmds_frame(_head_bytes(views, VNET_HDR_SIZE, 64)):
            self.metrics["mmds_frames"] += 1
            self.mmds.receive(b"".join(bytes(v) for v in views)[VNET_HDR_SIZE:])
            self._queue_mmds_output()
            self._rx()  # the answers are in the rx ring before this frame shows as sent
        else:
            try:
                self.backend.writev(views)
                self.metrics["tx_bytes_count"] += length - VNET_HDR_SIZE
                self.metrics["tx_packets_count"] += 1
            except OSError as e:
                self.metrics["tap_write_fails"] += 1
                self.metrics["tx_fails"] += 1
                if e.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.EIO, errno.EINVAL):
                    _log.error("%s: write to the TAP failed: %s", self.iface_id, e)
        queue.add_used(chain.head, 0)
        return True

    def _queue_mmds_output(self) -> None:
        assert self.mmds is not None
        for frame in self.mmds.take_output():
            self._defer(bytes(VNET_HDR_SIZE) + frame)

    def _defer(self, frame: bytes) -> None:
        if len(self.pending) >= MAX_PENDING:
            self.metrics["rx_dropped_frames"] += 1
            return
        self.pending.append(frame)

    # --- RX ----------------------------------------------------------------------------------

    def _rx(self) -> None:
        queue = self._queues[RX]
        while not self._rx_throttled:
            if self.pending:
                if not self._deliver_pending(queue):
                    return
                continue
            if not self._receive_from_tap(queue):
                return
            self._signal_if_due(queue)

    def _admit_rx(self, nbytes: int) -> bool:
        if self.rx_rate_limiter is None or self.rx_rate_limiter.consume(nbytes):
            return True
        self.metrics["rx_rate_limiter_throttled"] += 1
        self._rx_throttled = True
        return False

    def _pop_rx(self, queue: Queue, need: int, *, holding: bool = False) -> tuple[list[DescriptorChain], bool]:
        """Chains holding up to `need` bytes (one chain without MRG_RXBUF), and whether a
        malformed chain cut the collection short.

        Chains are completed in the order they were popped, so that giving back the unused
        ones (`undo_pop`) never rewinds `next_avail` past a chain already completed (which
        would then be popped and completed twice, and an earlier one never). So a malformed
        chain met while chains are held for a frame (`holding`, or collected here) is not
        completed: it is given back and ends the collection; the caller uses what it has or
        returns the held chains empty (`_flush`), after which the malformed chain comes first
        and is completed on its own.
        """
        chains: list[DescriptorChain] = []
        room = 0
        while room < need:
            held = holding or bool(chains)
            try:
                chain = queue.pop()
            except ChainError as e:
                if held:
                    queue.undo_pop()
                    return chains, True
                _log.warning("%s", str(e))
                self.metrics["rx_fails"] += 1
                queue.add_used(e.head, 0)
                continue
            if chain is None:
                if queue.enable_notification():  # the guest added buffers meanwhile
                    continue
                break
            if chain.writable_len < (1 if held else VNET_HDR_SIZE):
                if held:
                    queue.undo_pop()
                    return chains, True
                _log.warning("Guest gave a %d-byte rx buffer on %s", chain.writable_len, self.iface_id)
                self.metrics["rx_fails"] += 1
                queue.add_used(chain.head, 0)
                continue
            chains.append(chain)
            room += chain.writable_len
            if not self.mergeable:
                break
        return chains, False

    def _flush(self, queue: Queue, chains: list[DescriptorChain]) -> None:
        """Return held chains empty, in pop order (a malformed chain behind them blocks them)."""
        for chain in chains:
            queue.add_used(chain.head, 0)
        self.metrics["rx_flushed_buffers"] += len(chains)

    def _starved(self) -> None:
        self.metrics["no_rx_avail_buffer"] += 1
        self._rx_starved = True

    def _receive_from_tap(self, queue: Queue) -> bool:
        """Read one frame from the TAP into guest buffers; False when there is nothing to do."""
        # Mergeable buffers: enough for a full-size Ethernet frame up front (most frames); a
        # bigger (GSO) frame spills into the scratch area and its tail is copied into more.
        chains, blocked = self._pop_rx(queue, TYPICAL_BUFFER if self.mergeable else MAX_BUFFER)
        if not chains:
            self._starved()
            return False
        views = [v for chain in chains for v in chain.writer().views(chain.writable_len)]
        room = sum(len(v) for v in views)
        try:
            spill = [self._scratch[: MAX_BUFFER - room]] if room < MAX_BUFFER else []
            n = self.backend.readv([*views, *spill])
        except BlockingIOError:
            _give_back(queue, len(chains))
            return False
        except OSError as e:
            _give_back(queue, len(chains))
            self.metrics["tap_read_fails"] += 1
            _log.error("%s: read from the TAP failed: %s", self.iface_id, e)
            return False
        if n < VNET_HDR_SIZE:
            _give_back(queue, len(chains))
            self.metrics["rx_dropped_frames"] += 1
            return True
        held = chains
        if n > room and self.mergeable and not blocked:
            more, blocked = self._pop_rx(queue, n - room, holding=True)
            held = chains + more
            if room + sum(chain.writable_len for chain in more) >= n:
                tail = self._scratch[: n - room]
                for chain in more:
                    part = tail[: chain.writable_len]
                    chain.writer().write(part)
                    tail = tail[len(part) :]
                chains, room = held, room + sum(chain.writable_len for chain in more)
        if n > room or not self._admit_rx(n - VNET_HDR_SIZE):
            if n > room and not self.mergeable:
                self.metrics["rx_dropped_frames"] += 1  # can never fit a non-mergeable buffer
            else:
                self.metrics["rx_deferred_frames"] += 1
                self._defer(_gather(views, self._scratch, n))
            if n > room and blocked:
                self._flush(queue, held)
            else:
                _give_back(queue, len(held))
            return True
        self._complete(queue, chains, n)
        return True

    def _deliver_pending(self, queue: Queue) -> bool:
        """Copy the oldest waiting frame into guest buffers; False when it must wait."""
        frame = self.pending[0]
        chains, blocked = self._pop_rx(queue, len(frame))
        if not chains:
            self._starved()
            return False
        room = sum(ch.writable_len for ch in chains)
        if room < len(frame):
            if blocked:
                self._flush(queue, chains)
                return True
            _give_back(queue, len(chains))
            if not self.mergeable:
                self.pending.popleft()
                self.metrics["rx_dropped_frames"] += 1
                return True
            self._starved()
            return False
        if not self._admit_rx(len(frame) - VNET_HDR_SIZE):
            _give_back(queue, len(chains))
            return False
        self.pending.popleft()
        rest = memoryview(frame)
        for chain in chains:
            part = rest[: chain.writable_len]
            chain.writer().write(part)
            rest = rest[len(part) :]
        self._complete(queue, chains, len(frame))
        return True

    def _complete(self, queue: Queue, chains: list[DescriptorChain], n: int) -> None:
        """The frame's `n` bytes are in `chains`: set num_buffers, return the used ones."""
        used = []
        left = n
        for chain in chains:
            take = min(left, chain.writable_len)
            if take == 0:
                break
            used.append((chain, take))
            left -= take
        _give_back(queue, len(chains) - len(used))
        writer = used[0][0].writer()
        writer.skip(10)
        num, pos = _NUM_BUFFERS.pack(len(used)), 0
        assert self._mem is not None
        for segment in writer.segments(2):
            self._mem.write(segment.addr, num[pos : pos + segment.length])
            pos += segment.length
        for chain, take in used:
            queue.add_used(chain.head, take)
        self.metrics["rx_bytes_count"] += n - VNET_HDR_SIZE
        self.metrics["rx_packets_count"] += 1
        self.metrics["rx_count"] += 1


def _give_back(queue: Queue, count: int) -> None:
    """Undo the last `count` pops (chains popped, not used)."""
    for _ in range(count):
        queue.undo_pop()


def _head_bytes(views: list[memoryview], skip: int, n: int) -> bytes:
    """Bytes [skip, skip + n) of the concatenated views (fewer if they are shorter)."""
    out = bytearray()
    for view in views:
        if skip >= len(view):
            skip -= len(view)
            continue
        out += view[skip : skip + n - len(out)]
        skip = 0
        if len(out) >= n:
            break
    return bytes(out)


def _gather(views: list[memoryview], scratch: memoryview, n: int) -> bytes:
    """The first `n` bytes of the guest views followed by the scratch area."""
    out = bytearray()
    for view in views:
        out += view[: n - len(out)]
        if len(out) >= n:
            return bytes(out)
    out += scratch[: n - len(out)]
    return bytes(out)
