"""A replacement device worker's recovery, in process: the transport comes back from the
state area, the chains the dead worker had popped reach the device's `recover_in_flight`
(completed with an error there), and the rest are served (shared.devworker.DeviceWorker)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

import zmq

from shared import protocol as p
from shared.devstate import StateArea, create_state_memfd
from shared.devworker import Channels, DeviceWorker
from shared.eventloop import EventLoop
from shared.memory import GuestMemory
from shared.virtio import constants as c
from shared.virtio.mmio import MmioTransport
from shared.virtio.queue import Queue
from shared.virtio.testing import MockDriver, make_guest_memory, mmio_setup

FAILED_LEN = 0xEE


class RecordingDevice:
    """One queue; serving a chain completes it with length 1; in-flight ones are failed."""

    device_type = 0x42
    avail_features = c.feature(c.VIRTIO_F_VERSION_1)
    queue_max_sizes: Sequence[int] = (8,)

    def __init__(self) -> None:
        self.queue: Queue | None = None
        self.served: list[int] = []
        self.failed: list[int] = []

    def read_config(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write_config(self, offset: int, data: bytes) -> None:
        pass

    def activate(self, mem: GuestMemory, queues: Sequence[Queue], interrupt: object, features: int) -> None:
        self.queue = queues[0]

    def reset(self) -> None:
        self.queue = None

    def process_queue(self, index: int) -> None:
        assert self.queue is not None
        while (chain := self.queue.pop()) is not None:
            self.served.append(chain.head)
            self.queue.add_used(chain.head, 1)

    def recover_in_flight(self, index: int, count: int) -> None:
        assert self.queue is not None
        for _ in range(count):
            chain = self.queue.pop()
            assert chain is not None
            self.failed.append(chain.head)
            self.queue.add_used(chain.head, FAILED_LEN)


class NoHooks:
    def install(self, loop: EventLoop, send: Callable[[p.Message], None]) -> None:
        pass

    def metrics(self) -> dict[str, dict[str, int]]:
        return {}

    def handle_control(self, msg: object) -> None:
        return None

    def handle_fds(self, msg: object, fds: list[int]) -> None:
        return None


def test_in_flight_chains_are_failed_once_and_the_rest_served(tmp_path: Path):
    mem = make_guest_memory()
    driver = MockDriver(mem, 8)
    state_fd = create_state_memfd("test")
    ctx = zmq.Context()
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    queue_fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        # the first worker: set up by the driver, pops two chains, completes one, dies
        dead = MmioTransport(RecordingDevice(), mem)
        assert mmio_setup(dead, [driver], c.feature(c.VIRTIO_F_VERSION_1)) & c.STATUS_DRIVER_OK
        area = StateArea(state_fd)
        area.write({"transport": dead.snapshot()})
        dead.queues[0].pop_hook = lambda value: area.set_popped(0, value)
        heads = [driver.add_chain(writable=[16]) for _ in range(3)]
        first, second = dead.queues[0].pop(), dead.queues[0].pop()
        assert first is not None and second is not None
        dead.queues[0].add_used(first.head, 1)

        # its replacement
        device = RecordingDevice()
        transport = MmioTransport(device, mem)
        mmio_mine, mmio_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        channels = Channels(
            control_endpoint=f"ipc://{tmp_path}/ctl",
            mmio_fd=mmio_theirs.detach(),
            fd_channel=theirs.detach(),
            queue_fds=[queue_fd],
            irqfd=-1,
            state_fd=state_fd,
            restore=True,
        )
        control = ctx.socket(zmq.DEALER)
        worker = DeviceWorker(transport, NoHooks(), channels, control)
        try:
            worker.recover()
        finally:
            worker.close()
            mmio_mine.close()

        assert transport.serving
        assert device.failed == [heads[1]] and device.served == [heads[2]]
        assert driver.used() == [(heads[0], 1), (heads[1], FAILED_LEN), (heads[2], 1)]
    finally:
        mine.close()
        os.close(queue_fd)
        os.close(state_fd)
        ctx.term()
