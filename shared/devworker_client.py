"""The caller's side of a device worker's MMIO channel: one synchronous request at a time.

Used by each vCPU thread (one `MmioClient` per thread and device: ZeroMQ sockets are not
thread-safe) and by host-driven tests and benchmarks. Requests carry a sequence number,
so an answer that arrives after its request timed out is recognised and dropped.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import zmq

from shared import protocol as p

# Generous: a dead worker is noticed at once through its pidfd (DeviceDown), so this only
# bounds a live but stalled worker; 1 s was seen to expire on a loaded 2-core host.
DEFAULT_TIMEOUT_S = 5.0


class MmioTimeout(Exception):
    """The device worker did not answer in time (it is dead, stuck or overloaded)."""


class MmioAborted(MmioTimeout):
    """The caller's `abort` said stop waiting (the worker died; a replacement is coming)."""


ABORT_CHECK_MS = 20


class MmioClient:
    """A DEALER socket to one device worker's MMIO endpoint; not thread-safe."""

    def __init__(self, ctx: zmq.Context, endpoint: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.endpoint = endpoint
        self.timeout_ms = int(timeout_s * 1000)
        self._seq = itertools.count(1)
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # No reconnection: a replaced device worker gets a new client (vcpu_worker/virtio.py),
        # so the old socket need never make a new connection (socket(2)) under the filter.
        self._sock.setsockopt(zmq.RECONNECT_IVL, -1)
        self._sock.connect(endpoint)

    def read(self, offset: int, size: int, abort: Callable[[], bool] | None = None) -> int:
        seq = next(self._seq)
        return self._call(seq, p.MmioRead(seq, offset, size), abort)

    def write(self, offset: int, size: int, value: int, abort: Callable[[], bool] | None = None) -> None:
        seq = next(self._seq)
        self._call(seq, p.MmioWrite(seq, offset, size, value), abort)

    def _call(self, seq: int, msg: p.Message, abort: Callable[[], bool] | None = None) -> int:
        try:
            self._sock.send(p.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            raise MmioTimeout(f"device worker at {self.endpoint} is not taking requests") from None
        deadline = time.monotonic() + self.timeout_ms / 1000
        while True:
            left = max(0, int((deadline - time.monotonic()) * 1000))
            if abort is not None and abort():
                raise MmioAborted(f"request to {self.endpoint} abandoned")
            if not self._sock.poll(min(left, ABORT_CHECK_MS) if abort is not None else left, zmq.POLLIN):
                if left == 0:
                    break
                continue
            try:
                answer = p.decode(self._sock.recv())
            except p.ProtocolError:
                continue  # a broken answer is no answer; keep waiting for ours
            if isinstance(answer, p.MmioDone) and answer.seq == seq:
                return answer.value
        raise MmioTimeout(f"device worker at {self.endpoint} did not answer within {self.timeout_ms} ms")

    def close(self) -> None:
        self._sock.close(linger=0)
