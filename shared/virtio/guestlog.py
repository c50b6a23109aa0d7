"""Rate-limited logging for messages a guest can trigger.

A guest that can make us log at will can fill the host's disk and hide real problems
(Firecracker's `logger/rate_limited.rs` exists for this reason). Every log line caused by
guest input in the virtio code goes through a `GuestLog`: a burst is let through, then
at most `per_second` lines; the rest are counted and the count is reported with the next
line that passes.
"""

from __future__ import annotations

import logging
import time

from shared.ratelimit import Clock, TokenBucket


class GuestLog:
    """A logger wrapper that drops lines beyond a rate, and says how many it dropped."""

    def __init__(
        self, logger: logging.Logger, per_second: int = 10, burst: int = 50, *, clock: Clock = time.monotonic
    ) -> None:
        self.logger = logger
        self._bucket = TokenBucket(per_second, burst, 1000, clock=clock)
        self.suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        self._log(logging.WARNING, msg, args)

    def error(self, msg: str, *args: object) -> None:
        self._log(logging.ERROR, msg, args)

    def _log(self, level: int, msg: str, args: tuple[object, ...]) -> None:
        if not self._bucket.reduce(1):
            self.suppressed += 1
            return
        if self.suppressed:
            msg = f"{msg} ({self.suppressed} similar lines suppressed)"
            self.suppressed = 0
        self.logger.log(level, msg, *args)
