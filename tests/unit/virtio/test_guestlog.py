"""Guest-triggered log lines are rate-limited and the dropped ones are counted."""

from __future__ import annotations

import logging

import pytest

from shared.virtio.guestlog import GuestLog


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_beyond_the_burst_are_suppressed(caplog: pytest.LogCaptureFixture) -> None:
    log = GuestLog(logging.getLogger("test.guestlog"), per_second=1, burst=2, clock=FakeClock())

    for _ in range(5):
        log.warning("guest did a thing")

    assert log.suppressed == 2


def test_next_line_reports_suppressed_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    log = GuestLog(logging.getLogger("test.guestlog"), per_second=1, burst=0, clock=clock)
    log.warning("first")
    log.warning("dropped")
    clock.now += 1.0

    log.warning("later")

    assert caplog.records[-1].getMessage() == "later (1 similar lines suppressed)"
