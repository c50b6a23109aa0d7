"""The virtio-rng device (virtio spec 5.4): one request queue the driver fills with
device-writable buffers, which the device fills with random bytes.

It knows its queue, guest memory, an `Interrupt`, an `EntropySource` and optionally a
`RateLimiter` (Firecracker's `rate_limiter` of PUT /entropy: bandwidth in bytes, ops in
requests); the worker wires ioeventfd -> `process_queue(0)` and a timer on
`throttle_delay()` -> `process_queue(0)`.

Guest input is bounded: one request gets at most `MAX_BYTES_PER_REQUEST` bytes (the spec
lets the device write less than the buffer holds; Linux's driver asks for at most a page),
so a guest cannot make the worker generate its whole RAM's worth for one request. A
malformed chain, or one with nothing writable, completes with length 0 and is counted in
`entropy_event_fails`; a corrupt ring asks for DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import logging

from devices.rng.backend import EntropySource, SourceError
from shared.ratelimit import RateLimiter
from shared.ratelimited_log import RateLimitedLog
from shared.virtio import constants as c
from shared.virtio.chain import DescriptorChain
from shared.virtio.queue import Queue
from shared.virtio.serving import SingleQueueDevice

_log = RateLimitedLog(logging.getLogger(__name__))

QUEUE_SIZE = 256
MAX_BYTES_PER_REQUEST = 64 * 1024

# Firecracker's `entropy` metrics group, field for field, then ours.
METRIC_NAMES = (
    "activate_fails",
    "entropy_event_fails",
    "entropy_event_count",
    "entropy_bytes",
    "host_rng_fails",
    "entropy_rate_limiter_throttled",
    "needs_reset_count",
)


class EntropyDevice(SingleQueueDevice):
    """virtio-rng with one queue of `queue_size` entries."""

    device_type = c.VIRTIO_ID_RNG
    device_name = "virtio-rng"
    event_metric = "entropy_event_count"
    malformed_metric = "entropy_event_fails"

    def __init__(
        self,
        source: EntropySource,
        *,
        rate_limiter: RateLimiter | None = None,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self.source = source
        self.metrics = dict.fromkeys(METRIC_NAMES, 0)
        self._init_queue(queue_size, rate_limiter)

    @property
    def avail_features(self) -> int:
        return sum(c.feature(bit) for bit in (c.VIRTIO_F_VERSION_1, c.VIRTIO_F_EVENT_IDX, c.VIRTIO_F_INDIRECT_DESC))

    def read_config(self, offset: int, size: int) -> bytes:
        return bytes(size)  # virtio-rng has no configuration space

    def write_config(self, offset: int, data: bytes) -> None:
        _log.warning("Guest wrote virtio-rng config space at %#x (it has none)", offset)

    def _serve(self, queue: Queue, chain: DescriptorChain) -> bool:
        """Fill one request; False (chain given back) when the rate limiter says wait."""
        wanted = min(chain.writable_len, MAX_BYTES_PER_REQUEST)
        if wanted == 0:
            _log.warning("Guest sent an entropy request with no writable buffer")
            self.metrics["entropy_event_fails"] += 1
            queue.add_used(chain.head, 0)
            return True
        if self.rate_limiter is not None and not self.rate_limiter.consume(wanted):
            self.metrics["entropy_rate_limiter_throttled"] += 1
            self._throttled = True
            queue.undo_pop()
            return False
        written = 0
        try:
            for view in chain.writer().views(wanted):
                self.source.fill(view)
                written += len(view)
        except SourceError as e:
            _log.error("%s", str(e))
            self.metrics["host_rng_fails"] += 1
            written = 0
        self.metrics["entropy_bytes"] += written
        queue.add_used(chain.head, written)
        return True
