"""The entropy worker as a real, confined process driven from the host."""

from __future__ import annotations

from devices.rng.testing import EntropyWorkerHarness
from shared.virtio import constants as c


def test_requests_are_filled_with_random_bytes(launcher) -> None:
    with EntropyWorkerHarness(launcher.zygote, launcher.run_dir) as worker:
        assert worker.setup() & c.STATUS_DRIVER_OK
        (n1, a), (n2, b) = worker.request(64, 4096)
        assert (n1, n2) == (64, 4096)
        assert a != bytes(64) and b != bytes(4096) and a != b[:64]
        metrics = worker.metrics()
        assert metrics["entropy_bytes"] == 64 + 4096 and metrics["host_rng_fails"] == 0
        assert worker.alive()  # getrandom passed its seccomp filter


def test_rate_limiter_throttles_then_serves(launcher) -> None:
    limiter = {"bandwidth": {"size": 1024, "refill_time": 100}}
    with EntropyWorkerHarness(launcher.zygote, launcher.run_dir, rate_limiter=limiter) as worker:
        assert worker.setup() & c.STATUS_DRIVER_OK
        results = worker.request(1024, 1024, 1024)
        assert [n for n, _ in results] == [1024, 1024, 1024]
        metrics = worker.metrics()
        assert metrics["entropy_rate_limiter_throttled"] >= 1 and metrics["rate_limiter_event_count"] >= 1
