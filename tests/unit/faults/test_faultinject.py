"""Worker-side fault triggers: after_requests, probability, count, and what each kind does."""

from __future__ import annotations

import random
import time

import pytest

from shared.devstate import FATAL_HANG
from shared.faultinject import Fault, FaultInjector


def hits(injector: FaultInjector, requests: int) -> list[int]:
    return [i for i in range(1, requests + 1) if injector.check() is not None]


def test_after_requests_skips_that_many_and_counts_again_after_each_hit():
    injector = FaultInjector()
    injector.arm(Fault("io_error", after_requests=3, count=2))

    assert hits(injector, 20) == [4, 8]
    assert injector.fault is None


def test_count_zero_never_disarms():
    injector = FaultInjector()
    injector.arm(Fault("io_error", count=0))

    assert len(hits(injector, 50)) == 50
    assert injector.fault is not None


def test_probability_hits_some_requests_only():
    injector = FaultInjector(rng=random.Random(7))
    injector.arm(Fault("drop", probability=0.25, count=0))

    n = len(hits(injector, 400))

    assert 60 < n < 140


def test_non_fatal_hits_are_reported_with_what_remains():
    fired: list[tuple[str, int]] = []
    injector = FaultInjector(on_fired=lambda kind, left: fired.append((kind, left)))
    injector.arm(Fault("io_error", count=2))

    hits(injector, 5)

    assert fired == [("io_error", 1), ("io_error", 0)]


def test_delay_sleeps_then_lets_the_request_through():
    injector = FaultInjector()
    injector.arm(Fault("delay", delay_ms=50))

    begin = time.monotonic()
    assert injector.check() == "delay"
    assert time.monotonic() - begin >= 0.045


def test_crash_is_returned_for_the_device_to_finish_first():
    injector = FaultInjector()
    injector.arm(Fault("crash"))

    assert injector.check() == "crash"


def test_hang_records_the_cause_before_blocking(monkeypatch):
    fatal: list[int] = []
    injector = FaultInjector(on_fatal=fatal.append)
    injector.arm(Fault("hang"))

    class Stop(Exception):
        pass

    def no_sleep(ms: float) -> None:
        raise Stop

    monkeypatch.setattr("shared.faultinject.sleep_ms", no_sleep)
    with pytest.raises(Stop):
        injector.check()
    assert fatal == [FATAL_HANG]


def test_unknown_kinds_are_refused():
    injector = FaultInjector()
    with pytest.raises(ValueError, match="explode"):
        injector.arm(Fault("explode"))
