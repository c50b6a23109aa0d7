"""Playing the guest of a vsock device, in-process or against a real worker: tests, benchmarks.

`GuestVsock` is a guest driver over three `MockDriver` queues (rx, tx, event) in one guest
memory: it sends packets on tx, keeps rx buffers posted and parses what the device put in
them. How it kicks the device and waits for it is given from outside:

* `VsockRig`: the device and a `UnixMuxer` in this process (`kick` calls `process_queue`,
  `pump` runs the muxer when its fd is readable). Unit tests, with real AF_UNIX sockets.
* `VsockWorkerHarness`: a real vsock worker process spawned through the zygote, driven
  as a vCPU and the supervisor would (MMIO channel, ioeventfds, irqfd). Integration tests
  and `bench/vsock.py`.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from devices.vsock.backend import UnixMuxer, listening_socket
from devices.vsock.device import EVQ, RX, TX, VsockDevice
from devices.vsock.messages import VsockConnect, VsockConnected
from devices.vsock.packet import HEADER_SIZE, HOST_CID, Header, Op, header_bytes
from shared import fdpass
from shared import protocol as p
from shared.devworker_harness import Spawner, WorkerHarness
from shared.layout import MiB
from shared.memory import GuestMemory
from shared.virtio import constants as c
from shared.virtio.testing import FakeInterrupt, MockDriver, make_guest_memory, mmio_setup

FEATURES = c.feature(c.VIRTIO_F_VERSION_1)
MEM_SIZE = 64 * MiB
RX_BUF = 4096 + HEADER_SIZE


@dataclass(frozen=True)
class RxPacket:
    header: Header
    payload: bytes

    @property
    def op(self) -> int:
        return self.header.op


class GuestVsock:
    """The guest driver's side: three mock queues, rx buffers kept posted."""

    def __init__(
        self,
        mem: GuestMemory,
        guest_cid: int,
        kick: Callable[[int], None],
        wait: Callable[[float], bool],
        *,
        queue_size: int = 256,
        rx_buf: int = RX_BUF,
        rx_data_size: int = 24 * MiB,
    ) -> None:
        self.mem = mem
        self.guest_cid = guest_cid
        self._kick = kick
        self._wait = wait
        self.rx_buf = rx_buf
        self.rx = MockDriver(mem, queue_size, base=0x100000, data_size=rx_data_size)
        self.tx = MockDriver(mem, queue_size, base=0x100000 + rx_data_size + 0x10000, data_size=8 * MiB)
        self.ev = MockDriver(mem, 16, base=0x100000 + rx_data_size + 9 * MiB, data_size=64 * 1024)
        self.drivers = [self.rx, self.tx, self.ev]
        self.received: list[RxPacket] = []
        self.events: list[bytes] = []

    # --- sending ----------------------------------------------------------------------------
    def header(self, src_port: int, dst_port: int, op: int, **kw: Any) -> bytes:
        kw.setdefault("buf_alloc", 1 << 20)
        return header_bytes(self.guest_cid, HOST_CID, src_port, dst_port, op, **kw)

    def send_raw(self, *buffers: bytes, kick: bool = True) -> int:
        head = self.tx.add_chain(list(buffers))
        if kick:
            self._kick(TX)
        return head

    def send(self, src_port: int, dst_port: int, op: int, payload: bytes = b"", kick: bool = True, **kw: Any) -> int:
        hdr = self.header(src_port, dst_port, op, length=len(payload), **kw)
        return self.send_raw(hdr + payload, kick=kick)

    def reclaim_tx(self) -> None:
        self.tx.used()

    # --- receiving --------------------------------------------------------------------------
    def post_rx(self, count: int, size: int | None = None, kick: bool = True) -> None:
        for _ in range(count):
            self.rx.add_chain([], [size or self.rx_buf])
        if kick:
            self._kick(RX)

    def post_events(self, count: int = 4) -> None:
        for _ in range(count):
            self.ev.add_chain([], [4])
        self._kick(EVQ)

    def collect(self) -> list[RxPacket]:
        """Parse the rx buffers the device used since the last call (and the events)."""
        new = []
        for head, length in self.rx.used():
            raw = self.mem.read(self.rx.buffers(head)[0].addr, length) if length else b""
            if len(raw) >= HEADER_SIZE:
                hdr = Header.unpack(raw[:HEADER_SIZE])
                new.append(RxPacket(hdr, raw[HEADER_SIZE:]))
        self.tx.used()  # free the descriptors of sent packets
        for head, length in self.ev.used():
            self.events.append(self.mem.read(self.ev.buffers(head)[0].addr, length))
        self.received += new
        return new

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0, refill: bool = True) -> Any:
        """Collect packets (reposting rx buffers) until `predicate()` is truthy; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.collect()
            if got and refill:
                self.post_rx(len(got))
            result = predicate()
            if result:
                return result
            if got:
                continue  # progress: look again before sleeping
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout} s; received {self.received[-5:]!r}")
            self._wait(min(remaining, 0.5))

    def take(self, op: int | None = None, port: int | None = None, timeout: float = 5.0) -> RxPacket:
        """The first received packet matching op (and guest port), removed from `received`."""

        def find() -> RxPacket | None:
            for pkt in self.received:
                if (op is None or pkt.op == op) and (port is None or pkt.header.dst_port == port):
                    self.received.remove(pkt)
                    return pkt
            return None

        found: RxPacket = self.wait_for(find, timeout)
        return found


class VsockRig:
    """A VsockDevice + UnixMuxer in this process, a listener at `uds_path`, a mock guest."""

    def __init__(
        self, uds_path: str, guest_cid: int = 3, *, event_idx: bool = False, rx_posted: int = 64, **muxer_kw: Any
    ) -> None:
        self.uds_path = uds_path
        self.mem = make_guest_memory(MEM_SIZE)
        self.listener = listening_socket(uds_path)
        self.muxer = UnixMuxer(guest_cid, uds_path, self.listener, **muxer_kw)
        self.device = VsockDevice(guest_cid, self.muxer)
        self.interrupt = FakeInterrupt()
        self.guest = GuestVsock(self.mem, guest_cid, self.kick, self.pump)
        self.sockets: list[socket.socket] = []  # the host's, closed with the rig
        queues = [d.queue() for d in self.guest.drivers]
        if event_idx:
            for q in queues:
                q.event_idx = True
        self.device.activate(self.mem, queues, self.interrupt, FEATURES)
        self.guest.post_rx(rx_posted)

    def kick(self, index: int) -> None:
        self.device.process_queue(index)

    def pump(self, timeout: float = 0.0) -> bool:
        """Run the muxer once its fd is readable (or a timer is due); True if it ran."""
        delay = self.muxer.next_timeout()
        wait = timeout if delay is None else min(timeout, delay)
        if select.select([self.muxer.fileno()], [], [], max(0.0, wait))[0]:
            self.device.process_backend()
            return True
        if self.muxer.next_timeout() == 0.0:
            self.device.process_timer()
            return True
        return False

    def host_connect(self, port: int) -> socket.socket:
        """A host process connecting through uds_path with CONNECT (the OK line not read yet)."""
        sock = self.own(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        sock.connect(self.uds_path)
        sock.sendall(f"CONNECT {port}\n".encode())
        return sock

    def own(self, sock: socket.socket) -> socket.socket:
        """Close `sock` with the rig."""
        self.sockets.append(sock)
        return sock

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.muxer.close()
        self.mem.close()

    def __enter__(self) -> VsockRig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_line(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """One '\\n'-terminated line, read byte by byte (nothing after it is consumed); what was
    read before EOF or a reset (b"" for a socket closed before any byte)."""
    sock.settimeout(timeout)
    line = b""
    while not line.endswith(b"\n"):
        try:
            byte = sock.recv(1)
        except ConnectionResetError:  # closed by the worker with our bytes unread
            return line
        if not byte:
            return line
        line += byte
    return line


class VsockWorkerHarness(WorkerHarness):
    """One vsock worker process; the guest (GuestVsock over the memfd) and supervisor played here."""

    def __init__(
        self,
        zygote: Spawner,
        run_dir: str,
        uds_path: str,
        *,
        guest_cid: int = 3,
        mem_size: int = MEM_SIZE,
        seccomp: dict[str, Any] | None = None,
        rx_buf: int = RX_BUF,
    ) -> None:
        self.uds_path = uds_path
        args: dict[str, Any] = {"guest_cid": guest_cid, "uds_path": uds_path}
        if seccomp is not None:
            args["seccomp"] = seccomp
        listener = listening_socket(uds_path)
        super().__init__(
            zygote,
            "vsock",
            "vsock",
            f"ipc://{run_dir}/vsock-{os.getpid()}-{id(self)}",
            mem_size=mem_size,
            args=args,
            backend_fds=[listener.detach()],
        )
        self.guest = GuestVsock(self.mem, guest_cid, self.kick, self.serve, rx_buf=rx_buf)

    def setup(self, features: int = FEATURES) -> int:
        status = mmio_setup(self.mmio, self.guest.drivers, features)  # type: ignore[arg-type]
        return status

    # --- the supervisor's side ---------------------------------------------------------------
    send = WorkerHarness.send_control

    def answer(self, msg: p.Message) -> bool:
        """Connect for a guest-initiated connection, as the supervisor does (VsockConnect)."""
        if not isinstance(msg, VsockConnect):
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.connect(f"{self.uds_path}_{msg.port}")
            ok = True
        except OSError:
            ok = False
        with sock:
            fdpass.send_message(
                self.fd_channel, VsockConnected(msg.port, msg.guest_port, ok), [sock.fileno()] if ok else []
            )
        return True

    def metrics(self) -> dict[str, int]:
        return self.metric_groups()["vsock"]

    def close(self) -> None:
        super().close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.uds_path)


__all__ = ["FEATURES", "GuestVsock", "Op", "RxPacket", "VsockRig", "VsockWorkerHarness", "read_line"]
