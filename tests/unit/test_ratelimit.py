"""Token-bucket maths with a fake clock (Firecracker's rate limiter semantics)."""

from __future__ import annotations

import pytest

from shared.ratelimit import BucketConfig, RateLimiter, RateLimitError, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def bucket(clock: FakeClock, size: int = 1000, burst: int = 0, refill_ms: int = 1000) -> TokenBucket:
    return TokenBucket(size, burst, refill_ms, clock=clock)


# --- TokenBucket -------------------------------------------------------------------------------


def test_bucket_starts_full(clock: FakeClock) -> None:
    assert bucket(clock).reduce(1000) is True


def test_bucket_refuses_more_than_budget(clock: FakeClock) -> None:
    b = bucket(clock)
    b.reduce(900)

    assert b.reduce(200) is False


def test_refused_reduce_leaves_budget_unchanged(clock: FakeClock) -> None:
    b = bucket(clock)
    b.reduce(900)
    b.reduce(200)

    assert b.reduce(100) is True


def test_bucket_refills_proportionally_to_time(clock: FakeClock) -> None:
    b = bucket(clock)
    b.reduce(1000)

    clock.advance(0.25)

    assert (b.reduce(250), b.reduce(1)) == (True, False)


def test_refill_is_capped_at_size(clock: FakeClock) -> None:
    b = bucket(clock)
    clock.advance(10)

    assert (b.reduce(1000), b.reduce(1)) == (True, False)


def test_size_zero_is_unlimited(clock: FakeClock) -> None:
    assert bucket(clock, size=0).reduce(10**12) is True


def test_refill_time_zero_is_unlimited(clock: FakeClock) -> None:
    assert bucket(clock, refill_ms=0).reduce(10**12) is True


def test_one_time_burst_is_spent_first(clock: FakeClock) -> None:
    b = bucket(clock, burst=500)
    b.reduce(500)

    assert b.reduce(1000) is True


def test_one_time_burst_does_not_refill(clock: FakeClock) -> None:
    b = bucket(clock, burst=500)
    b.reduce(1500)
    clock.advance(10)

    assert b.one_time_burst == 0


def test_request_partly_covered_by_burst_takes_rest_from_budget(clock: FakeClock) -> None:
    b = bucket(clock, burst=300)

    b.reduce(500)

    assert b.budget == 800


def test_oversized_request_is_allowed(clock: FakeClock) -> None:
    assert bucket(clock).reduce(3000) is True


def test_oversized_request_blocks_for_proportional_time(clock: FakeClock) -> None:
    b = bucket(clock)
    b.reduce(3000)  # 2000 tokens of debt beyond the full bucket: 2 s at 1000/s

    assert b.time_until(1) == pytest.approx(2.001)


def test_bucket_in_debt_refuses_small_requests(clock: FakeClock) -> None:
    b = bucket(clock)
    b.reduce(3000)
    clock.advance(1.9)

    assert b.reduce(1) is False


def test_bucket_in_debt_refuses_another_oversized_request(clock: FakeClock) -> None:
    b = bucket(clock)
    b.reduce(3000)

    assert b.reduce(3000) is False


def test_bucket_recovers_after_debt_is_paid(clock: FakeClock) -> None:
    b = bucket(clock)
    b.reduce(3000)
    clock.advance(2.5)

    assert b.reduce(500) is True


def test_time_until_is_zero_when_tokens_are_there(clock: FakeClock) -> None:
    assert bucket(clock).time_until(10) == 0.0


def test_time_until_for_missing_tokens(clock: FakeClock) -> None:
    b = bucket(clock)
    b.reduce(1000)

    assert b.time_until(100) == pytest.approx(0.1)


def test_refund_returns_tokens(clock: FakeClock) -> None:
    b = bucket(clock)
    b.reduce(1000)

    b.refund(400)

    assert b.reduce(400) is True


def test_negative_config_is_refused(clock: FakeClock) -> None:
    with pytest.raises(RateLimitError):
        bucket(clock, size=-1)


# --- RateLimiter --------------------------------------------------------------------------------


def limiter(clock: FakeClock, bw: int | None = 1000, ops: int | None = 10) -> RateLimiter:
    return RateLimiter(
        BucketConfig(bw) if bw is not None else None,
        BucketConfig(ops) if ops is not None else None,
        clock=clock,
    )


def test_limiter_without_buckets_always_allows(clock: FakeClock) -> None:
    assert limiter(clock, None, None).consume(10**9) is True


def test_limiter_refuses_when_bandwidth_runs_out(clock: FakeClock) -> None:
    rl = limiter(clock)
    rl.consume(1000)

    assert rl.consume(1) is False


def test_limiter_refuses_when_ops_run_out(clock: FakeClock) -> None:
    rl = limiter(clock, bw=None, ops=1)
    rl.consume(0)

    assert rl.consume(0) is False


def test_refused_bandwidth_gives_the_op_back(clock: FakeClock) -> None:
    rl = limiter(clock, bw=100, ops=1)
    rl.consume(200)  # oversized: allowed, bandwidth now in debt
    clock.advance(1.0)  # ops refilled; bandwidth still in debt
    rl.consume(50)

    assert rl.ops is not None and rl.ops.budget == 1


def test_limiter_is_blocked_after_refusal(clock: FakeClock) -> None:
    rl = limiter(clock)
    rl.consume(1000)
    rl.consume(1)

    assert rl.is_blocked is True


def test_limiter_unblocks_on_success(clock: FakeClock) -> None:
    rl = limiter(clock)
    rl.consume(1000)
    rl.consume(500)
    clock.advance(0.5)

    rl.consume(500)

    assert rl.is_blocked is False


def test_time_until_ready_is_zero_when_not_blocked(clock: FakeClock) -> None:
    assert limiter(clock).time_until_ready() == 0.0


def test_time_until_ready_for_refused_request(clock: FakeClock) -> None:
    rl = limiter(clock)
    rl.consume(1000)
    rl.consume(250)

    assert rl.time_until_ready() == pytest.approx(0.25)


def test_time_until_ready_takes_the_slower_bucket(clock: FakeClock) -> None:
    rl = limiter(clock, bw=1000, ops=2)
    rl.consume(0)
    rl.consume(0)
    rl.consume(500)  # bandwidth has room; ops need 0.5 s for one more

    assert rl.time_until_ready() == pytest.approx(0.5)


def test_throttled_count_counts_refusals(clock: FakeClock) -> None:
    rl = limiter(clock)
    rl.consume(1000)
    rl.consume(1)
    rl.consume(1)

    assert rl.throttled_count == 2


def test_update_keeps_the_refused_request(clock: FakeClock) -> None:
    rl = limiter(clock, bw=1000, ops=None)
    rl.consume(1000)
    rl.consume(500)

    rl.update(bandwidth=BucketConfig(2000))  # a new bucket starts full

    assert (rl.is_blocked, rl.time_until_ready()) == (True, 0.0)


def test_update_with_none_disables_bucket(clock: FakeClock) -> None:
    rl = limiter(clock)
    rl.consume(1000)

    rl.update(bandwidth=None)

    assert rl.consume(10**9) is True


def test_update_leaves_omitted_bucket_alone(clock: FakeClock) -> None:
    rl = limiter(clock)
    ops = rl.ops

    rl.update(bandwidth=BucketConfig(5))

    assert rl.ops is ops
