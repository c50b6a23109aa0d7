"""The caller's side of a device worker's MMIO channel: one synchronous request at a time.

The channel is one end of a SOCK_SEQPACKET socketpair the supervisor made (the device
worker holds the other end), so the vCPU worker never connects to anything: a replacement
device worker comes with a new pair, whose end reaches the vCPU worker over its fd channel.
Used by the vCPU worker's windows (`vcpu_worker.virtio`, shared by its vCPU threads under a
lock) and by host-driven tests and benchmarks. Requests carry a sequence number, so an
answer that arrives after its request timed out is recognised and dropped. The peer's
death is seen at once: its end closes.
"""

from __future__ import annotations

import itertools
import select
import socket
import time
from collections.abc import Callable

from shared import protocol as p

# Generous: a dead worker is noticed at once (its end of the channel closes), so this only
# bounds a live but stalled worker; 1 s was seen to expire on a loaded 2-core host.
DEFAULT_TIMEOUT_S = 5.0
ABORT_CHECK_S = 0.02
MAX_ANSWER_BYTES = 256


class MmioTimeout(Exception):
    """The device worker did not answer in time (it is dead, stuck or overloaded)."""


class MmioAborted(MmioTimeout):
    """The caller's `abort` said stop waiting (the worker died; a replacement is coming)."""


class MmioClosed(MmioAborted):
    """The device worker's end of the channel is closed: the worker is gone."""


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(caller's end, device worker's end) of a new MMIO channel."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class MmioClient:
    """Register accesses over one MMIO channel; not thread-safe (callers serialise)."""

    def __init__(self, sock: socket.socket, timeout_s: float = DEFAULT_TIMEOUT_S, name: str = "device") -> None:
        self.name = name
        self.timeout_s = timeout_s
        self._seq = itertools.count(1)
        self._sock = sock  # used with MSG_DONTWAIT: setblocking() would be an ioctl (FIONBIO)
        self._poll = select.poll()
        self._poll.register(self._sock, select.POLLIN)

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self, offset: int, size: int, abort: Callable[[], bool] | None = None) -> int:
        seq = next(self._seq)
        return self._call(seq, p.MmioRead(seq, offset, size), abort)

    def write(self, offset: int, size: int, value: int, abort: Callable[[], bool] | None = None) -> None:
        seq = next(self._seq)
        self._call(seq, p.MmioWrite(seq, offset, size, value), abort)

    def _call(self, seq: int, msg: p.Message, abort: Callable[[], bool] | None = None) -> int:
        try:
            self._sock.send(p.encode(msg), socket.MSG_DONTWAIT)
        except BlockingIOError:
            raise MmioTimeout(f"the {self.name} worker is not taking requests") from None
        except OSError:
            raise MmioClosed(f"the {self.name} worker is gone") from None
        deadline = time.monotonic() + self.timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if abort is not None and abort():
                raise MmioAborted(f"request to the {self.name} worker abandoned")
            wait = min(left, ABORT_CHECK_S) if abort is not None else left
            if not self._poll.poll(wait * 1000):
                continue
            try:
                data = self._sock.recv(MAX_ANSWER_BYTES, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                raise MmioClosed(f"the {self.name} worker is gone")
            try:
                answer = p.decode(data)
            except p.ProtocolError:
                continue  # a broken answer is no answer; keep waiting for ours
            if isinstance(answer, p.MmioDone) and answer.seq == seq:
                return answer.value
        raise MmioTimeout(f"the {self.name} worker did not answer within {self.timeout_s * 1000:.0f} ms")

    def close(self) -> None:
        self._sock.close()
