"""The virtio-balloon device (virtio spec 5.5): inflate, deflate, statistics, free page reporting.

Queues, in the order Linux's driver sets them up (an absent feature's queue is skipped, so
the indices shift): 0 inflate, 1 deflate, then stats when VIRTIO_BALLOON_F_STATS_VQ is
offered (statistics enabled), then reporting when VIRTIO_BALLOON_F_REPORTING is offered
(free page reporting, an embervm extension, off by default). The transport exposes exactly
that many queues. Config space: le32 num_pages (the target, set by the host), le32 actual
(written by the guest). VIRTIO_BALLOON_F_DEFLATE_ON_OOM is offered when configured; it only
changes what the guest's driver does.

Pages the guest gives to the balloon (inflate, reporting) are released with the
`PageBackend`. Everything from the guest is hostile and bounded: a PFN that is not a RAM
page (`pages.RamMap`: outside RAM, in the MMIO gap, in the legacy hole) is refused and
counted (`invalid_pfns`), never punched; one chain carries at most `MAX_PFNS_PER_CHAIN`
PFNs (the rest are refused); inflation and reporting together release at most
`RELEASE_PAGES_PER_S` pages a second (a token bucket; a refused chain waits on the worker's
timer, `throttle_delay`). Deflated pages need no work: the next guest access faults in a
zero page. The stats buffer is held until the next poll (`request_stats`), as the spec's
stats protocol says, and parsed on its return (`stats.parse_stats`).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence
from typing import Any

from devices.balloon.backend import BackendError, PageBackend
from devices.balloon.pages import PAGE_SHIFT, PAGE_SIZE, RamMap, merge
from devices.balloon.stats import StatsError, parse_stats
from shared.memory import GuestMemory
from shared.ratelimit import BucketConfig, RateLimiter
from shared.ratelimited_log import RateLimitedLog
from shared.virtio import constants as c
from shared.virtio.chain import ChainError, DescriptorChain
from shared.virtio.device import DeviceError, Interrupt, config_slice
from shared.virtio.queue import Queue, QueueError
from shared.virtio.serving import drain

_log = RateLimitedLog(logging.getLogger(__name__))

# Feature bits (spec 5.5.3).
VIRTIO_BALLOON_F_MUST_TELL_HOST = 0
VIRTIO_BALLOON_F_STATS_VQ = 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2
VIRTIO_BALLOON_F_REPORTING = 5

QUEUE_SIZE = 256
MAX_PFNS_PER_CHAIN = 1024  # Linux sends at most 256 (VIRTIO_BALLOON_ARRAY_PFNS_MAX)
RELEASE_PAGES_PER_S = 1 << 18  # 1 GiB/s of 4 KiB pages
_PFN = struct.Struct("<I")
_CONFIG = struct.Struct("<II")  # num_pages, actual
_ACTUAL_OFFSET = 4
U32_MAX = 0xFFFFFFFF

INFLATE, DEFLATE, STATS, REPORTING = "inflate", "deflate", "stats", "reporting"

# Firecracker's `balloon` metrics group, field for field, then embervm's own.
METRIC_NAMES = (
    "activate_fails",
    "inflate_count",
    "stats_updates_count",
    "stats_update_fails",
    "deflate_count",
    "event_fails",
    "inflated_pages",
    "deflated_pages",
    "invalid_pfns",
    "released_bytes",
    "release_fails",
    "release_throttled",
    "free_page_report_count",
    "malformed_chains",
    "unknown_stat_tags",
    "needs_reset_count",
)


class BalloonDevice:
    """virtio-balloon over guest RAM of `mem_size` bytes, releasing pages with `backend`."""

    device_type = c.VIRTIO_ID_BALLOON

    def __init__(
        self,
        backend: PageBackend,
        mem_size: int,
        *,
        target_pages: int = 0,
        deflate_on_oom: bool = False,
        stats_interval_s: int = 0,
        free_page_reporting: bool = False,
        queue_size: int = QUEUE_SIZE,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.backend = backend
        self.ram = RamMap(mem_size)
        self.target_pages = target_pages
        self.actual_pages = 0
        self.deflate_on_oom = deflate_on_oom
        self.stats_enabled = stats_interval_s > 0  # fixed at boot, as Firecracker's
        self.stats_interval_s = stats_interval_s
        self.free_page_reporting = free_page_reporting
        self.stats: dict[str, int] = {}
        self.on_change = on_change
        self.metrics = dict.fromkeys(METRIC_NAMES, 0)
        self.roles: tuple[str, ...] = (INFLATE, DEFLATE) + ((STATS,) if self.stats_enabled else ())
        self.roles += (REPORTING,) if free_page_reporting else ()
        self.queue_max_sizes: Sequence[int] = (queue_size,) * len(self.roles)
        bucket = BucketConfig(RELEASE_PAGES_PER_S, 0, 1000)
        self.limiter = RateLimiter(None, bucket) if clock is None else RateLimiter(None, bucket, clock=clock)
        self._mem: GuestMemory | None = None
        self._queues: Sequence[Queue] = ()
        self._interrupt: Interrupt | None = None
        self._stats_head: int | None = None  # the stats buffer the device holds until the next poll
        self._throttled = False

    # --- identity and configuration ------------------------------------------------------

    @property
    def avail_features(self) -> int:
        bits = [c.VIRTIO_F_VERSION_1]
        if self.stats_enabled:
            bits.append(VIRTIO_BALLOON_F_STATS_VQ)
        if self.deflate_on_oom:
            bits.append(VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
        if self.free_page_reporting:
            bits.append(VIRTIO_BALLOON_F_REPORTING)
        return sum(c.feature(bit) for bit in bits)

    def read_config(self, offset: int, size: int) -> bytes:
        return config_slice(_CONFIG.pack(self.target_pages, self.actual_pages), offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        """Only `actual` is the driver's to write (whole, as Linux's virtio_cwrite_le does)."""
        if offset != _ACTUAL_OFFSET or len(data) != 4:
            _log.warning(
                "Guest wrote balloon config space at %#x (%d bytes): only actual is writable", offset, len(data)
            )
            return
        actual = int.from_bytes(data, "little")
        if actual != self.actual_pages:
            self.actual_pages = actual
            self.on_change()

    def set_target(self, pages: int) -> None:
        """A new target (PATCH /balloon); the driver learns it from a config-change interrupt."""
        if not 0 <= pages <= U32_MAX:
            raise ValueError(f"a balloon target of {pages} pages does not fit the 32-bit num_pages field")
        self.target_pages = pages
        if self._interrupt is not None:
            self._interrupt.signal_config_change()

    # --- durable state (shared.devworker puts it in the state area) --------------------------

    def save_state(self) -> dict[str, Any]:
        return {"actual_pages": self.actual_pages, "stats": dict(self.stats)}

    def load_state(self, state: dict[str, Any]) -> None:
        actual = int(state["actual_pages"])
        if not 0 <= actual <= U32_MAX:
            raise ValueError(f"actual_pages {actual} out of range")
        self.actual_pages = actual
        self.stats = {str(k): int(v) for k, v in dict(state["stats"]).items()}

    # --- lifecycle ---------------------------------------------------------------------------

    def activate(self, mem: GuestMemory, queues: Sequence[Queue], interrupt: Interrupt, features: int) -> None:
        if len(queues) != len(self.roles):
            self.metrics["activate_fails"] += 1
            raise DeviceError(f"this balloon has {len(self.roles)} queues, got {len(queues)}")
        needed = (VIRTIO_BALLOON_F_STATS_VQ, self.stats_enabled), (VIRTIO_BALLOON_F_REPORTING, self.free_page_reporting)
        for bit, offered in needed:
            if offered and not features & c.feature(bit):
                # the driver would not set up that queue, so the indices would not match
                self.metrics["activate_fails"] += 1
                raise DeviceError(f"the driver declined feature bit {bit}, whose queue this balloon has")
        self._mem, self._queues, self._interrupt = mem, queues, interrupt
        self._stats_head = None
        if self.stats_enabled:
            # Linux adds its first stats buffer and kicks before it sets DRIVER_OK (init_vqs),
            # a kick the transport drops, and never kicks for it again: take it now.
            self.process_queue(self.roles.index(STATS))

    def reset(self) -> None:
        self._mem, self._queues, self._interrupt = None, (), None
        self._stats_head = None
        self._throttled = False

    @property
    def active(self) -> bool:
        return self._interrupt is not None

    # --- timers (the worker's loop) ----------------------------------------------------------

    def throttle_delay(self) -> float | None:
        """Seconds until throttled inflate/reporting chains should be tried again; None if none."""
        return self.limiter.time_until_ready() if self._throttled else None

    def retry_throttled(self) -> None:
        self._throttled = False
        for index, role in enumerate(self.roles):
            if role in (INFLATE, REPORTING):
                self.process_queue(index)

    def cancel_retry(self) -> None:
        """Forget throttled chains (the device stopped serving; a reset starts over)."""
        self._throttled = False

    def request_stats(self) -> bool:
        """The polling interval passed: give the held stats buffer back so the driver refills
        it. False when there is none to give (the guest has not returned the last one)."""
        queue = self._queue_for(STATS)
        if queue is None or self._interrupt is None or self._stats_head is None:
            return False
        head, self._stats_head = self._stats_head, None
        try:
            queue.add_used(head, 0)
        except QueueError as e:
            self.metrics["needs_reset_count"] += 1
            self._interrupt.signal_needs_reset(str(e))
            return False
        if queue.needs_notification():
            self._interrupt.signal_used_queue()
        return True

    # --- queues ------------------------------------------------------------------------------

    def _queue_for(self, role: str) -> Queue | None:
        if role not in self.roles or not self._queues:
            return None
        return self._queues[self.roles.index(role)]

    def process_queue(self, index: int) -> None:
        interrupt = self._interrupt
        if interrupt is None or not 0 <= index < len(self._queues):
            return
        role, queue = self.roles[index], self._queues[index]
        serve = {INFLATE: self._inflate, DEFLATE: self._deflate, STATS: self._stats, REPORTING: self._report}[role]
        try:
            drain(queue, serve, interrupt, self._count_malformed)
        except QueueError as e:
            self.metrics["needs_reset_count"] += 1
            interrupt.signal_needs_reset(str(e))
            return
        if queue.needs_notification():
            interrupt.signal_used_queue()

    def _count_malformed(self, _error: ChainError) -> None:
        self.metrics["malformed_chains"] += 1

    def _pfns(self, chain: DescriptorChain) -> list[int]:
        """The chain's PFNs (at most MAX_PFNS_PER_CHAIN; the rest and a torn last one are
        refused and counted)."""
        total = chain.readable_len
        count = min(total // _PFN.size, MAX_PFNS_PER_CHAIN)
        refused = total // _PFN.size - count + (1 if total % _PFN.size else 0)
        if refused:
            _log.warning("Guest sent a balloon chain of %d bytes: %d PFN(s) refused", total, refused)
            self.metrics["invalid_pfns"] += refused
        data = chain.reader().read(count * _PFN.size)
        return [pfn for (pfn,) in _PFN.iter_unpack(data)]

    def _admit(self, queue: Queue, pages: int) -> bool:
        if self.limiter.consume(0, min(pages, RELEASE_PAGES_PER_S)):
            return True
        self.metrics["release_throttled"] += 1
        self._throttled = True
        queue.undo_pop()
        return False

    def _inflate(self, queue: Queue, chain: DescriptorChain) -> bool:
        pfns = self._pfns(chain)
        if pfns and not self._admit(queue, len(pfns)):
            return False
        self.metrics["inflate_count"] += 1
        ranges, refused = self.ram.page_ranges(pfns)
        if refused:
            _log.warning("Guest inflated %d page frame(s) that are not RAM: refused", refused)
            self.metrics["invalid_pfns"] += refused
        self.metrics["inflated_pages"] += len(pfns) - refused
        self._release(ranges)
        queue.add_used(chain.head, 0)
        return True

    def _deflate(self, queue: Queue, chain: DescriptorChain) -> bool:
        pfns = self._pfns(chain)
        self.metrics["deflate_count"] += 1
        _, refused = self.ram.page_ranges(pfns)
        self.metrics["invalid_pfns"] += refused
        self.metrics["deflated_pages"] += len(pfns) - refused
        queue.add_used(chain.head, 0)  # nothing to do: a released page comes back as zeros
        return True

    def _stats(self, queue: Queue, chain: DescriptorChain) -> bool:
        if self._stats_head is not None:  # the driver sent another before we gave this one back
            self.metrics["stats_update_fails"] += 1
            queue.add_used(self._stats_head, 0)
        self._stats_head = chain.head
        try:
            if chain.readable_len > 4096:
                raise StatsError(f"a stats buffer of {chain.readable_len} bytes")
            stats, unknown = parse_stats(chain.reader().read(chain.readable_len))
        except StatsError as e:
            _log.warning("Guest sent malformed balloon statistics: %s", str(e))
            self.metrics["stats_update_fails"] += 1
            return True
        self.metrics["unknown_stat_tags"] += unknown
        self.metrics["stats_updates_count"] += 1
        self.stats.update(stats)  # a statistic the guest left out keeps its last value
        self.on_change()
        return True

    def _report(self, queue: Queue, chain: DescriptorChain) -> bool:
        """Free page reporting: each device-readable buffer is a run of free guest pages."""
        pieces = [(d.addr, d.length) for d in chain.readable]
        pages = sum(length >> PAGE_SHIFT for _, length in pieces)
        if pages and not self._admit(queue, pages):
            return False
        self.metrics["free_page_report_count"] += 1
        offsets: list[int] = []
        for addr, length in pieces:
            offset = self.ram.file_offset(addr, length)
            if offset is None or addr % PAGE_SIZE or length % PAGE_SIZE:
                self.metrics["invalid_pfns"] += max(1, length >> PAGE_SHIFT)
                continue
            offsets += range(offset, offset + length, PAGE_SIZE)
        self._release(merge(offsets, PAGE_SIZE))
        queue.add_used(chain.head, 0)
        return True

    def _release(self, ranges: list[tuple[int, int]]) -> None:
        for offset, length in ranges:
            try:
                self.backend.discard(offset, length)
            except BackendError as e:
                _log.error("%s", str(e))
                self.metrics["release_fails"] += 1
                continue
            self.metrics["released_bytes"] += length
