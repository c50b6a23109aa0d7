"""Net benchmark: a real net worker process on a TAP, driven from the host, no vCPU.

    .venv/bin/python bench/net.py [--seconds 1.5] [--depth 64]

Everything lives in a throwaway network namespace with two TAPs: one held by the worker,
one read and written by this process directly, so each figure stands next to what Python
gets from the same TAP syscalls in the same run.

* guest -> TAP: `depth` frames in flight on the tx queue (1500-byte frames, and 64 KiB
  TCP GSO frames with a virtio-net header asking for segmentation); raw: os.writev of
  the same header + frame.
  The frames are addressed to a MAC nobody has, so the kernel drops them on arrival:
  what is measured is getting them into the TAP.
* TAP -> guest: a sender process in the namespace floods the TAP's interface through an
  AF_PACKET socket (with PACKET_VNET_HDR for the 64 KiB GSO frames, which the TAP then
  hands over unsegmented because the "guest" negotiated GUEST_TSO4/GUEST_CSUM); the
  host-side mock driver keeps `depth` rx buffers posted; raw: os.read on the other TAP.
  Frames the reader does not take in time overflow the TAP's queue (kernel drops): the
  figure is what the reader received.

The mock driver behaves as Linux's: it negotiates VIRTIO_F_EVENT_IDX, builds its chains
once and publishes each again as soon as it comes back, kicks only when the worker's
avail_event asks for it and moves used_event to what it consumed. It prints pps and
Gbit/s, and kicks and interrupts per frame; it asserts nothing. Needs root and iproute2.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from controlplane.zygote import Zygote  # noqa: E402
from devices.net import packets as pk  # noqa: E402
from devices.net.device import (  # noqa: E402
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_HOST_TSO4,
)
from devices.net.testing import RX, TX, NetWorkerHarness  # noqa: E402
from shared.virtio import constants as c  # noqa: E402
from shared.virtio.testing import MockDriver  # noqa: E402
from tests.support import netns  # noqa: E402

HOST_IP, GUEST_IP = "169.254.20.1", "169.254.20.2"
NOBODY = bytes.fromhex("02eeeeeeeeee")
GUEST_MAC = bytes.fromhex("060000001402")
GSO_PAYLOAD = 65536 - 54 - 14  # a 64 KiB IP packet
VNET = struct.Struct("<BBHHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers


def tcp_frame(dst_mac: bytes, src_mac: bytes, payload_len: int, src: str, dst: str) -> bytes:
    payload = bytes(payload_len)
    seg = pk.tcp(socket.inet_aton(src), socket.inet_aton(dst), 1234, 5678, 1, 1, pk.TCP_ACK, 65535, payload)
    return pk.ethernet(dst_mac, src_mac, pk.ETH_P_IP, pk.ipv4(socket.inet_aton(src), socket.inet_aton(dst), 6, seg))


def gso_header(frame_len: int) -> bytes:
    """TCPv4 GSO, checksum left to the other side (VIRTIO_NET_HDR_F_NEEDS_CSUM)."""
    return VNET.pack(1, 1, 54, 1448, 34, 16, 0) if frame_len > 1514 else bytes(12)


def rate(frames: int, nbytes: int, seconds: float) -> tuple[float, float]:
    return frames / seconds, nbytes * 8 / seconds / 1e9


# --- guest -> TAP ------------------------------------------------------------------------------


class Counts:
    """Kicks and interrupts of one workload."""

    def __init__(self) -> None:
        self.kicks = self.interrupts = self.frames = 0

    def per_frame(self) -> str:
        frames = max(self.frames, 1)
        return f"kicks/frame {self.kicks / frames:.3f}, interrupts/frame {self.interrupts / frames:.3f}"


def keep_in_flight(
    h: NetWorkerHarness, driver: MockDriver, index: int, heads: list[int], seconds: float, counts: Counts
) -> tuple[int, int, float]:
    """Publish `heads` on queue `index` and each again as soon as it is used, for `seconds`:
    (chains used, bytes the device wrote into them, elapsed). Tx asks for its interrupts
    delayed, as Linux's virtio-net does."""
    delayed = index == TX
    driver.used(release=False)
    driver.enable_interrupts(delayed=delayed)

    def publish(batch: list[int]) -> None:
        for head in batch:
            driver.publish(head)
        if driver.kick_needed():
            counts.kicks += 1
            h.kick(index)

    publish(heads)
    used = nbytes = 0
    idle = True
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        if idle:
            if not h.wait_interrupt(0.2):
                continue
            counts.interrupts += 1
        entries = driver.used(release=False)
        idle = driver.enable_interrupts(delayed=delayed)
        used += len(entries)
        nbytes += sum(length for _, length in entries)
        publish([head for head, _ in entries])
    elapsed = time.perf_counter() - start
    counts.frames += used
    return used, nbytes, elapsed


def settle(h: NetWorkerHarness, driver: MockDriver) -> None:
    """Wait until the worker gave back every chain in flight (tx), then forget them."""
    deadline = time.monotonic() + 5
    while driver.used_idx != driver.avail_idx and time.monotonic() < deadline:
        h.wait_interrupt(0.1)
    driver.used(release=False)


def worker_tx(h: NetWorkerHarness, frame: bytes, depth: int, seconds: float, counts: Counts) -> tuple[float, float]:
    header = gso_header(len(frame))
    heads = [h.tx.make_chain([header + frame]) for _ in range(depth)]
    sent, _, elapsed = keep_in_flight(h, h.tx, TX, heads, seconds, counts)
    settle(h, h.tx)
    return rate(sent, sent * len(frame), elapsed)


def raw_tx(fd: int, frame: bytes, seconds: float) -> tuple[float, float]:
    buffers = [gso_header(len(frame)), frame]
    sent = 0
    end = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < end:
        for _ in range(64):
            os.writev(fd, buffers)
        sent += 64
    return rate(sent, sent * len(frame), time.perf_counter() - start)


# --- TAP -> guest ------------------------------------------------------------------------------

SENDER = textwrap.dedent(
    """
    import socket, sys, time
    tap, size, gso, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", float(sys.argv[4])
    frame = bytes.fromhex(sys.stdin.read())
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    if gso:
        s.setsockopt(263, 15, 1)  # SOL_PACKET, PACKET_VNET_HDR
    s.bind((tap, 0))
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(32):
            try:
                s.send(frame)
            except OSError:
                pass
    """
)


def start_sender(ns: netns.NetNs, tap: str, frame: bytes, seconds: float) -> subprocess.Popen[str]:
    gso = len(frame) > 1514
    payload = (gso_header(len(frame))[:10] + frame) if gso else frame  # a packet socket's header has no num_buffers
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            ns.name,
            sys.executable,
            "-c",
            SENDER,
            tap,
            str(len(frame)),
            str(int(gso)),
            str(seconds),
        ],
        stdin=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    proc.stdin.write(payload.hex())
    proc.stdin.close()
    return proc


def worker_rx(
    h: NetWorkerHarness, ns: netns.NetNs, tap: str, frame: bytes, depth: int, seconds: float, counts: Counts
) -> tuple[float, float]:
    size = 65562 if len(frame) > 1514 else 2048
    heads = rx_heads.setdefault(size, [h.rx.make_chain([], [size]) for _ in range(depth)])
    sender = start_sender(ns, tap, frame, seconds + 0.3)
    time.sleep(0.3)  # the sender's interpreter starts
    got, nbytes, elapsed = keep_in_flight(h, h.rx, RX, heads, seconds, counts)
    sender.wait()
    return rate(got, nbytes - 12 * got, elapsed)


rx_heads: dict[int, list[int]] = {}  # rx chains by buffer size, built once


def raw_rx(fd: int, ns: netns.NetNs, tap: str, frame: bytes, seconds: float) -> tuple[float, float]:
    sender = start_sender(ns, tap, frame, seconds + 0.3)
    time.sleep(0.3)
    got = nbytes = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        if not select.select([fd], [], [], 0.2)[0]:
            continue
        while True:
            try:
                n = len(os.read(fd, 65562 + 12))
            except BlockingIOError:
                break
            got += 1
            nbytes += n - 12
    elapsed = time.perf_counter() - start
    sender.wait()
    return rate(got, nbytes, elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--depth", type=int, default=64)
    opts = parser.parse_args()
    if not netns.available():
        sys.exit("bench/net.py needs root, iproute2 and /dev/net/tun")
    zygote = Zygote.start()
    ns = netns.NetNs(f"embervm-bench-{os.getpid()}")
    run_dir = f"/tmp/embervm-bench-net-{os.getpid()}"
    os.makedirs(run_dir, exist_ok=True)
    try:
        ns.add_tap("benchw", f"{HOST_IP}/24")
        ns.add_tap("benchr", "169.254.21.1/24")
        for tap in ("benchw", "benchr"):
            ns.ip("link", "set", tap, "txqueuelen", "5000")
        raw_fd = ns.open_tap("benchr")
        from devices.net.tap import TUN_F_CSUM, TUN_F_TSO4, set_offload

        set_offload(raw_fd, TUN_F_CSUM | TUN_F_TSO4)
        features = sum(
            c.feature(b)
            for b in (
                c.VIRTIO_F_VERSION_1,
                VIRTIO_NET_F_CSUM,
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_HOST_TSO4,
            )
        )
        with NetWorkerHarness(zygote, run_dir, ns.open_tap("benchw"), guest_mac=GUEST_MAC.hex(":")) as h:
            h.rx.event_idx = h.tx.event_idx = True
            assert h.setup(features | c.feature(c.VIRTIO_F_EVENT_IDX)) & c.STATUS_DRIVER_OK
            notes = []
            print(f"net worker vs raw TAP syscalls from Python, depth {opts.depth}, {opts.seconds:g} s each")
            print(f"{'direction / frame':28} {'worker':>22} {'raw TAP':>22} {'ratio':>6}")
            for label, size in (("1500 B", 1500 - 54), ("64 KiB GSO", GSO_PAYLOAD)):
                out = tcp_frame(NOBODY, GUEST_MAC, size, GUEST_IP, HOST_IP)
                inbound = tcp_frame(GUEST_MAC, NOBODY, size, HOST_IP, GUEST_IP)
                tx_counts, rx_counts = Counts(), Counts()
                runs = (
                    (f"guest->TAP {label}", worker_tx, (h, out, opts.depth, opts.seconds, tx_counts),
                     raw_tx, (raw_fd, out, opts.seconds), tx_counts),
                    (f"TAP->guest {label}", worker_rx, (h, ns, "benchw", inbound, opts.depth, opts.seconds, rx_counts),
                     raw_rx, (raw_fd, ns, "benchr", inbound, opts.seconds), rx_counts),
                )  # fmt: skip
                for name, worker, worker_args, raw, raw_args, counts in runs:
                    (wp, wg), (rp, rg) = worker(*worker_args), raw(*raw_args)  # type: ignore[operator]
                    ratio = wp / rp if rp else 0.0
                    print(f"{name:28} {wp:9.0f} pps {wg:6.2f} Gb/s {rp:9.0f} pps {rg:6.2f} Gb/s {ratio:6.2f}")
                    notes.append(f"{name:28} {counts.per_frame()}")
            print()
            print("\n".join(notes))
            metrics = h.metrics()[h.name]
            print(
                f"\nworker counters: tx {metrics['tx_packets_count']} frames, rx {metrics['rx_packets_count']} frames, "
                f"rx dropped {metrics['rx_dropped_frames']}, waited for buffers {metrics['no_rx_avail_buffer']} times"
            )
        os.close(raw_fd)
    finally:
        ns.delete()
        zygote.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
