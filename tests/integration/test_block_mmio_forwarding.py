"""The vCPU side of MMIO forwarding: whole accesses dispatched by window, a synchronous
round trip over the device's MMIO channel (a socketpair), a worker that does not answer,
and one that dies and is replaced."""

from __future__ import annotations

import os
import select
import socket
import threading
import time

import pytest

from shared import protocol as p
from shared.devworker_client import MmioClient, MmioTimeout, channel_pair
from shared.virtio import constants as c
from shared.virtio.regpage import DeviceRegisters, VcpuRegisters, create_regpage_memfd
from vcpu_worker.mmio_bus import MmioBus
from vcpu_worker.virtio import RemoteMmioDevice


class Recorder:
    def __init__(self) -> None:
        self.accesses: list[tuple[str, int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.accesses.append(("r", offset, size, 0))
        return 0x1122334455667788

    def write(self, offset: int, size: int, value: int) -> None:
        self.accesses.append(("w", offset, size, value))


class FakeDeviceWorker:
    """The device worker's end of an MMIO channel, answering MmioRead with offset+size
    after `delay` seconds."""

    def __init__(self, sock: socket.socket, delay: float = 0.0) -> None:
        self.sock = sock
        self.delay = delay
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            if not select.select([self.sock], [], [], 0.02)[0]:
                continue
            payload = self.sock.recv(256)
            if not payload:
                return
            msg = p.decode(payload)
            time.sleep(self.delay)
            assert isinstance(msg, p.MmioRead | p.MmioWrite)
            self.sock.send(p.encode(p.MmioDone(msg.seq, msg.offset + msg.size)))

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


def served(delay: float = 0.0, timeout_s: float = 2.0) -> tuple[MmioClient, FakeDeviceWorker]:
    ours, theirs = channel_pair()
    return MmioClient(ours, timeout_s, "block_x"), FakeDeviceWorker(theirs, delay)


def test_bus_hands_a_device_one_whole_access() -> None:
    bus, dev = MmioBus(), Recorder()
    bus.add(0xD0000000, 0x1000, dev)

    bus.write(0xD0000070, (0x0F).to_bytes(4, "little"))
    data = bus.read(0xD0000100, 2)

    assert dev.accesses == [("w", 0x70, 4, 0x0F), ("r", 0x100, 2, 0)]
    assert data == (0x7788).to_bytes(2, "little")


def test_bus_access_outside_every_window_reads_all_ones_and_is_counted() -> None:
    reports: list[str] = []
    bus = MmioBus(reports.append)
    bus.add(0xD0000000, 0x1000, Recorder())

    assert bus.read(0xD0001000, 4) == b"\xff" * 4
    assert bus.read(0xD0000FFE, 4) == b"\xff" * 4  # straddles the window's end
    assert bus.unhandled.reads == 2 and len(reports) == 1


def test_overlapping_windows_are_refused() -> None:
    bus = MmioBus()
    bus.add(0xD0000000, 0x1000, Recorder())

    with pytest.raises(ValueError, match="overlaps"):
        bus.add(0xD0000800, 0x1000, Recorder())


def test_remote_device_round_trip() -> None:
    client, worker = served()
    remote = RemoteMmioDevice("block_x", client, lambda text: None, timeout_s=2.0)
    try:
        assert remote.read(0x70, 4) == 0x74
        remote.write(0x50, 4, 0)
    finally:
        remote.close()
        worker.close()


def test_interrupt_registers_are_answered_from_the_register_page_without_the_worker() -> None:
    ours, silent = channel_pair()  # nobody answers: a forwarded access would time out
    fd = create_regpage_memfd("block_x")
    device_side = DeviceRegisters(fd)
    remote = RemoteMmioDevice(
        "block_x", MmioClient(ours, 0.5, "block_x"), lambda text: None, timeout_s=0.5, registers=VcpuRegisters(fd)
    )
    try:
        device_side.raise_bits(c.INTERRUPT_USED_RING)
        device_side.publish_config(3, b"\x10\x20")
        start = time.monotonic()
        assert remote.read(c.MMIO_INTERRUPT_STATUS, 4) == c.INTERRUPT_USED_RING
        remote.write(c.MMIO_INTERRUPT_ACK, 4, c.INTERRUPT_USED_RING)
        assert remote.read(c.MMIO_INTERRUPT_STATUS, 4) == 0
        assert remote.read(c.MMIO_CONFIG_GENERATION, 4) == 3
        assert remote.read(c.MMIO_CONFIG, 2) == 0x2010
        assert time.monotonic() - start < 0.4  # none of them waited for the silent worker
        assert remote.timeouts == 0
        with pytest.raises(BlockingIOError):
            silent.recv(256, socket.MSG_DONTWAIT)  # nothing was sent over the channel
    finally:
        remote.close()
        device_side.close()
        silent.close()
        os.close(fd)


def test_a_forwarded_reset_clears_interrupt_status_in_the_page() -> None:
    client, worker = served()
    fd = create_regpage_memfd("block_x")
    device_side = DeviceRegisters(fd)
    remote = RemoteMmioDevice("block_x", client, lambda text: None, timeout_s=2.0, registers=VcpuRegisters(fd))
    try:
        device_side.raise_bits(c.INTERRUPT_USED_RING | c.INTERRUPT_CONFIG_CHANGE)
        remote.write(c.MMIO_STATUS, 4, 1)  # not a reset: forwarded, the bits stay
        assert remote.read(c.MMIO_INTERRUPT_STATUS, 4) == 3
        remote.write(c.MMIO_STATUS, 4, 0)
        assert remote.read(c.MMIO_INTERRUPT_STATUS, 4) == 0
        assert remote.read(c.MMIO_STATUS, 4) == 0x74  # other registers still go to the worker
    finally:
        remote.close()
        device_side.close()
        worker.close()
        os.close(fd)


def test_vcpu_threads_take_turns_on_the_channel() -> None:
    client, worker = served(delay=0.01)
    remote = RemoteMmioDevice("block_x", client, lambda text: None, timeout_s=2.0)
    results: list[int] = []
    threads = [threading.Thread(target=lambda i=i: results.append(remote.read(0x10 * i, 4))) for i in range(1, 4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [0x14, 0x24, 0x34]  # each thread got its own answer
    finally:
        remote.close()
        worker.close()


def test_silent_worker_reads_all_ones_once_after_the_timeout_then_at_once() -> None:
    reports: list[str] = []
    ours, silent = channel_pair()  # nobody reads `silent`
    remote = RemoteMmioDevice("block_x", MmioClient(ours, 0.5, "block_x"), reports.append, timeout_s=0.5)
    try:
        first = time.monotonic()
        assert remote.read(0x70, 4) == 0xFFFFFFFF
        waited = time.monotonic() - first
        second = time.monotonic()
        assert remote.read(0x70, 4) == 0xFFFFFFFF
        remote.write(0x70, 4, 1)

        assert waited >= 0.45 and time.monotonic() - second < 0.25
        assert (remote.timeouts, remote.skipped, len(reports)) == (1, 2, 1)
        assert "block_x" in reports[0]
    finally:
        remote.close()
        silent.close()


def test_device_marked_down_answers_at_once_without_trying() -> None:
    reports: list[str] = []
    ours, silent = channel_pair()
    remote = RemoteMmioDevice("block_x", MmioClient(ours, 5.0, "block_x"), reports.append, timeout_s=5.0)
    try:
        remote.mark_down()
        start = time.monotonic()

        assert remote.read(0x70, 4) == 0xFFFFFFFF

        assert time.monotonic() - start < 1.0 and (remote.timeouts, remote.skipped, reports) == (0, 1, [])
    finally:
        remote.close()
        silent.close()


def test_a_dead_worker_holds_the_access_until_its_replacement_answers_on_a_new_channel() -> None:
    ours, dead = channel_pair()
    remote = RemoteMmioDevice("block_x", MmioClient(ours, 5.0, "block_x"), lambda text: None, timeout_s=5.0)
    results: list[int] = []
    access = threading.Thread(target=lambda: results.append(remote.read(0x70, 4)))
    client, worker = served()
    try:
        dead.close()  # the worker died: its end of the channel closed
        access.start()
        time.sleep(0.1)
        assert access.is_alive() and not results  # waiting for the supervisor's word, not all-ones

        remote.mark_up(client)
        access.join(5.0)

        assert results == [0x74] and remote.timeouts == 0
    finally:
        remote.close()
        worker.close()


def test_a_dead_worker_that_is_not_replaced_reads_all_ones_once_marked_down() -> None:
    ours, dead = channel_pair()
    remote = RemoteMmioDevice("block_x", MmioClient(ours, 5.0, "block_x"), lambda text: None, timeout_s=5.0)
    results: list[int] = []
    access = threading.Thread(target=lambda: results.append(remote.read(0x70, 4)))
    try:
        dead.close()
        access.start()
        time.sleep(0.1)
        remote.mark_down()
        access.join(5.0)

        assert results == [0xFFFFFFFF]
    finally:
        remote.close()


def test_late_answer_is_not_taken_for_the_next_request() -> None:
    client, worker = served(delay=0.3, timeout_s=0.1)
    try:
        with pytest.raises(MmioTimeout):
            client.read(0x100, 4)  # answered (0x104) after we gave up
        client.timeout_s = 2.0
        assert client.read(0x200, 8) == 0x208
    finally:
        client.close()
        worker.close()
