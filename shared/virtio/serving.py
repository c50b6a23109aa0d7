"""How a device serves a queue: the loop every device shares, written once.

- `pop_well_formed`: the next chain; a malformed one (bad descriptor, loop, out of guest
  memory) is completed with length 0 and reported, never raised to the device.
- `drain`: every available chain, and those that arrive while serving, before the queue's
  notifications are re-enabled; one used-buffer interrupt covers the batch, or comes earlier
  when the driver's used_event asks for it (EVENT_IDX).
- `SingleQueueDevice`: the rest of a device with one request queue served in order (block,
  entropy): activation, reset, the rate limiter's throttle, and `process_queue`, where a
  corrupt ring asks for DEVICE_NEEDS_RESET. The device writes only `_serve`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from shared.memory import GuestMemory
from shared.ratelimit import RateLimiter
from shared.ratelimited_log import RateLimitedLog
from shared.virtio.chain import ChainError, DescriptorChain
from shared.virtio.device import DeviceError, Interrupt
from shared.virtio.queue import Queue, QueueError

_log = RateLimitedLog(logging.getLogger(__name__))


def pop_well_formed(queue: Queue, on_malformed: Callable[[ChainError], None]) -> DescriptorChain | None:
    """The next well-formed chain, None when the ring is empty; malformed ones are completed
    with length 0 (logged, rate-limited) and passed to `on_malformed` (to count them)."""
    while True:
        try:
            return queue.pop()
        except ChainError as e:
            _log.warning("%s", str(e))
            on_malformed(e)
            queue.add_used(e.head, 0)


def drain(
    queue: Queue,
    serve: Callable[[Queue, DescriptorChain], bool],
    interrupt: Interrupt | None,
    on_malformed: Callable[[ChainError], None],
) -> None:
    """Serve until the ring stays empty with notifications enabled, or `serve` returns False
    (it gave the chain back: throttled). The caller raises the batch's interrupt."""
    while True:
        while (chain := pop_well_formed(queue, on_malformed)) is not None:
            if not serve(queue, chain):
                return
            if queue.notify_due() and interrupt is not None:
                interrupt.signal_used_queue()
        if not queue.enable_notification():
            return


class SingleQueueDevice:
    """A virtio device with one request queue served in order, optionally rate-limited.

    A subclass sets `device_name` (for messages), `event_metric` (counted per queue event)
    and `malformed_metric` (per malformed chain), calls `_init_queue(...)` and writes
    `_serve(queue, chain) -> bool`: False means it gave the chain back (`queue.undo_pop()`)
    and set `_throttled`, so that the worker's timer on `throttle_delay()` serves it later.
    """

    device_name = "virtio device"
    event_metric = "queue_event_count"
    malformed_metric = "invalid_reqs_count"
    metrics: dict[str, int]
    rate_limiter: RateLimiter | None

    def _init_queue(self, queue_size: int, rate_limiter: RateLimiter | None) -> None:
        self.rate_limiter = rate_limiter
        self.queue_max_sizes: Sequence[int] = (queue_size,)
        self._mem: GuestMemory | None = None
        self._queue: Queue | None = None
        self._interrupt: Interrupt | None = None
        self._throttled = False

    def activate(self, mem: GuestMemory, queues: Sequence[Queue], interrupt: Interrupt, features: int) -> None:
        if len(queues) != 1:
            self.metrics["activate_fails"] += 1
            raise DeviceError(f"{self.device_name} has one queue, got {len(queues)}")
        self._mem, self._queue, self._interrupt = mem, queues[0], interrupt

    def reset(self) -> None:
        self._mem = self._queue = self._interrupt = None
        self._throttled = False

    @property
    def active(self) -> bool:
        return self._queue is not None

    def throttle_delay(self) -> float | None:
        """Seconds until a throttled queue should be processed again; None if not throttled."""
        if not self._throttled or self.rate_limiter is None:
            return None
        return self.rate_limiter.time_until_ready()

    def process_queue(self, index: int) -> None:
        queue, interrupt = self._queue, self._interrupt
        if queue is None or interrupt is None or index != 0:
            return
        self.metrics[self.event_metric] += 1
        self._throttled = False
        try:
            drain(queue, self._serve, interrupt, self._count_malformed)
        except QueueError as e:
            self.metrics["needs_reset_count"] += 1
            interrupt.signal_needs_reset(str(e))
            return
        if queue.needs_notification():
            interrupt.signal_used_queue()

    def _count_malformed(self, _error: ChainError) -> None:
        self.metrics[self.malformed_metric] += 1

    def _serve(self, queue: Queue, chain: DescriptorChain) -> bool:
        raise NotImplementedError
