"""Guest-triggered log lines are rate-limited per call site, cut short, and the dropped ones counted."""

from __future__ import annotations

import logging

import pytest

from shared import ratelimited_log
from shared.ratelimited_log import MAX_LINE_CHARS, RateLimitedLog


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_beyond_the_burst_are_suppressed_and_counted() -> None:
    log = RateLimitedLog(logging.getLogger("test.rl"), per_second=1, burst=2, clock=FakeClock())
    before = ratelimited_log.suppressed_total()

    for _ in range(5):
        log.warning("guest did a thing")

    assert log.suppressed == 2
    assert ratelimited_log.suppressed_total() - before == 2


def test_next_line_reports_suppressed_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    log = RateLimitedLog(logging.getLogger("test.rl"), per_second=1, burst=0, clock=clock)
    for text in ("first", "dropped", None, "later"):
        if text is None:
            clock.now += 1.0
        else:
            log.warning(text)  # one call site

    assert caplog.records[-1].getMessage() == "later (1 similar lines suppressed)"


def test_each_call_site_has_its_own_bucket(caplog: pytest.LogCaptureFixture) -> None:
    """A flooded message does not silence another one (Firecracker's per-callsite limit)."""
    log = RateLimitedLog(logging.getLogger("test.rl"), per_second=1, burst=0, clock=FakeClock())
    for _ in range(100):
        log.warning("flood")
    log.error("the line that matters")

    assert caplog.records[-1].getMessage() == "the line that matters"
    assert log.suppressed == 99


def test_a_long_guest_value_is_cut(caplog: pytest.LogCaptureFixture) -> None:
    log = RateLimitedLog(logging.getLogger("test.rl"))
    log.warning("guest said %s", "x" * 100_000)

    message = caplog.records[-1].getMessage()
    assert len(message) < MAX_LINE_CHARS + 100 and message.endswith("more characters)")


def test_exception_keeps_the_traceback(caplog: pytest.LogCaptureFixture) -> None:
    log = RateLimitedLog(logging.getLogger("test.rl"))
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("device crashed")
    assert caplog.records[-1].exc_info is not None
