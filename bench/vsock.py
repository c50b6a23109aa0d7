"""Vsock benchmark: a real vsock worker process driven from the host, no vCPU.

    .venv/bin/python bench/vsock.py [--mib 256] [--runs 3]

A forked host process listens at `<uds_path>_53` and streams `--mib` MiB into the
connection the mock guest (this process: rings in the worker's memfd, kicks on its
ioeventfds, completions on its irqfd) opened; the guest keeps rx buffers posted and
returns credit every MiB. Side by side, in the same run: the same bytes copied through a
plain Unix socketpair between two processes (what the worker's Unix socket costs at
least). Rx buffers of 4 KiB (Linux's default) and 64 KiB, the best of `--runs`.

The mock guest behaves as Linux's driver: it negotiates VIRTIO_F_EVENT_IDX, copies each
packet's payload out and publishes the same rx buffer again at once, kicks only when the
worker's avail_event asks for it and moves used_event to what it consumed. It prints
figures (and kicks and interrupts per packet); it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from controlplane.zygote import Zygote  # noqa: E402
from devices.vsock.device import RX  # noqa: E402
from devices.vsock.packet import HEADER_SIZE, Header, Op  # noqa: E402
from devices.vsock.testing import FEATURES, VsockWorkerHarness  # noqa: E402
from shared.virtio import constants as c  # noqa: E402

MiB = 1 << 20
CHUNK = MiB


def stream_to(sock: socket.socket, total: int) -> None:
    block = os.urandom(CHUNK)
    view = memoryview(block)
    left = total
    while left:
        n = sock.send(view[: min(left, CHUNK)])
        left -= n


def forked(fn) -> int:  # type: ignore[no-untyped-def]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            fn()
        except BaseException:
            code = 1
        os._exit(code)
    return pid


def socketpair_copy(total: int) -> float:
    """Seconds to move `total` bytes through a Unix socketpair from a child process."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    buf = bytearray(65536)
    start = time.perf_counter()
    pid = forked(lambda: (b.close(), stream_to(a, total), a.close()))
    a.close()
    got = 0
    while got < total:
        n = b.recv_into(buf)
        if not n:
            break
        got += n
    elapsed = time.perf_counter() - start
    b.close()
    os.waitpid(pid, 0)
    return elapsed


class Counts:
    def __init__(self) -> None:
        self.kicks = self.interrupts = self.packets = 0


def worker_stream(harness: VsockWorkerHarness, total: int, rx_buf: int, port: int, counts: Counts) -> float:
    """Seconds for a host process to stream `total` bytes to the mock guest through the worker."""
    g = harness.guest
    g.rx_buf = rx_buf
    rx = g.rx
    listener = socket.socket(socket.AF_UNIX)
    path = f"{harness.uds_path}_{port}"
    listener.bind(path)
    listener.listen()

    def host() -> None:
        conn, _ = listener.accept()
        stream_to(conn, total)
        conn.close()

    start = time.perf_counter()
    pid = forked(host)
    listener.close()
    g.send(1000 + port, port, Op.REQUEST, buf_alloc=4 * MiB)
    g.take(Op.RESPONSE, port=1000 + port)
    # data that came in with the RESPONSE was collected by take(): count it too
    received = sum(len(pkt.payload) for pkt in g.received if pkt.op == Op.RW)
    g.received.clear()
    fwd = 0
    idle_since = time.monotonic()
    idle = True
    mem = harness.mem
    rx.enable_interrupts()
    while received < total:
        if idle and harness.wait_interrupt(1.0):
            counts.interrupts += 1
        entries = rx.used(release=False)
        idle = rx.enable_interrupts()
        for head, length in entries:
            addr = rx.buffers(head)[0].addr
            if length >= HEADER_SIZE and Header.unpack(mem.read(addr, HEADER_SIZE)).op == Op.RW:
                received += len(mem.read(addr + HEADER_SIZE, length - HEADER_SIZE))  # the guest copies it out
            rx.publish(head)
        counts.packets += len(entries)
        if entries:
            if rx.kick_needed():
                counts.kicks += 1
                harness.kick(RX)
            idle_since = time.monotonic()
        elif idle and time.monotonic() - idle_since > 5:
            raise RuntimeError(f"stalled at {received} of {total} bytes: {harness.metrics()}")
        if received - fwd >= MiB:
            fwd = received
            g.tx.used()
            g.send(1000 + port, port, Op.CREDIT_UPDATE, buf_alloc=4 * MiB, fwd_cnt=fwd & 0xFFFFFFFF)
    elapsed = time.perf_counter() - start
    g.send(1000 + port, port, Op.RST)
    os.waitpid(pid, 0)
    os.unlink(path)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB per run")
    parser.add_argument("--runs", type=int, default=3)
    opts = parser.parse_args()
    total = opts.mib * MiB
    zygote = Zygote.start()
    run_dir = tempfile.mkdtemp(prefix="embervm-bench-")
    try:
        print(f"host -> guest stream, {opts.mib} MiB, best of {opts.runs}")
        print(f"{'path':42} {'MB/s':>8} {'ratio':>7}")
        pair = min(socketpair_copy(total) for _ in range(opts.runs))
        print(f"{'Unix socketpair, process to process':42} {total / pair / 1e6:8.0f} {1.0:7.2f}")
        port = 100
        for rx_data in (4096, 65536):
            with VsockWorkerHarness(zygote, run_dir, f"{run_dir}/v.sock", rx_buf=rx_data + HEADER_SIZE) as harness:
                for driver in harness.guest.drivers:
                    driver.event_idx = True
                assert harness.setup(FEATURES | c.feature(c.VIRTIO_F_EVENT_IDX)) & c.STATUS_DRIVER_OK
                harness.guest.post_rx(128)
                best = float("inf")
                counts = Counts()
                for _ in range(opts.runs):
                    port += 1
                    best = min(best, worker_stream(harness, total, rx_data + HEADER_SIZE, port, counts))
                metrics = harness.metrics()
            label = f"vsock worker, {rx_data // 1024} KiB rx buffers"
            print(f"{label:42} {total / best / 1e6:8.0f} {pair / best:7.2f}")
            packets = max(counts.packets, 1)
            print(
                f"{'':42} rx packets {metrics['rx_packets_count']}, rx bytes {metrics['rx_bytes_count']}, "
                f"kicks/packet {counts.kicks / packets:.3f}, interrupts/packet {counts.interrupts / packets:.3f}"
            )
    finally:
        zygote.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
