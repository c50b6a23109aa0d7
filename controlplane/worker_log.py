"""Worker log lines in the supervisor's log: rate-limited, attributed, escaped.

A worker's `Log` message is untrusted text. Each line is written as
`[<worker> worker pid <pid>] <text>`, with every control or invisible character
(newlines, ESC, Unicode line separators, bidi overrides) and the backslash escaped, so a
worker can never write a line of its own, nor one that reads like the supervisor's
("exiting successfully"). Lines are cut to `MAX_LINE_CHARS`, and each worker has a token
bucket (`LINES_PER_S`, bursts of `BURST_LINES`), keyed by worker name so a restarted worker
does not get a fresh one; a flood is summarised by one line saying how many were dropped.
"""

from __future__ import annotations

import logging
import time

from controlplane.worker_trust import TrustCounters
from shared.ratelimit import Clock, TokenBucket

MAX_LINE_CHARS = 1000
LINES_PER_S = 20
BURST_LINES = 100
LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def escape(text: str) -> str:
    """`text` with the backslash and every non-printable character as a Python escape."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return "".join(out)


class WorkerLogRelay:
    """Writes workers' log lines to `log` (one instance per microVM, monitor thread only)."""

    def __init__(self, log: logging.Logger, counters: TrustCounters, *, clock: Clock = time.monotonic) -> None:
        self._log = log
        self._counters = counters
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._dropped: dict[str, int] = {}

    def relay(self, worker: str, pid: int, level: str, text: str) -> None:
        bucket = self._buckets.get(worker)
        if bucket is None:
            bucket = self._buckets[worker] = TokenBucket(
                LINES_PER_S, BURST_LINES - LINES_PER_S, 1000, clock=self._clock
            )
        head = f"[{escape(worker)} worker pid {pid}]"
        if not bucket.reduce(1):
            self._dropped[worker] = self._dropped.get(worker, 0) + 1
            self._counters.logs_rate_limited += 1
            return
        dropped = self._dropped.pop(worker, 0)
        if dropped:
            self._log.warning("%s %d log lines dropped (more than %d a second)", head, dropped, LINES_PER_S)
        if len(text) > MAX_LINE_CHARS:
            self._counters.logs_truncated += 1
            text = text[:MAX_LINE_CHARS] + f"... ({len(text) - MAX_LINE_CHARS} more characters)"
        self._log.log(LEVELS.get(level, logging.INFO), "%s %s", head, escape(text))
