"""virtio-rng queue handling over the mock driver: buffers filled, bounded, rate limited."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devices.rng.backend import FakeSource, GetrandomSource
from devices.rng.device import MAX_BYTES_PER_REQUEST, EntropyDevice
from shared.memory import GuestMemory
from shared.ratelimit import BucketConfig, RateLimiter
from shared.virtio.testing import FakeInterrupt, MockDriver, make_guest_memory


class FakeClock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    memory = make_guest_memory()
    yield memory
    memory.close()


def rig(mem: GuestMemory, **kwargs: object) -> tuple[EntropyDevice, MockDriver, FakeInterrupt, FakeSource]:
    source = FakeSource()
    device = EntropyDevice(source, **kwargs)  # type: ignore[arg-type]
    driver = MockDriver(mem, size=64)
    irq = FakeInterrupt()
    device.activate(mem, [driver.queue()], irq, device.avail_features)
    return device, driver, irq, source


def test_buffers_are_filled_and_counted(mem: GuestMemory) -> None:
    device, driver, irq, _ = rig(mem)
    head = driver.add_chain(writable=[16, 48])
    device.process_queue(0)
    assert driver.used() == [(head, 64)]
    assert b"".join(driver.written(head)) == bytes(i % 251 for i in range(64))
    assert device.metrics["entropy_bytes"] == 64 and device.metrics["entropy_event_count"] == 1
    assert irq.used_queue == 1


def test_a_huge_request_is_cut_to_the_bound(mem: GuestMemory) -> None:
    device, driver, _, _ = rig(mem)
    head = driver.add_chain(writable=[MAX_BYTES_PER_REQUEST + 4096])
    device.process_queue(0)
    assert driver.used() == [(head, MAX_BYTES_PER_REQUEST)]


def test_a_request_with_nothing_writable_fails_with_length_0(mem: GuestMemory) -> None:
    device, driver, _, _ = rig(mem)
    head = driver.add_chain([b"readable only"])
    device.process_queue(0)
    assert driver.used() == [(head, 0)] and device.metrics["entropy_event_fails"] == 1


def test_host_failure_completes_empty_and_counts(mem: GuestMemory) -> None:
    device, driver, _, source = rig(mem)
    source.fail = True
    head = driver.add_chain(writable=[32])
    device.process_queue(0)
    assert driver.used() == [(head, 0)] and device.metrics["host_rng_fails"] == 1


def test_rate_limiter_holds_requests_until_refilled(mem: GuestMemory) -> None:
    clock = FakeClock()
    limiter = RateLimiter(BucketConfig(100, 0, 1000), None, clock=clock)
    device, driver, _, _ = rig(mem, rate_limiter=limiter)
    first = driver.add_chain(writable=[64])
    second = driver.add_chain(writable=[64])
    device.process_queue(0)
    assert driver.used() == [(first, 64)]
    assert device.metrics["entropy_rate_limiter_throttled"] == 1 and device.throttle_delay() is not None
    clock.now += 1.0
    device.process_queue(0)
    assert driver.used() == [(second, 64)]


def test_getrandom_source_fills_a_view() -> None:
    buf = bytearray(4096)
    GetrandomSource().fill(memoryview(buf))
    assert buf != bytearray(4096)
