"""Fixtures: a fresh guest memory, a mock driver and the device-side queue it feeds."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest

from shared.memory import GuestMemory
from shared.virtio import constants as c
from shared.virtio.device import DeviceError, Interrupt
from shared.virtio.queue import Queue
from shared.virtio.testing import MockDriver, make_guest_memory


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    memory = make_guest_memory()
    yield memory
    memory.close()


@pytest.fixture
def driver(mem: GuestMemory) -> MockDriver:
    return MockDriver(mem, size=16)


@pytest.fixture
def queue(driver: MockDriver) -> Queue:
    return driver.queue()


class RecordingDevice:
    """A VirtioDevice that records what the transport asks of it."""

    device_type = c.VIRTIO_ID_BLOCK
    avail_features = c.feature(c.VIRTIO_F_VERSION_1) | c.feature(c.VIRTIO_F_EVENT_IDX)
    queue_max_sizes: Sequence[int] = (16,)

    def __init__(self) -> None:
        self.config = bytearray(b"\x01\x02\x03\x04\x05\x06\x07\x08")
        self.activations: list[int] = []
        self.processed: list[int] = []
        self.resets = 0
        self.fail_activate = False
        self.raise_on_process: Exception | None = None
        self.interrupt: Interrupt | None = None
        self.queues: Sequence[Queue] = ()

    def read_config(self, offset: int, size: int) -> bytes:
        return bytes(self.config[offset : offset + size])

    def write_config(self, offset: int, data: bytes) -> None:
        self.config[offset : offset + len(data)] = data

    def activate(self, mem: GuestMemory, queues: Sequence[Queue], interrupt: Interrupt, features: int) -> None:
        if self.fail_activate:
            raise DeviceError("backend gone")
        self.activations.append(features)
        self.interrupt = interrupt
        self.queues = queues

    def process_queue(self, index: int) -> None:
        if self.raise_on_process is not None:
            raise self.raise_on_process
        self.processed.append(index)

    def reset(self) -> None:
        self.resets += 1
