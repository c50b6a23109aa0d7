"""The register page: InterruptStatus raised by the device and ACKed by the vCPU side
without a round trip, the config copy's seqlock, a replacement worker finding the page as
it was, and a vCPU side that survives whatever a hostile worker writes into the page."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest

from shared.memory import GuestMemory
from shared.virtio import constants as c
from shared.virtio import regpage as rp
from shared.virtio.mmio import MmioTransport
from shared.virtio.testing import MockDriver, mmio_setup

from .conftest import RecordingDevice

USED, CONFIG = c.INTERRUPT_USED_RING, c.INTERRUPT_CONFIG_CHANGE
V1 = c.feature(c.VIRTIO_F_VERSION_1)


@pytest.fixture
def page_fd() -> Iterator[int]:
    fd = rp.create_regpage_memfd("test")
    yield fd
    os.close(fd)


@pytest.fixture
def sides(page_fd: int) -> Iterator[tuple[rp.DeviceRegisters, rp.VcpuRegisters]]:
    device, vcpu = rp.DeviceRegisters(page_fd), rp.VcpuRegisters(page_fd)
    yield device, vcpu
    device.close()
    vcpu.close()


def test_fresh_page_reads_no_interrupt(sides: tuple[rp.DeviceRegisters, rp.VcpuRegisters]) -> None:
    _, vcpu = sides
    assert vcpu.read(c.MMIO_INTERRUPT_STATUS, 4) == 0


def test_raise_is_seen_and_ack_clears_only_its_bit(sides: tuple[rp.DeviceRegisters, rp.VcpuRegisters]) -> None:
    device, vcpu = sides
    device.raise_bits(USED)
    device.raise_bits(CONFIG)
    assert vcpu.read(c.MMIO_INTERRUPT_STATUS, 4) == USED | CONFIG
    assert vcpu.write(c.MMIO_INTERRUPT_ACK, 4, USED) is True
    assert vcpu.read(c.MMIO_INTERRUPT_STATUS, 4) == CONFIG
    assert device.status() == CONFIG  # both sides see the same register
    vcpu.write(c.MMIO_INTERRUPT_ACK, 4, CONFIG | 0xFFFF0000)  # unknown bits are ignored
    assert vcpu.read(c.MMIO_INTERRUPT_STATUS, 4) == 0


def test_raise_after_the_ack_sets_the_bit_again(sides: tuple[rp.DeviceRegisters, rp.VcpuRegisters]) -> None:
    device, vcpu = sides
    device.raise_bits(USED)
    vcpu.write(c.MMIO_INTERRUPT_ACK, 4, USED)
    device.raise_bits(USED)
    assert vcpu.read(c.MMIO_INTERRUPT_STATUS, 4) == USED


def test_counter_wraps_at_2_pow_32(sides: tuple[rp.DeviceRegisters, rp.VcpuRegisters]) -> None:
    device, vcpu = sides
    device.words[2] = device.words[4] = 0xFFFFFFFF  # raised[USED] == acked[USED]: clear
    assert vcpu.read(c.MMIO_INTERRUPT_STATUS, 4) == 0
    device.raise_bits(USED)
    assert device.words[2] == 0
    assert vcpu.read(c.MMIO_INTERRUPT_STATUS, 4) == USED
    vcpu.write(c.MMIO_INTERRUPT_ACK, 4, USED)
    assert vcpu.read(c.MMIO_INTERRUPT_STATUS, 4) == 0


def test_other_registers_are_not_answered_locally(sides: tuple[rp.DeviceRegisters, rp.VcpuRegisters]) -> None:
    _, vcpu = sides
    assert vcpu.read(c.MMIO_STATUS, 4) is None
    assert vcpu.read(c.MMIO_INTERRUPT_STATUS, 2) is None  # odd sizes go to the device, which logs them
    assert vcpu.write(c.MMIO_STATUS, 4, 0) is False
    assert vcpu.write(c.MMIO_QUEUE_NOTIFY, 4, 0) is False


def test_config_reads_come_from_the_published_copy(sides: tuple[rp.DeviceRegisters, rp.VcpuRegisters]) -> None:
    device, vcpu = sides
    assert vcpu.read(c.MMIO_CONFIG, 4) is None  # nothing published yet: forward
    assert vcpu.read(c.MMIO_CONFIG_GENERATION, 4) is None
    device.publish_config(7, bytes(range(1, 13)))
    assert vcpu.read(c.MMIO_CONFIG_GENERATION, 4) == 7
    assert vcpu.read(c.MMIO_CONFIG, 4) == 0x04030201
    assert vcpu.read(c.MMIO_CONFIG + 8, 8) == 0x0C0B0A09  # zero past the end, as the device pads
    assert vcpu.read(c.MMIO_CONFIG + 1, 1) == 2
    assert vcpu.read(c.MMIO_WINDOW_SIZE - 4, 8) is None  # runs past the window: the device refuses it


def test_a_torn_copy_is_never_answered(sides: tuple[rp.DeviceRegisters, rp.VcpuRegisters]) -> None:
    device, vcpu = sides
    device.publish_config(1, b"abcd")
    device.words[6] += 1  # the writer is half-way through: seq is odd
    assert vcpu.read(c.MMIO_CONFIG, 4) is None


def test_republishing_the_same_copy_does_not_move_the_seqlock(
    sides: tuple[rp.DeviceRegisters, rp.VcpuRegisters],
) -> None:
    device, _ = sides
    device.publish_config(1, b"abcd")
    seq = device.words[6]
    device.publish_config(1, b"abcd")
    assert device.words[6] == seq
    device.publish_config(2, b"abcd")
    assert device.words[6] == seq + 2


def test_a_replacement_worker_finds_the_page_as_it_was(page_fd: int) -> None:
    first = rp.DeviceRegisters(page_fd)
    first.raise_bits(USED | CONFIG)
    first.publish_config(3, b"\x01\x02")
    first.words[6] += 1  # ... and it died in the middle of the next publish
    first.close()
    second = rp.DeviceRegisters(page_fd)
    vcpu = rp.VcpuRegisters(page_fd)
    try:
        assert vcpu.read(c.MMIO_INTERRUPT_STATUS, 4) == USED | CONFIG  # nothing pending was lost
        assert vcpu.read(c.MMIO_CONFIG, 1) is None  # the torn copy was dropped, not served
        second.publish_config(3, b"\x01\x02")
        assert vcpu.read(c.MMIO_CONFIG, 2) == 0x0201
    finally:
        second.close()
        vcpu.close()


def test_hostile_page_contents_are_bounded(sides: tuple[rp.DeviceRegisters, rp.VcpuRegisters]) -> None:
    device, vcpu = sides
    rng = random.Random(19)
    for _ in range(300):
        for index in range(16):
            device.words[index] = rng.getrandbits(32)
        status = vcpu.read(c.MMIO_INTERRUPT_STATUS, 4)
        assert status is not None and status & ~rp.ALL_BITS == 0
        for offset, size in ((c.MMIO_CONFIG, 4), (c.MMIO_CONFIG + 3000, 8), (c.MMIO_CONFIG_GENERATION, 4)):
            value = vcpu.read(offset, size)
            assert value is None or 0 <= value < 1 << (8 * size)
        vcpu.write(c.MMIO_INTERRUPT_ACK, 4, rng.getrandbits(32))


# --- the transport on a page -------------------------------------------------------------


@pytest.fixture
def paged(mem: GuestMemory, page_fd: int) -> Iterator[tuple[MmioTransport, rp.VcpuRegisters, list[int]]]:
    fired: list[int] = []
    transport = MmioTransport(RecordingDevice(), mem, lambda: fired.append(1), rp.DeviceRegisters(page_fd))
    vcpu = rp.VcpuRegisters(page_fd)
    yield transport, vcpu, fired
    assert transport.registers is not None
    transport.registers.close()
    vcpu.close()


def test_transport_raises_into_the_page_before_the_irqfd(
    paged: tuple[MmioTransport, rp.VcpuRegisters, list[int]],
) -> None:
    transport, vcpu, _ = paged
    seen: list[int | None] = []
    transport._trigger = lambda: seen.append(vcpu.read(c.MMIO_INTERRUPT_STATUS, 4))
    transport.signal_used_queue()
    assert seen == [USED]  # the bit was set when the irqfd was written
    assert transport.read(c.MMIO_INTERRUPT_STATUS, 4) == USED
    vcpu.write(c.MMIO_INTERRUPT_ACK, 4, USED)
    assert transport.read(c.MMIO_INTERRUPT_STATUS, 4) == 0  # the ACK was applied in the vCPU side only


def test_config_change_publishes_the_new_generation_first(
    paged: tuple[MmioTransport, rp.VcpuRegisters, list[int]],
) -> None:
    transport, vcpu, _ = paged
    transport.publish_registers()
    seen: list[int | None] = []
    transport._trigger = lambda: seen.append(vcpu.read(c.MMIO_CONFIG_GENERATION, 4))
    transport.signal_config_change()
    assert seen == [1]
    assert vcpu.read(c.MMIO_CONFIG, 4) == int.from_bytes(transport.device.read_config(0, 4), "little")


def test_reset_clears_the_page_and_restore_keeps_it(
    paged: tuple[MmioTransport, rp.VcpuRegisters, list[int]], mem: GuestMemory, page_fd: int
) -> None:
    transport, vcpu, _ = paged
    assert mmio_setup(transport, [MockDriver(mem, size=16)], V1) & c.STATUS_DRIVER_OK
    transport.signal_used_queue()
    snapshot = transport.snapshot()
    replacement = MmioTransport(RecordingDevice(), mem, registers=rp.DeviceRegisters(page_fd))
    replacement.restore(snapshot)
    assert vcpu.read(c.MMIO_INTERRUPT_STATUS, 4) == USED  # the pending interrupt survived the restart
    replacement.write(c.MMIO_STATUS, 4, 0)
    assert vcpu.read(c.MMIO_INTERRUPT_STATUS, 4) == 0
    assert replacement.registers is not None
    replacement.registers.close()
