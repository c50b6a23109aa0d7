"""NetDevice against a fake TAP: features and offloads, rate limits, waiting frames, MMDS output."""

from __future__ import annotations

import json
import logging
from collections import deque

import pytest

from devices.net import tap
from devices.net.device import (
    MAX_PENDING,
    RX,
    TX,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    NetDevice,
)
from devices.net.mmds import MmdsService
from devices.net.stack import MmdsStack
from devices.net.testing import GuestPeer
from shared import ratelimited_log
from shared.ratelimit import BucketConfig, RateLimiter
from shared.virtio import constants as c
from shared.virtio.testing import FakeInterrupt, MockDriver, make_guest_memory

HDR = bytes(12)


class FakeTap:
    def __init__(self) -> None:
        self.inbound: deque[bytes] = deque()
        self.sent: list[bytes] = []
        self.offload: int | None = None

    def readv(self, buffers: list[memoryview]) -> int:
        if not self.inbound:
            raise BlockingIOError
        frame = memoryview(self.inbound.popleft())
        pos = 0
        for b in buffers:
            take = min(len(b), len(frame) - pos)
            b[:take] = frame[pos : pos + take]
            pos += take
        return len(frame)

    def writev(self, buffers: list[memoryview]) -> int:
        self.sent.append(b"".join(bytes(b) for b in buffers))
        return len(self.sent[-1])

    def set_offload(self, flags: int) -> None:
        self.offload = flags


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


class Rig:
    def __init__(self, features: int = c.feature(c.VIRTIO_F_VERSION_1), **kwargs: object) -> None:
        self.mem = make_guest_memory()
        self.tap = FakeTap()
        self.irq = FakeInterrupt()
        self.device = NetDevice(self.tap, iface_id="eth0", mac=bytes.fromhex("060000000001"), **kwargs)  # type: ignore[arg-type]
        self.rx = MockDriver(self.mem, 64, base=0x10000, data_size=4 << 20)
        self.tx = MockDriver(self.mem, 64, base=0x800000, data_size=4 << 20)
        self.device.activate(self.mem, [self.rx.queue(), self.tx.queue()], self.irq, features)

    def buffers(self, count: int, size: int = 2048) -> None:
        for _ in range(count):
            self.rx.add_chain([], [size])
        self.device.process_queue(RX)

    def received(self) -> list[bytes]:
        return [b"".join(self.rx.written(head))[12:n] for head, n in self.rx.used()]

    def send(self, *frames: bytes) -> list[tuple[int, int]]:
        for f in frames:
            self.tx.add_chain([HDR + f])
        self.device.process_queue(TX)
        return self.tx.used()


def test_guest_offloads_become_tap_offload_flags_and_mac_is_in_config() -> None:
    features = sum(
        c.feature(b)
        for b in (c.VIRTIO_F_VERSION_1, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_UFO)
    )
    rig = Rig(features)
    assert rig.tap.offload == tap.TUN_F_CSUM | tap.TUN_F_TSO4 | tap.TUN_F_UFO
    assert rig.device.read_config(0, 6) == bytes.fromhex("060000000001")
    assert rig.device.avail_features & c.feature(VIRTIO_NET_F_MAC)
    no_mac = NetDevice(FakeTap(), iface_id="x")
    assert not no_mac.avail_features & c.feature(VIRTIO_NET_F_MAC) and no_mac.read_config(0, 6) == bytes(6)


def test_frames_stay_in_the_tap_until_the_guest_posts_buffers() -> None:
    rig = Rig()
    rig.tap.inbound.extend([HDR + b"a" * 60, HDR + b"b" * 60])
    rig.device.process_tap()
    assert len(rig.tap.inbound) == 2 and not rig.device.wants_tap_input()  # nothing read, TAP unwatched
    rig.buffers(4)
    assert rig.received() == [b"a" * 60, b"b" * 60] and rig.device.wants_tap_input()


def test_rx_rate_limiter_holds_a_frame_then_delivers_it() -> None:
    clock = Clock()
    limiter = RateLimiter(BucketConfig(1000, 0, 100), clock=clock)
    rig = Rig(rx_rate_limiter=limiter)
    rig.buffers(4)
    rig.tap.inbound.extend([HDR + b"1" * 600, HDR + b"2" * 600])
    rig.device.process_tap()
    assert rig.received() == [b"1" * 600]
    m = rig.device.metrics
    assert (m["rx_rate_limiter_throttled"], m["rx_deferred_frames"]) == (1, 1)
    assert not rig.device.wants_tap_input() and (rig.device.throttle_delay() or 0) > 0
    clock.now += 1.0
    rig.device.on_throttle_timer()
    assert rig.received() == [b"2" * 600] and m["rx_event_rate_limiter_count"] == 1


def test_tx_rate_limiter_gives_the_chain_back_until_tokens_come() -> None:
    clock = Clock()
    rig = Rig(tx_rate_limiter=RateLimiter(BucketConfig(1000, 0, 100), clock=clock))
    assert len(rig.send(b"x" * 600, b"y" * 600)) == 1
    assert [f[12:13] for f in rig.tap.sent] == [b"x"]
    clock.now += 1.0
    rig.device.on_throttle_timer()
    assert len(rig.tx.used()) == 1 and [f[12:13] for f in rig.tap.sent] == [b"x", b"y"]


def mmds_rig() -> Rig:
    service = MmdsService("V1")
    service.set_data(json.dumps({"a": "b"}).encode())
    return Rig(mmds=MmdsStack(service))


def test_mmds_answers_wait_for_rx_buffers_bounded_and_never_reach_the_tap() -> None:
    rig = mmds_rig()
    peer = GuestPeer(lambda frame: (rig.send(frame), [])[1])
    for _ in range(MAX_PENDING + 10):
        peer.arp()
    assert not rig.tap.sent
    assert len(rig.device.pending) == MAX_PENDING and rig.device.metrics["rx_dropped_frames"] == 10
    rig.buffers(MAX_PENDING)
    assert len(rig.received()) == MAX_PENDING and not rig.device.pending


def test_other_frames_go_to_the_tap_even_with_mmds() -> None:
    rig = mmds_rig()
    frame = bytes(12) + b"\x08\x00" + bytes(50)  # IPv4 to 0.0.0.0
    rig.send(frame)
    assert rig.tap.sent == [HDR + frame] and rig.device.metrics["mmds_frames"] == 0


def test_reset_forgets_waiting_frames_and_connections() -> None:
    rig = mmds_rig()
    GuestPeer(lambda frame: (rig.send(frame), [])[1]).send(0x02)  # a SYN, answered into `pending`
    assert rig.device.pending and rig.device.mmds is not None and rig.device.mmds.conns
    rig.device.reset()
    assert not rig.device.pending and not rig.device.mmds.conns and not rig.device.active


@pytest.mark.parametrize("size", [0, 5, 11])
def test_rx_buffers_too_small_for_the_header_are_returned_empty(size: int) -> None:
    rig = Rig()
    rig.rx.add_chain([], [size]) if size else rig.rx.add_chain([b"r"])
    rig.tap.inbound.append(HDR + b"z" * 20)
    rig.device.process_queue(RX)
    assert rig.rx.used()[0][1] == 0 and rig.device.metrics["rx_fails"] == 1


MERGEABLE = c.feature(c.VIRTIO_F_VERSION_1) | c.feature(VIRTIO_NET_F_MRG_RXBUF)


@pytest.mark.parametrize("bad", ["readable_only", "out_of_memory"])
def test_a_malformed_rx_chain_between_held_buffers_is_completed_once_in_order(bad: str) -> None:
    """Net rx used to give back held chains with undo_pop across a malformed chain it had
    already completed: that chain was then completed twice, and a held one never."""
    rig = Rig(MERGEABLE)
    a = rig.rx.add_chain([], [100])
    if bad == "readable_only":
        b = rig.rx.add_chain([b"r"])
    else:
        b = rig.rx.make_chain([], [16])
        rig.rx.write_descriptor(b, 1 << 40, 16, c.VIRTQ_DESC_F_WRITE)
        rig.rx.publish(b)
    cc = rig.rx.add_chain([], [100])
    frame = bytes(range(256)) + b"x" * 44  # 300 bytes: more than a + c hold
    rig.tap.inbound.append(HDR + frame)
    rig.device.process_queue(RX)
    first = rig.rx.used()
    heads = [h for h, _ in first]
    assert sorted(heads) == sorted(set(heads)), f"a chain was completed twice: {first}"
    assert a in heads and b in heads
    assert heads.index(a) < heads.index(b)  # completed in the order they were popped
    d = rig.rx.add_chain([], [1000])
    rig.device.process_queue(RX)
    later = rig.rx.used()
    done = heads + [h for h, _ in later]
    assert sorted(done) == sorted({a, b, cc, d}), f"each chain exactly once: {first} then {later}"
    delivered = b"".join(b"".join(rig.rx.written(h))[:n] for h, n in later)
    assert delivered[12:] == frame and not rig.device.pending


def test_held_rx_chains_given_back_are_popped_again_not_lost() -> None:
    """A frame too big for the buffers on hand waits; the chains it held come back in order."""
    rig = Rig(MERGEABLE)
    first = [rig.rx.add_chain([], [100]) for _ in range(2)]
    frame = b"y" * 500
    rig.tap.inbound.append(HDR + frame)
    rig.device.process_queue(RX)
    assert rig.rx.used() == [] and rig.device.pending  # nothing completed, the frame waits
    more = [rig.rx.add_chain([], [200]) for _ in range(2)]
    rig.device.process_queue(RX)
    used = rig.rx.used()
    assert [h for h, _ in used] == first + more
    assert b"".join(b"".join(rig.rx.written(h))[:n] for h, n in used)[12:] == frame


def test_a_flood_of_malformed_frames_logs_a_bounded_number_of_lines(caplog: pytest.LogCaptureFixture) -> None:
    """Guest-triggered warnings go through the per-call-site rate limit (shared.ratelimited_log)."""
    rig = Rig()
    before = ratelimited_log.suppressed_total()
    caplog.set_level(logging.WARNING, logger="devices.net.device")
    for _ in range(4):
        for _ in range(50):
            rig.tx.add_chain([b"short"])  # shorter than the virtio-net header
        rig.device.process_queue(TX)
        rig.tx.used()
    lines = [r for r in caplog.records if r.name == "devices.net.device"]
    assert rig.device.metrics["tx_malformed_frames"] == 200
    assert len(lines) <= 65  # a burst of 50 + a bucket of 10 (and what refills meanwhile), not 200
    assert ratelimited_log.suppressed_total() - before >= 135


class AnsweringTap(FakeTap):
    """A TAP whose peer answers each frame inside the writev, as the kernel's tun does."""

    def writev(self, buffers: list[memoryview]) -> int:
        n = super().writev(buffers)
        self.inbound.append(HDR + b"ack:" + self.sent[-1][len(HDR) :])
        return n


def test_the_peers_answer_to_a_sent_frame_shares_the_tx_completion_interrupt() -> None:
    rig = Rig()
    rig.tap = rig.device.backend = AnsweringTap()  # type: ignore[assignment]
    rig.buffers(4)
    before = rig.irq.used_queue

    assert rig.send(b"data0001", b"data0002") == [(0, 0), (1, 0)]
    assert rig.received() == [b"ack:data0001", b"ack:data0002"]
    assert not rig.tap.inbound  # read in the same pass, before the interrupt
    assert rig.irq.used_queue == before + 1  # one interrupt for the completions and the answers


def test_no_answer_waiting_costs_no_rx_buffer_and_sends_one_interrupt() -> None:
    rig = Rig()
    rig.buffers(2)
    before = rig.irq.used_queue

    assert rig.send(b"x" * 60) == [(0, 0)]
    assert rig.rx.used() == []  # the rx buffers it looked at went back untouched
    assert rig.irq.used_queue == before + 1
