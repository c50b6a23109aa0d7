"""Token-bucket rate limiting with Firecracker's semantics, minus the timerfd.

A `TokenBucket` holds up to `size` tokens and refills continuously, `size` tokens every
`refill_time_ms`. `one_time_burst` tokens are spent first and never come back. A request
for more tokens than the bucket can ever hold is *allowed* (it would otherwise never
pass), but it drives the budget negative, so the bucket refuses everything else for the
time it takes to pay that debt back: bandwidth still averages out to the configured rate.

A `RateLimiter` combines a bandwidth (bytes) and an ops bucket. It exposes how long to wait
(`time_until_ready`) instead of a timerfd: Python 3.11 has no `os.timerfd_*`, and a wait
time is exactly what an epoll loop takes as its timeout (`shared.eventloop`).

The clock is injectable (`clock=`, seconds as a float, monotonic) so tests need not sleep.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]


class RateLimitError(Exception):
    """A rate-limiter configuration is invalid (negative sizes or times)."""


@dataclass(frozen=True)
class BucketConfig:
    """One bucket's parameters, as in Firecracker's API `TokenBucket` object."""

    size: int
    one_time_burst: int = 0
    refill_time_ms: int = 1000

    def __post_init__(self) -> None:
        if self.size < 0 or self.one_time_burst < 0 or self.refill_time_ms < 0:
            raise RateLimitError(f"token bucket values must not be negative: {self}")


class TokenBucket:
    """A continuously refilled bucket of `size` tokens; size 0 (or refill 0) = unlimited."""

    def __init__(
        self, size: int, one_time_burst: int = 0, refill_time_ms: int = 1000, *, clock: Clock = time.monotonic
    ) -> None:
        self.config = BucketConfig(size, one_time_burst, refill_time_ms)
        self._clock = clock
        self.one_time_burst = float(one_time_burst)
        self.budget = float(size)  # starts full, like Firecracker's; negative while in debt
        self._last = clock()

    @classmethod
    def from_config(cls, config: BucketConfig, *, clock: Clock = time.monotonic) -> TokenBucket:
        return cls(config.size, config.one_time_burst, config.refill_time_ms, clock=clock)

    @property
    def size(self) -> int:
        return self.config.size

    @property
    def unlimited(self) -> bool:
        return self.config.size == 0 or self.config.refill_time_ms == 0

    @property
    def _rate(self) -> float:
        """Tokens per second."""
        return self.config.size * 1000.0 / self.config.refill_time_ms

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._last)
        self._last = now
        if not self.unlimited:
            self.budget = min(float(self.size), self.budget + elapsed * self._rate)

    def reduce(self, tokens: int) -> bool:
        """Take `tokens` if the bucket allows it now; False leaves the bucket unchanged."""
        if self.unlimited or tokens <= 0:
            return True
        if self.one_time_burst >= tokens:
            self.one_time_burst -= tokens
            return True
        self._refill()
        rest = tokens - self.one_time_burst
        if rest <= self.budget or (rest > self.size and self.budget >= 0):
            self.one_time_burst = 0.0
            self.budget -= rest
            return True
        return False

    def refund(self, tokens: int) -> None:
        """Give back tokens taken by a `reduce` whose request did not go ahead after all."""
        if self.unlimited or tokens <= 0:
            return
        self._refill()
        self.budget = min(float(self.size), self.budget + tokens)

    def time_until(self, tokens: int) -> float:
        """Seconds until `reduce(tokens)` would succeed (0.0 if it would now)."""
        if self.unlimited or tokens <= self.one_time_burst:
            return 0.0
        self._refill()
        rest = tokens - self.one_time_burst
        needed = 0.0 if rest > self.size else float(rest)  # an oversized request needs no debt
        return max(0.0, (needed - self.budget) / self._rate)


class _Keep(enum.Enum):
    """Marks a bucket `update` leaves alone."""

    KEEP = 0


_KEEP = _Keep.KEEP


class RateLimiter:
    """Bandwidth and ops limits for one device queue; either may be None (= unlimited)."""

    def __init__(
        self,
        bandwidth: BucketConfig | None = None,
        ops: BucketConfig | None = None,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self._clock = clock
        self.bandwidth = self._bucket(bandwidth)
        self.ops = self._bucket(ops)
        self._blocked: tuple[int, int] | None = None
        self.throttled_count = 0

    def _bucket(self, config: BucketConfig | None) -> TokenBucket | None:
        return None if config is None else TokenBucket.from_config(config, clock=self._clock)

    @property
    def is_blocked(self) -> bool:
        """True after a refused `consume`, until one succeeds."""
        return self._blocked is not None

    def consume(self, nbytes: int, ops: int = 1) -> bool:
        """Take `ops` operations and `nbytes` bytes together, or nothing at all."""
        if self.ops is not None and not self.ops.reduce(ops):
            return self._refuse(nbytes, ops)
        if self.bandwidth is not None and not self.bandwidth.reduce(nbytes):
            if self.ops is not None:
                self.ops.refund(ops)
            return self._refuse(nbytes, ops)
        self._blocked = None
        return True

    def _refuse(self, nbytes: int, ops: int) -> bool:
        self._blocked = (nbytes, ops)
        self.throttled_count += 1
        return False

    def time_until_ready(self) -> float:
        """Seconds until the last refused request would pass; 0.0 when nothing waits."""
        if self._blocked is None:
            return 0.0
        nbytes, ops = self._blocked
        waits = [0.0]
        if self.bandwidth is not None:
            waits.append(self.bandwidth.time_until(nbytes))
        if self.ops is not None:
            waits.append(self.ops.time_until(ops))
        return max(waits)

    def update(self, bandwidth: BucketConfig | _Keep | None = _KEEP, ops: BucketConfig | _Keep | None = _KEEP) -> None:
        """Replace a bucket at run time (None disables it; omitted keeps it).

        A new bucket starts full, as in Firecracker. A request that was refused stays
        remembered, so `time_until_ready` now answers for it under the new limits.
        """
        if not isinstance(bandwidth, _Keep):
            self.bandwidth = self._bucket(bandwidth)
        if not isinstance(ops, _Keep):
            self.ops = self._bucket(ops)
