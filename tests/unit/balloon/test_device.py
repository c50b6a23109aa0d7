"""virtio-balloon queue handling over the mock driver: inflate, deflate, stats, reporting,
and every hostile input refused and counted."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from devices.balloon.backend import RecordingBackend
from devices.balloon.device import (
    MAX_PFNS_PER_CHAIN,
    RELEASE_PAGES_PER_S,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
    BalloonDevice,
)
from devices.balloon.stats import ENTRY
from shared.layout import MiB
from shared.memory import GuestMemory
from shared.virtio import constants as c
from shared.virtio.testing import FakeInterrupt, MockDriver, make_guest_memory

MEM = 16 * MiB
PAGE = 4096


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pfns(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}I", *values)


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    memory = make_guest_memory(MEM)
    yield memory
    memory.close()


class Rig:
    def __init__(self, mem: GuestMemory, **kwargs: object) -> None:
        self.backend = RecordingBackend()
        self.clock = FakeClock()
        self.changes = 0
        self.device = BalloonDevice(self.backend, MEM, clock=self.clock, on_change=self._changed, **kwargs)  # type: ignore[arg-type]
        n = len(self.device.queue_max_sizes)
        self.drivers = [MockDriver(mem, size=64, base=0x10000 + i * 0x50000, data_size=0x40000) for i in range(n)]
        self.queues = [d.queue() for d in self.drivers]
        self.irq = FakeInterrupt()
        self.device.activate(mem, self.queues, self.irq, self.device.avail_features)

    def _changed(self) -> None:
        self.changes += 1


def test_features_follow_the_configuration(mem: GuestMemory) -> None:
    plain = BalloonDevice(RecordingBackend(), MEM)
    assert plain.avail_features == c.feature(c.VIRTIO_F_VERSION_1)
    assert len(plain.queue_max_sizes) == 2
    full = BalloonDevice(RecordingBackend(), MEM, deflate_on_oom=True, stats_interval_s=1, free_page_reporting=True)
    for bit in (VIRTIO_BALLOON_F_STATS_VQ, VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_REPORTING):
        assert full.avail_features & c.feature(bit)
    assert len(full.queue_max_sizes) == 4


def test_config_space_has_target_and_guest_written_actual(mem: GuestMemory) -> None:
    rig = Rig(mem, target_pages=300)
    assert rig.device.read_config(0, 4) == struct.pack("<I", 300)
    rig.device.write_config(4, struct.pack("<I", 120))
    assert rig.device.actual_pages == 120 and rig.changes == 1
    assert rig.device.read_config(4, 4) == struct.pack("<I", 120)


def test_guest_cannot_write_the_target(mem: GuestMemory) -> None:
    rig = Rig(mem, target_pages=300)
    rig.device.write_config(0, struct.pack("<I", 1))
    rig.device.write_config(4, b"\x01\x00")  # a torn write of actual
    assert rig.device.target_pages == 300 and rig.device.actual_pages == 0


def test_set_target_raises_a_config_change(mem: GuestMemory) -> None:
    rig = Rig(mem)
    rig.device.set_target(512)
    assert rig.irq.config_change == 1 and rig.device.read_config(0, 4) == struct.pack("<I", 512)
    with pytest.raises(ValueError):
        rig.device.set_target(1 << 32)


def test_inflate_releases_merged_runs_and_completes(mem: GuestMemory) -> None:
    rig = Rig(mem)
    head = rig.drivers[0].add_chain([pfns(0x400, 0x401, 0x402, 0x500)])
    rig.device.process_queue(0)
    assert rig.drivers[0].used() == [(head, 0)]
    assert rig.backend.discarded == [(0x400000, 3 * PAGE), (0x500000, PAGE)]
    m = rig.device.metrics
    assert (m["inflate_count"], m["inflated_pages"], m["released_bytes"], m["invalid_pfns"]) == (1, 4, 4 * PAGE, 0)
    assert rig.irq.used_queue == 1


def test_inflate_refuses_hostile_pfns_and_punches_the_rest(mem: GuestMemory) -> None:
    rig = Rig(mem)
    hostile = (MEM >> 12, 0xFFFFFFFF, 0xD0000, 0xA0)  # past RAM, huge, MMIO gap, legacy hole
    rig.drivers[0].add_chain([pfns(*hostile, 0x600)])
    rig.device.process_queue(0)
    assert rig.backend.discarded == [(0x600000, PAGE)]
    assert rig.device.metrics["invalid_pfns"] == 4 and rig.device.metrics["inflated_pages"] == 1


def test_a_torn_pfn_and_pfns_past_the_chain_limit_are_refused(mem: GuestMemory) -> None:
    rig = Rig(mem)
    big = list(range(0x800, 0x800 + MAX_PFNS_PER_CHAIN + 10))
    rig.drivers[0].add_chain([pfns(*big) + b"\x01\x02"])
    rig.device.process_queue(0)
    assert sum(length for _, length in rig.backend.discarded) == MAX_PFNS_PER_CHAIN * PAGE
    assert rig.device.metrics["invalid_pfns"] == 11


def test_inflate_flood_is_throttled_then_resumed(mem: GuestMemory) -> None:
    rig = Rig(mem)
    per_chain = MAX_PFNS_PER_CHAIN
    chains = RELEASE_PAGES_PER_S // per_chain + 2
    sent = 0
    pages = list(range(0x400, 0x400 + per_chain))  # the same pages again and again
    while sent < chains:
        for _ in range(min(32, chains - sent)):
            rig.drivers[0].add_chain([pfns(*pages)])
            sent += 1
        rig.device.process_queue(0)
        rig.drivers[0].used()
    assert rig.device.metrics["release_throttled"] >= 1
    assert rig.device.throttle_delay() is not None
    done = rig.device.metrics["inflate_count"]
    assert done == RELEASE_PAGES_PER_S // per_chain  # exactly one second's budget
    rig.clock.now += 1.0
    rig.device.retry_throttled()
    assert rig.device.metrics["inflate_count"] == chains


def test_deflate_completes_without_releasing(mem: GuestMemory) -> None:
    rig = Rig(mem)
    head = rig.drivers[1].add_chain([pfns(0x400, 0x401, 0xFFFFFFFF)])
    rig.device.process_queue(1)
    assert rig.drivers[1].used() == [(head, 0)]
    assert rig.backend.discarded == []
    m = rig.device.metrics
    assert (m["deflate_count"], m["deflated_pages"], m["invalid_pfns"]) == (1, 2, 1)


def test_release_failure_is_counted_and_the_chain_still_completes(mem: GuestMemory) -> None:
    rig = Rig(mem)
    rig.backend.fail = True
    head = rig.drivers[0].add_chain([pfns(0x400)])
    rig.device.process_queue(0)
    assert rig.drivers[0].used() == [(head, 0)]
    assert rig.device.metrics["release_fails"] == 1 and rig.device.metrics["released_bytes"] == 0


def stats_buffer(**values: int) -> bytes:
    tags = {"swap_in": 0, "free_memory": 4, "total_memory": 5, "available_memory": 6}
    return b"".join(ENTRY.pack(tags[name], value) for name, value in values.items())


def test_stats_buffer_is_held_until_polled_then_given_back(mem: GuestMemory) -> None:
    rig = Rig(mem, stats_interval_s=1)
    stats_q = rig.drivers[2]
    head = stats_q.add_chain([stats_buffer(free_memory=100, total_memory=200)])
    rig.device.process_queue(2)
    assert stats_q.used() == []  # held
    assert rig.device.stats == {"free_memory": 100, "total_memory": 200}
    assert rig.device.metrics["stats_updates_count"] == 1 and rig.changes == 1
    assert rig.device.request_stats()
    assert stats_q.used() == [(head, 0)]
    assert not rig.device.request_stats()  # nothing held any more
    stats_q.add_chain([stats_buffer(free_memory=50)])  # a partial update keeps the rest
    rig.device.process_queue(2)
    assert rig.device.stats == {"free_memory": 50, "total_memory": 200}


def test_malformed_stats_are_counted_and_the_buffer_still_held(mem: GuestMemory) -> None:
    rig = Rig(mem, stats_interval_s=1)
    head = rig.drivers[2].add_chain([b"\x04\x00\x01"])
    rig.device.process_queue(2)
    assert rig.device.metrics["stats_update_fails"] == 1 and rig.device.stats == {}
    assert rig.device.request_stats() and rig.drivers[2].used() == [(head, 0)]


def test_a_second_stats_buffer_returns_the_first(mem: GuestMemory) -> None:
    rig = Rig(mem, stats_interval_s=1)
    first = rig.drivers[2].add_chain([stats_buffer(free_memory=1)])
    rig.drivers[2].add_chain([stats_buffer(free_memory=2)])
    rig.device.process_queue(2)
    assert rig.drivers[2].used() == [(first, 0)]
    assert rig.device.stats["free_memory"] == 2 and rig.device.metrics["stats_update_fails"] == 1


def test_free_page_reporting_releases_reported_ranges(mem: GuestMemory) -> None:
    rig = Rig(mem, free_page_reporting=True)
    reporting = rig.drivers[2]  # no stats queue: reporting takes index 2, as in Linux
    head = reporting.make_chain([b"x"])
    reporting.write_descriptor(head, 0x800000, 2 * MiB, 0)
    reporting.publish(head)
    rig.device.process_queue(2)
    assert reporting.used() == [(head, 0)]
    assert rig.backend.discarded == [(0x800000, 2 * MiB)]
    assert rig.device.metrics["free_page_report_count"] == 1


def test_activation_refuses_a_driver_that_declined_the_stats_queue(mem: GuestMemory) -> None:
    device = BalloonDevice(RecordingBackend(), MEM, stats_interval_s=1)
    queues = [MockDriver(mem, size=8, base=0x10000 + i * 0x20000, data_size=0x10000).queue() for i in range(3)]
    with pytest.raises(Exception, match="declined"):
        device.activate(mem, queues, FakeInterrupt(), c.feature(c.VIRTIO_F_VERSION_1))
    assert device.metrics["activate_fails"] == 1


def test_state_round_trip_keeps_actual_and_stats(mem: GuestMemory) -> None:
    rig = Rig(mem, stats_interval_s=1)
    rig.device.write_config(4, struct.pack("<I", 4096))
    rig.device.stats = {"free_memory": 5}
    fresh = BalloonDevice(RecordingBackend(), MEM, stats_interval_s=1)
    fresh.load_state(rig.device.save_state())
    assert fresh.actual_pages == 4096 and fresh.stats == {"free_memory": 5}
    with pytest.raises(ValueError):
        fresh.load_state({"actual_pages": -1, "stats": {}})


def test_corrupt_ring_asks_for_reset(mem: GuestMemory) -> None:
    rig = Rig(mem)
    rig.drivers[0].set_avail_idx(1000)
    rig.device.process_queue(0)
    assert rig.irq.needs_reset and rig.device.metrics["needs_reset_count"] == 1


def test_a_stats_buffer_queued_before_driver_ok_is_taken_at_activation(mem: GuestMemory) -> None:
    """Linux's init_vqs adds the first stats buffer and kicks before DRIVER_OK."""
    device = BalloonDevice(RecordingBackend(), MEM, stats_interval_s=1)
    drivers = [MockDriver(mem, size=64, base=0x10000 + i * 0x50000, data_size=0x40000) for i in range(3)]
    queues = [d.queue() for d in drivers]
    drivers[2].add_chain([stats_buffer(total_memory=256 << 20)])
    device.activate(mem, queues, FakeInterrupt(), device.avail_features)
    assert device.stats == {"total_memory": 256 << 20}
    assert device.request_stats()  # it is held, and given back at the first poll
