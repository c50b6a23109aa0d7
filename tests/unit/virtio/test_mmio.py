"""virtio-mmio v2 transport: registers, feature negotiation, status machine, persistence."""

from __future__ import annotations

import pytest

from shared.memory import GuestMemory
from shared.virtio import constants as c
from shared.virtio.mmio import MmioTransport, TransportError
from shared.virtio.queue import QueueError
from shared.virtio.testing import MockDriver, mmio_setup
from tests.unit.virtio.conftest import RecordingDevice

V1 = c.feature(c.VIRTIO_F_VERSION_1)
EVENT_IDX = c.feature(c.VIRTIO_F_EVENT_IDX)
INIT = c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER | c.STATUS_FEATURES_OK
LIVE = INIT | c.STATUS_DRIVER_OK


class Irq:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def device() -> RecordingDevice:
    return RecordingDevice()


@pytest.fixture
def irq() -> Irq:
    return Irq()


@pytest.fixture
def transport(device: RecordingDevice, mem: GuestMemory, irq: Irq) -> MmioTransport:
    return MmioTransport(device, mem, irq)


@pytest.fixture
def live(transport: MmioTransport, driver: MockDriver) -> MmioTransport:
    assert mmio_setup(transport, [driver], V1) == LIVE
    return transport


def status(transport: MmioTransport) -> int:
    return transport.read(c.MMIO_STATUS, 4)


# --- identification -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "value"),
    [(c.MMIO_MAGIC_VALUE, 0x74726976), (c.MMIO_VERSION, 2), (c.MMIO_DEVICE_ID, 2), (c.MMIO_VENDOR_ID, 0)],
)
def test_identification_registers(transport: MmioTransport, offset: int, value: int) -> None:
    assert transport.read(offset, 4) == value


def test_device_features_high_page_offers_version_1(transport: MmioTransport) -> None:
    transport.write(c.MMIO_DEVICE_FEATURES_SEL, 4, 1)

    assert transport.read(c.MMIO_DEVICE_FEATURES, 4) == 1


def test_device_features_low_page(transport: MmioTransport) -> None:
    assert transport.read(c.MMIO_DEVICE_FEATURES, 4) == EVENT_IDX


def test_device_features_past_page_1_read_zero(transport: MmioTransport) -> None:
    transport.write(c.MMIO_DEVICE_FEATURES_SEL, 4, 2)

    assert transport.read(c.MMIO_DEVICE_FEATURES, 4) == 0


def test_queue_num_max_of_existing_queue(transport: MmioTransport) -> None:
    assert transport.read(c.MMIO_QUEUE_NUM_MAX, 4) == 16


def test_queue_num_max_of_missing_queue_is_zero(transport: MmioTransport) -> None:
    transport.write(c.MMIO_QUEUE_SEL, 4, 5)

    assert transport.read(c.MMIO_QUEUE_NUM_MAX, 4) == 0


def test_shm_len_reads_all_ones(transport: MmioTransport) -> None:
    assert transport.read(c.MMIO_SHM_LEN_LOW, 4) == 0xFFFFFFFF


def test_narrow_register_read_returns_zero(transport: MmioTransport) -> None:
    assert transport.read(c.MMIO_MAGIC_VALUE, 2) == 0


def test_misaligned_register_read_returns_zero(transport: MmioTransport) -> None:
    assert transport.read(c.MMIO_MAGIC_VALUE + 1, 4) == 0


# --- status state machine ---------------------------------------------------------------------


def test_full_init_activates_device(live: MmioTransport, device: RecordingDevice) -> None:
    assert device.activations == [V1]


def test_driver_before_acknowledge_is_ignored(transport: MmioTransport) -> None:
    transport.write(c.MMIO_STATUS, 4, c.STATUS_DRIVER)

    assert status(transport) == 0


def test_driver_clearing_status_bits_is_ignored(transport: MmioTransport) -> None:
    transport.write(c.MMIO_STATUS, 4, c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER)

    transport.write(c.MMIO_STATUS, 4, c.STATUS_DRIVER)

    assert status(transport) == c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER


def test_features_ok_refused_without_version_1(transport: MmioTransport, driver: MockDriver) -> None:
    assert mmio_setup(transport, [driver], EVENT_IDX) == c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER


def test_features_ok_refused_for_unoffered_feature(transport: MmioTransport, driver: MockDriver) -> None:
    unoffered = c.feature(c.VIRTIO_F_INDIRECT_DESC)

    assert mmio_setup(transport, [driver], V1 | unoffered) == c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER


def test_negotiated_event_idx_reaches_queues(transport: MmioTransport, mem: GuestMemory) -> None:
    driver = MockDriver(mem, size=16, event_idx=True)

    mmio_setup(transport, [driver], V1 | EVENT_IDX)

    assert transport.queues[0].event_idx is True


def test_driver_features_after_features_ok_are_ignored(live: MmioTransport) -> None:
    live.write(c.MMIO_DRIVER_FEATURES_SEL, 4, 0)

    live.write(c.MMIO_DRIVER_FEATURES, 4, EVENT_IDX)

    assert live.driver_features == V1


def test_driver_ok_with_unready_queue_needs_reset(transport: MmioTransport, device: RecordingDevice) -> None:
    transport.write(c.MMIO_STATUS, 4, c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER)
    transport.write(c.MMIO_DRIVER_FEATURES_SEL, 4, 1)
    transport.write(c.MMIO_DRIVER_FEATURES, 4, 1)
    transport.write(c.MMIO_STATUS, 4, INIT)

    transport.write(c.MMIO_STATUS, 4, LIVE)

    assert status(transport) == LIVE | c.STATUS_DEVICE_NEEDS_RESET


def test_driver_ok_with_bad_queue_size_needs_reset(mem: GuestMemory, transport: MmioTransport) -> None:
    driver = MockDriver(mem, size=8)
    driver.size = 12

    assert mmio_setup(transport, [driver], V1) & c.STATUS_DEVICE_NEEDS_RESET


def test_activation_failure_needs_reset_and_raises_config_interrupt(
    transport: MmioTransport, device: RecordingDevice, driver: MockDriver
) -> None:
    device.fail_activate = True

    mmio_setup(transport, [driver], V1)

    assert transport.read(c.MMIO_INTERRUPT_STATUS, 4) == c.INTERRUPT_CONFIG_CHANGE


def test_failed_bit_is_kept(transport: MmioTransport) -> None:
    transport.write(c.MMIO_STATUS, 4, c.STATUS_ACKNOWLEDGE | c.STATUS_FAILED)

    assert status(transport) == c.STATUS_ACKNOWLEDGE | c.STATUS_FAILED


def test_reset_resets_device(live: MmioTransport, device: RecordingDevice) -> None:
    live.write(c.MMIO_STATUS, 4, 0)

    assert (device.resets, status(live), live.queues[0].ready) == (1, 0, False)


def test_reset_keeps_config_generation(live: MmioTransport) -> None:
    live.signal_config_change()

    live.write(c.MMIO_STATUS, 4, 0)

    assert live.read(c.MMIO_CONFIG_GENERATION, 4) == 1


def test_device_can_be_reinitialised_after_reset(
    live: MmioTransport, device: RecordingDevice, driver: MockDriver
) -> None:
    assert mmio_setup(live, [driver], V1) == LIVE


# --- queue registers ----------------------------------------------------------------------------


def test_queue_registers_before_features_ok_are_ignored(transport: MmioTransport) -> None:
    transport.write(c.MMIO_QUEUE_DESC_LOW, 4, 0x1000)

    assert transport.queues[0].desc_addr == 0


def test_queue_address_halves_combine(transport: MmioTransport) -> None:
    transport.write(c.MMIO_STATUS, 4, c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER)
    transport.write(c.MMIO_DRIVER_FEATURES_SEL, 4, 1)
    transport.write(c.MMIO_DRIVER_FEATURES, 4, 1)
    transport.write(c.MMIO_STATUS, 4, INIT)

    transport.write(c.MMIO_QUEUE_DEVICE_LOW, 4, 0x2000)
    transport.write(c.MMIO_QUEUE_DEVICE_HIGH, 4, 0x1)

    assert transport.queues[0].used_addr == 0x1_0000_2000


def test_queue_ready_reads_back(live: MmioTransport) -> None:
    assert live.read(c.MMIO_QUEUE_READY, 4) == 1


# --- notifications and interrupts ------------------------------------------------------------------


def test_queue_notify_write_processes_queue(live: MmioTransport, device: RecordingDevice) -> None:
    live.write(c.MMIO_QUEUE_NOTIFY, 4, 0)

    assert device.processed == [0]


def test_notify_before_activation_is_ignored(transport: MmioTransport, device: RecordingDevice) -> None:
    transport.notify_queue(0)

    assert device.processed == []


def test_notify_of_missing_queue_is_ignored(live: MmioTransport, device: RecordingDevice) -> None:
    live.notify_queue(7)

    assert device.processed == []


def test_queue_error_from_device_sets_needs_reset(live: MmioTransport, device: RecordingDevice) -> None:
    device.raise_on_process = QueueError("Guest broke it")

    live.notify_queue(0)

    assert status(live) & c.STATUS_DEVICE_NEEDS_RESET


def test_device_bug_sets_needs_reset_instead_of_crashing(live: MmioTransport, device: RecordingDevice) -> None:
    device.raise_on_process = RuntimeError("oops")

    live.notify_queue(0)

    assert status(live) & c.STATUS_DEVICE_NEEDS_RESET


def test_notify_while_needing_reset_is_ignored(live: MmioTransport, device: RecordingDevice) -> None:
    live.signal_needs_reset("test")

    live.notify_queue(0)

    assert device.processed == []


def test_signal_used_queue_sets_bit_and_triggers(live: MmioTransport, irq: Irq) -> None:
    live.signal_used_queue()

    assert (live.read(c.MMIO_INTERRUPT_STATUS, 4), irq.count) == (c.INTERRUPT_USED_RING, 1)


def test_signal_config_change_bumps_generation(live: MmioTransport) -> None:
    live.signal_config_change()

    assert live.read(c.MMIO_CONFIG_GENERATION, 4) == 1


def test_interrupt_ack_clears_acknowledged_bits(live: MmioTransport) -> None:
    live.signal_used_queue()
    live.signal_config_change()

    live.write(c.MMIO_INTERRUPT_ACK, 4, c.INTERRUPT_USED_RING)

    assert live.read(c.MMIO_INTERRUPT_STATUS, 4) == c.INTERRUPT_CONFIG_CHANGE


# --- config space ------------------------------------------------------------------------------------


def test_config_read_is_little_endian(transport: MmioTransport) -> None:
    assert transport.read(c.MMIO_CONFIG + 1, 2) == 0x0302


def test_config_read_past_end_is_zero_padded(transport: MmioTransport) -> None:
    assert transport.read(c.MMIO_CONFIG + 6, 4) == 0x0807


def test_config_read_with_odd_size_is_zero(transport: MmioTransport) -> None:
    assert transport.read(c.MMIO_CONFIG, 3) == 0


def test_config_write_reaches_device(live: MmioTransport, device: RecordingDevice) -> None:
    live.write(c.MMIO_CONFIG, 1, 0xAA)

    assert device.config[0] == 0xAA


def test_config_write_before_driver_is_ignored(transport: MmioTransport, device: RecordingDevice) -> None:
    transport.write(c.MMIO_CONFIG, 1, 0xAA)

    assert device.config[0] == 1


# --- persistence ---------------------------------------------------------------------------------------


def test_snapshot_restore_reactivates_device(live: MmioTransport, mem: GuestMemory, driver: MockDriver) -> None:
    fresh_device = RecordingDevice()
    fresh = MmioTransport(fresh_device, mem)

    fresh.restore(live.snapshot())

    assert (fresh_device.activations, status(fresh)) == ([V1], LIVE)


def test_snapshot_is_plain_data(live: MmioTransport) -> None:
    import json

    assert json.loads(json.dumps(live.snapshot())) == live.snapshot()


def test_restore_of_other_device_type_is_refused(live: MmioTransport, mem: GuestMemory) -> None:
    state = live.snapshot() | {"device_type": c.VIRTIO_ID_NET}

    with pytest.raises(TransportError):
        MmioTransport(RecordingDevice(), mem).restore(state)


def test_restore_with_resync_reads_used_ring(live: MmioTransport, mem: GuestMemory, driver: MockDriver) -> None:
    state = live.snapshot()
    mem.write_u16(driver.used_addr + 2, 3)
    fresh = MmioTransport(RecordingDevice(), mem)

    fresh.restore(state, resync=True)

    assert fresh.queues[0].next_avail == 3


def test_kick_all_processes_queues_and_interrupts(live: MmioTransport, device: RecordingDevice, irq: Irq) -> None:
    live.kick_all()

    assert (device.processed, irq.count) == ([0], 1)
