"""The vCPU side of a device worker restart: a window whose worker died waits for the
replacement instead of reading all-ones, and an access the dead worker swallowed is sent
again to the new one (vcpu_worker.virtio.RemoteMmioDevice)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import zmq

from shared import protocol as p
from vcpu_worker.virtio import RemoteMmioDevice


class Worker:
    """A stand-in device worker: answers reads with `value`, or swallows them."""

    def __init__(self, ctx: zmq.Context, endpoint: str, value: int | None) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.value = value
        self.seen: list[p.Message] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(20):
                continue
            identity, payload = self.sock.recv_multipart()
            msg = p.decode(payload)
            self.seen.append(msg)
            if self.value is not None and isinstance(msg, p.MmioRead | p.MmioWrite):
                self.sock.send_multipart([identity, p.encode(p.MmioDone(msg.seq, self.value))])

    def close(self) -> None:
        self._stop.set()
        self.thread.join()
        self.sock.close(linger=0)


def test_an_access_swallowed_by_a_dead_worker_is_answered_by_its_replacement(tmp_path: Path):
    ctx = zmq.Context()
    endpoint = f"ipc://{tmp_path}/dev-mmio"
    device = RemoteMmioDevice("block_x", endpoint, ctx, lambda text: None, timeout_s=30)
    dead = Worker(ctx, endpoint, None)  # takes the read, never answers: it "dies" under it
    result: list[int] = []
    reader = threading.Thread(target=lambda: result.append(device.read(0x70, 4)))
    try:
        reader.start()
        assert _wait(lambda: len(dead.seen) == 1)
        dead.close()
        device.mark_restarting()  # the supervisor saw the death
        time.sleep(0.1)
        assert result == []  # held, not all-ones

        begin = time.monotonic()
        new = Worker(ctx, endpoint, 0x0F)
        device.mark_up()
        reader.join(timeout=5)

        assert result == [0x0F] and time.monotonic() - begin < 2
        assert [type(m) for m in new.seen] == [p.MmioRead]  # sent again, once
        assert device.read(0x70, 4) == 0x0F and device.skipped == 0 and device.timeouts == 0
        new.close()
    finally:
        device.close()
        ctx.term()


def test_a_window_given_up_on_answers_all_ones_at_once(tmp_path: Path):
    ctx = zmq.Context()
    device = RemoteMmioDevice("block_x", f"ipc://{tmp_path}/none", ctx, lambda text: None, timeout_s=30)
    try:
        device.mark_restarting()
        device.mark_down()

        begin = time.monotonic()
        assert device.read(0, 4) == 0xFFFFFFFF
        assert time.monotonic() - begin < 0.5 and device.skipped == 1
    finally:
        device.close()
        ctx.term()


def _wait(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()
