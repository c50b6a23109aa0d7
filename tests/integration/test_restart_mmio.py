"""The vCPU side of a device worker restart: a window whose worker died waits for the
replacement instead of reading all-ones, and an access the dead worker swallowed is sent
again to the new one, on the new worker's own MMIO channel (vcpu_worker.virtio.RemoteMmioDevice)."""

from __future__ import annotations

import select
import socket
import threading
import time

from shared import protocol as p
from shared.devworker_client import MmioClient, channel_pair
from vcpu_worker.virtio import RemoteMmioDevice


class Worker:
    """A stand-in device worker on its end of an MMIO channel: answers with `value`, or swallows."""

    def __init__(self, sock: socket.socket, value: int | None) -> None:
        self.sock = sock
        self.value = value
        self.seen: list[p.Message] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not select.select([self.sock], [], [], 0.02)[0]:
                continue
            payload = self.sock.recv(256)
            if not payload:
                return
            msg = p.decode(payload)
            self.seen.append(msg)
            if self.value is not None and isinstance(msg, p.MmioRead | p.MmioWrite):
                self.sock.send(p.encode(p.MmioDone(msg.seq, self.value)))

    def close(self) -> None:
        self._stop.set()
        self.thread.join()
        self.sock.close()


def test_an_access_swallowed_by_a_dead_worker_is_answered_by_its_replacement():
    ours, theirs = channel_pair()
    device = RemoteMmioDevice("block_x", MmioClient(ours, 30, "block_x"), lambda text: None, timeout_s=30)
    dead = Worker(theirs, None)  # takes the read, never answers: it "dies" under it
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
        new_ours, new_theirs = channel_pair()
        new = Worker(new_theirs, 0x0F)
        device.mark_up(MmioClient(new_ours, 30, "block_x"))
        reader.join(timeout=5)

        assert result == [0x0F] and time.monotonic() - begin < 2
        assert [type(m) for m in new.seen] == [p.MmioRead]  # sent again, once
        assert device.read(0x70, 4) == 0x0F and device.skipped == 0 and device.timeouts == 0
        new.close()
    finally:
        device.close()


def test_a_window_given_up_on_answers_all_ones_at_once():
    ours, theirs = channel_pair()
    device = RemoteMmioDevice("block_x", MmioClient(ours, 30, "block_x"), lambda text: None, timeout_s=30)
    try:
        device.mark_restarting()
        device.mark_down()

        begin = time.monotonic()
        assert device.read(0, 4) == 0xFFFFFFFF
        assert time.monotonic() - begin < 0.5 and device.skipped == 1
    finally:
        device.close()
        theirs.close()


def _wait(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()
