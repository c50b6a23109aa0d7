"""The guest's side of MMDS conversations, for tests and benchmarks: frames in, frames out.

`GuestPeer` builds the frames a guest stack would send (ARP, TCP segments to the MMDS
address) and parses what comes back. `transport` is any callable that delivers one guest
frame and returns the frames produced in answer (the stack directly, or a net worker's tx
queue + rx queue through `NetWorkerHarness`).
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from devices.block.testing import Spawner
from devices.net import packets as pk
from devices.net.stack import DEFAULT_IPV4, HTTP_PORT
from shared import fdpass
from shared import protocol as p
from shared.devworker_client import MmioClient
from shared.layout import MiB
from shared.memory import GuestMemory, create_guest_memfd
from shared.virtio import constants as c
from shared.virtio.testing import MockDriver, mmio_setup

GUEST_MAC = bytes.fromhex("06000000aa01")
GUEST_IP = bytes([169, 254, 0, 2])

Transport = Callable[[bytes], list[bytes]]


@dataclass
class Reply:
    flags: int
    seq: int
    ack: int
    window: int
    payload: bytes
    mss: int | None


def parse_reply(frame: bytes) -> Reply | None:
    """A TCP segment from the MMDS in `frame`, or None (e.g. an ARP reply)."""
    eth = pk.parse_ethernet(frame)
    if eth.ethertype != pk.ETH_P_IP:
        return None
    packet = pk.parse_ipv4(eth.payload)
    seg = pk.parse_tcp(packet.payload)
    return Reply(seg.flags, seg.seq, seg.ack, seg.window, seg.payload, seg.mss)


@dataclass
class GuestPeer:
    transport: Transport
    port: int = 40000
    mac: bytes = GUEST_MAC
    ip: bytes = GUEST_IP
    mmds_ip: bytes = DEFAULT_IPV4
    seq: int = 1000
    ack: int = 0
    window: int = 65535
    received: bytearray = field(default_factory=bytearray)
    replies: list[Reply] = field(default_factory=list)
    fin_seen: bool = False
    rst_seen: bool = False

    def arp(self) -> list[bytes]:
        request = pk.arp(1, self.mac, self.ip, bytes(6), self.mmds_ip)
        return self.transport(pk.ethernet(pk.BROADCAST, self.mac, pk.ETH_P_ARP, request))

    def frame(self, flags: int, payload: bytes = b"", seq: int | None = None, mss: int | None = None) -> bytes:
        segment = pk.tcp(
            self.ip, self.mmds_ip, self.port, HTTP_PORT, self.seq if seq is None else seq, self.ack, flags,
            self.window, payload, mss,
        )  # fmt: skip
        return pk.ethernet(bytes(6), self.mac, pk.ETH_P_IP, pk.ipv4(self.ip, self.mmds_ip, pk.IPPROTO_TCP, segment))

    def send(self, flags: int, payload: bytes = b"", seq: int | None = None, mss: int | None = None) -> list[Reply]:
        """Send one segment; absorb the answers (in-order data, FIN, RST); return them."""
        replies = [r for f in self.transport(self.frame(flags, payload, seq, mss)) if (r := parse_reply(f))]
        if seq is None:
            self.seq += len(payload) + (1 if flags & (pk.TCP_SYN | pk.TCP_FIN) else 0)
        self.absorb(replies)
        return replies

    def absorb(self, replies: list[Reply]) -> None:
        for r in replies:
            self.replies.append(r)
            if r.flags & pk.TCP_RST:
                self.rst_seen = True
                continue
            if r.flags & pk.TCP_SYN:
                self.ack = (r.seq + 1) & 0xFFFFFFFF
                continue
            if r.seq == self.ack and r.payload:
                self.received += r.payload
                self.ack = (self.ack + len(r.payload)) & 0xFFFFFFFF
            if r.flags & pk.TCP_FIN and r.seq + len(r.payload) == self.ack:
                self.ack = (self.ack + 1) & 0xFFFFFFFF
                self.fin_seen = True

    def connect(self) -> Reply:
        (syn_ack,) = self.send(pk.TCP_SYN, mss=1460)
        assert syn_ack.flags == pk.TCP_SYN | pk.TCP_ACK, syn_ack
        self.send(pk.TCP_ACK)
        return syn_ack

    def request(self, text: str, *, fin: bool = False) -> bytes:
        """Send an HTTP request (ACKing every data segment) and return all bytes received."""
        flags = pk.TCP_ACK | pk.TCP_PSH | (pk.TCP_FIN if fin else 0)
        replies = self.send(flags, text.encode())
        while any(r.payload or r.flags & pk.TCP_FIN for r in replies) and not self.rst_seen:
            replies = self.send(pk.TCP_ACK)
        return bytes(self.received)


def http_body(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of the first response in `raw`."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, rest[: int(headers.get("content-length", "0"))]


# --- a real net worker, driven from the host ------------------------------------------------


VNET_HDR = bytes(12)
RX, TX = 0, 1


class NetWorkerHarness:
    """One net worker on `tap_fd`, with the guest (rx/tx MockDrivers) and supervisor played here.

    The harness takes ownership of `tap_fd`'s copy it passes (it closes it after the spawn).
    """

    def __init__(
        self,
        zygote: Spawner,
        run_dir: str,
        tap_fd: int,
        *,
        iface_id: str = "eth0",
        guest_mac: str | None = "06:00:00:00:aa:01",
        mmds: dict[str, Any] | None = None,
        rx_rate_limiter: dict[str, Any] | None = None,
        tx_rate_limiter: dict[str, Any] | None = None,
        mem_size: int = 64 * MiB,
        queue_size: int = 256,
        seccomp: dict[str, Any] | None = None,
    ) -> None:
        self.zygote = zygote
        self.name = f"net_{iface_id}"
        self.ctx = zmq.Context()
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.bind(f"ipc://{run_dir}/{self.name}-ctl")
        self.mmio_endpoint = f"ipc://{run_dir}/{self.name}-mmio"
        self.logs: list[str] = []
        self.memfd = create_guest_memfd(mem_size)
        self.mem = GuestMemory.map(self.memfd, mem_size)
        self.irqfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.queue_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(2)]
        self.fd_channel, theirs = fdpass.channel_pair()
        args = {
            "iface_id": iface_id,
            "guest_mac": guest_mac,
            "rx_rate_limiter": rx_rate_limiter,
            "tx_rate_limiter": tx_rate_limiter,
            "mmds": mmds,
            "mem_size": mem_size,
            "name": self.name,
            "control_endpoint": f"ipc://{run_dir}/{self.name}-ctl",
            "mmio_endpoint": self.mmio_endpoint,
        }
        if seccomp is not None:
            args["seccomp"] = seccomp
        try:
            fds = [self.memfd, self.irqfd, *self.queue_fds, tap_fd, theirs.fileno()]
            self.pid = zygote.spawn("net", self.name, args, fds)
        finally:
            os.close(tap_fd)
            theirs.close()
        self.ready = self.expect(p.Ready)
        self.mmio = MmioClient(self.ctx, self.mmio_endpoint, timeout_s=5.0)
        self.rx = MockDriver(self.mem, size=queue_size, base=0x10000, data_size=24 * MiB)
        self.tx = MockDriver(self.mem, size=queue_size, base=0x10000 + 28 * MiB, data_size=24 * MiB)

    # --- the guest's side ------------------------------------------------------------------

    def setup(self, features: int = c.feature(c.VIRTIO_F_VERSION_1)) -> int:
        return mmio_setup(self.mmio, [self.rx, self.tx], features)  # type: ignore[arg-type]

    def kick(self, queue: int) -> None:
        os.eventfd_write(self.queue_fds[queue], 1)

    def add_rx_buffers(self, count: int, size: int = 2048) -> list[int]:
        heads = [self.rx.add_chain([], [size]) for _ in range(count)]
        self.kick(RX)
        return heads

    def send(self, *frames: bytes, header: bytes = VNET_HDR) -> list[tuple[int, int]]:
        """Queue `frames` (each behind a virtio-net header) on tx; wait until all are used."""
        heads = [self.tx.add_chain([header + frame]) for frame in frames]
        self.kick(TX)
        return self.wait_used(self.tx, len(heads))

    def send_raw(self, readable: list[bytes]) -> list[tuple[int, int]]:
        """One tx chain made of exactly these buffers (for malformed frames)."""
        self.tx.add_chain(readable)
        self.kick(TX)
        return self.wait_used(self.tx, 1)

    def wait_interrupt(self, timeout: float = 5.0) -> bool:
        if not select.select([self.irqfd], [], [], timeout)[0]:
            return False
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.irqfd)
        return True

    def wait_used(self, driver: MockDriver, count: int, timeout: float = 5.0) -> list[tuple[int, int]]:
        deadline = time.monotonic() + timeout
        entries: list[tuple[int, int]] = []
        while True:
            entries += driver.used()
            if len(entries) >= count:
                return entries
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.wait_interrupt(remaining):
                raise TimeoutError(f"{len(entries)} of {count} buffers used within {timeout} s")

    def received(self, count: int, timeout: float = 5.0) -> list[tuple[bytes, bytes]]:
        """The next `count` frames the device put in rx buffers: (virtio-net header, frame)."""
        frames = []
        for head, length in self.wait_used(self.rx, count, timeout):
            data = b"".join(self.rx.written(head))[:length]
            frames.append((data[:12], data[12:]))
        return frames

    def mmds_transport(self, frame: bytes) -> list[bytes]:
        """`GuestPeer` transport: send one frame on tx; the worker puts MMDS answers in the rx
        ring before it marks the frame sent, so what is there now is the whole answer."""
        self.send(frame)
        out = []
        while entries := self.rx.used():
            for head, length in entries:
                out.append(b"".join(self.rx.written(head))[12:length])
            self.add_rx_buffers(len(entries))
        return out

    # --- the supervisor's side ---------------------------------------------------------------

    def send_control(self, msg: p.Message) -> None:
        self.control.send_multipart([self.name.encode(), p.encode(msg)])

    def expect(self, kind: type[p.Message], timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if not self.control.poll(int(remaining * 1000) + 1):
                break
            _, payload = self.control.recv_multipart()
            msg = p.decode(payload)
            if isinstance(msg, p.Log):
                self.logs.append(msg.text)
            if isinstance(msg, kind):
                return msg
            if isinstance(msg, p.Exited) and kind is not p.Exited:
                raise RuntimeError(f"the net worker exited: {msg.reason}\n{msg.detail}")
        raise TimeoutError(f"no {kind.__name__} from the net worker within {timeout} s")

    def metrics(self) -> dict[str, dict[str, int]]:
        self.send_control(p.FlushMetrics())
        groups: dict[str, dict[str, int]] = self.expect(p.Metrics).groups
        return groups

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def stop(self, timeout: float = 5.0) -> int | None:
        self.send_control(p.Stop())
        status = self.zygote.wait_exit(self.pid, timeout)
        if status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, 9)
            self.zygote.wait_exit(self.pid, timeout)
        return status

    def close(self) -> None:
        if self.alive():
            self.stop()
        self.mmio.close()
        self.control.close(linger=0)
        self.ctx.term()
        self.fd_channel.close()
        self.mem.close()
        for fd in (self.memfd, self.irqfd, *self.queue_fds):
            os.close(fd)

    def __enter__(self) -> NetWorkerHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
