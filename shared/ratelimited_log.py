"""Rate-limited logging for lines that untrusted input can trigger (a guest, a worker).

Whoever can make us log at will can fill the host's disk, drown the lines that matter and
make us spend CPU formatting. Firecracker's `logger/rate_limited.rs` answers with a token
bucket per call site, and so do we: a `RateLimitedLog` wraps a `logging.Logger`, and each
place that calls it (file and line) gets its own bucket, so one flooded message does not
silence the others. A burst is let through, then at most `per_second` lines per call site;
the lines beyond are dropped and counted (`suppressed_total()` for the worker's metrics),
and the next line that passes says how many of its kind were dropped. Every line is cut to
`MAX_LINE_CHARS`: a guest-chosen value in a message cannot make one line large.
"""

from __future__ import annotations

import logging
import sys
import time
from types import CodeType

from shared.ratelimit import Clock, TokenBucket

MAX_LINE_CHARS = 512
MAX_SITES = 256  # call sites are finite (code locations); past this they share one bucket

_suppressed_total = 0


def suppressed_total() -> int:
    """Lines dropped by every `RateLimitedLog` of this process since it started."""
    return _suppressed_total


class _Site:
    __slots__ = ("bucket", "suppressed")

    def __init__(self, bucket: TokenBucket) -> None:
        self.bucket = bucket
        self.suppressed = 0


class RateLimitedLog:
    """A logger wrapper with a token bucket per call site; says how many lines it dropped."""

    def __init__(
        self, logger: logging.Logger, per_second: int = 10, burst: int = 50, *, clock: Clock = time.monotonic
    ) -> None:
        self.logger = logger
        self._per_second, self._burst, self._clock = per_second, burst, clock
        self._sites: dict[tuple[CodeType, int] | None, _Site] = {}
        self.suppressed = 0  # lines dropped by this logger, all call sites

    def warning(self, msg: str, *args: object) -> None:
        self._log(logging.WARNING, msg, args)

    def error(self, msg: str, *args: object) -> None:
        self._log(logging.ERROR, msg, args)

    def exception(self, msg: str, *args: object) -> None:
        """`error` with the traceback of the exception being handled."""
        self._log(logging.ERROR, msg, args, exc_info=True)

    def _site(self) -> _Site:
        caller = sys._getframe(3)  # _site <- _log <- warning/error <- the call site
        key: tuple[CodeType, int] | None = (caller.f_code, caller.f_lineno)
        site = self._sites.get(key)
        if site is None:
            if len(self._sites) >= MAX_SITES:
                key = None
                site = self._sites.get(None)
            if site is None:
                site = self._sites[key] = _Site(TokenBucket(self._per_second, self._burst, 1000, clock=self._clock))
        return site

    def _log(self, level: int, msg: str, args: tuple[object, ...], exc_info: bool = False) -> None:
        global _suppressed_total
        site = self._site()
        if not site.bucket.reduce(1):
            site.suppressed += 1
            self.suppressed += 1
            _suppressed_total += 1
            return
        try:
            text = msg % args if args else msg
        except (TypeError, ValueError):
            text = f"{msg} {args!r}"
        if len(text) > MAX_LINE_CHARS:
            text = f"{text[:MAX_LINE_CHARS]}... ({len(text) - MAX_LINE_CHARS} more characters)"
        if site.suppressed:
            text = f"{text} ({site.suppressed} similar lines suppressed)"
            site.suppressed = 0
        self.logger.log(level, "%s", text, exc_info=exc_info)
