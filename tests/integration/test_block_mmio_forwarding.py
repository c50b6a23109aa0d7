"""The vCPU side of MMIO forwarding: whole accesses dispatched by window, a synchronous
ZeroMQ round trip to the device worker, and a worker that does not answer."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from shared import protocol as p
from shared.devworker_client import MmioClient, MmioTimeout
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
    """A ROUTER answering MmioRead with offset+size after `delay` seconds."""

    def __init__(self, ctx: zmq.Context, endpoint: str, delay: float = 0.0) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.delay = delay
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(20):
                continue
            identity, payload = self.sock.recv_multipart()
            msg = p.decode(payload)
            time.sleep(self.delay)
            assert isinstance(msg, p.MmioRead | p.MmioWrite)
            self.sock.send_multipart([identity, p.encode(p.MmioDone(msg.seq, msg.offset + msg.size))])

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


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


def test_remote_device_round_trip(ctx: zmq.Context, tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/mmio"
    worker = FakeDeviceWorker(ctx, endpoint)
    remote = RemoteMmioDevice("block_x", endpoint, ctx, lambda text: None, timeout_s=2.0)
    try:
        assert remote.read(0x70, 4) == 0x74
        remote.write(0x50, 4, 0)
    finally:
        remote.close()
        worker.close()


def test_each_vcpu_thread_gets_its_own_socket(ctx: zmq.Context, tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/mmio"
    worker = FakeDeviceWorker(ctx, endpoint)
    remote = RemoteMmioDevice("block_x", endpoint, ctx, lambda text: None, timeout_s=2.0)
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(remote.read(0x10, 4))) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [0x14] * 3 and len(remote._clients) == 3
    finally:
        remote.close()
        worker.close()


def test_silent_worker_reads_all_ones_once_after_the_timeout_then_at_once(ctx: zmq.Context, tmp_path: Path) -> None:
    reports: list[str] = []
    remote = RemoteMmioDevice("block_x", f"ipc://{tmp_path}/nobody", ctx, reports.append, timeout_s=0.5)
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


def test_device_marked_down_answers_at_once_without_trying(ctx: zmq.Context, tmp_path: Path) -> None:
    reports: list[str] = []
    remote = RemoteMmioDevice("block_x", f"ipc://{tmp_path}/nobody", ctx, reports.append, timeout_s=5.0)
    try:
        remote.mark_down()
        start = time.monotonic()

        assert remote.read(0x70, 4) == 0xFFFFFFFF

        assert time.monotonic() - start < 1.0 and (remote.timeouts, remote.skipped, reports) == (0, 1, [])
    finally:
        remote.close()


def test_late_answer_is_not_taken_for_the_next_request(ctx: zmq.Context, tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/mmio"
    worker = FakeDeviceWorker(ctx, endpoint, delay=0.3)
    client = MmioClient(ctx, endpoint, timeout_s=0.1)
    try:
        with pytest.raises(MmioTimeout):
            client.read(0x100, 4)  # answered (0x104) after we gave up
        client.timeout_ms = 2000
        assert client.read(0x200, 8) == 0x208
    finally:
        client.close()
        worker.close()
