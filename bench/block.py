"""Block benchmark: a real block worker process driven from the host, no vCPU.

    .venv/bin/python bench/block.py [--seconds 1.5] [--depth 32] [--disk-mib 256]

Workloads, each next to raw preadv/pwritev by this process on the same file in the
same run (so the ratio shows what the worker costs over the syscall itself):

* sequential 128 KiB reads and writes (MB/s),
* random 4 KiB reads (IOPS),
* the notify -> interrupt round trip: a no-op FLUSH kicked on the queue's ioeventfd,
  the worker wakes, completes it and writes the irqfd (median, p99), next to a plain
  eventfd ping-pong between two processes, a register read over the device's MMIO
  channel (a socketpair: what Status, queue set-up and feature accesses still cost) and
  an InterruptStatus read as the vCPU worker answers it now, from the register page
  (`shared.virtio.regpage`), without leaving the process.

`depth` requests are kept in flight, as a Linux driver does: the mock driver negotiates
VIRTIO_F_EVENT_IDX, re-publishes each chain as soon as it comes back (only the header's
sector changes; the chains are built once), kicks only when the worker's avail_event
asks for it and moves used_event to what it consumed. The disk is a temporary file, so
reads come from the page cache. It prints figures (and kicks and interrupts per request);
it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import random
import select
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.procstats import cpu_seconds  # noqa: E402
from controlplane.zygote import Zygote  # noqa: E402
from devices.block.request import HEADER, RequestType  # noqa: E402
from devices.block.testing import FEATURES, BlockWorkerHarness, header  # noqa: E402
from shared.layout import MiB  # noqa: E402
from shared.virtio import constants as c  # noqa: E402

KiB = 1024


def eventfd_ping_pong(rounds: int) -> list[float]:
    """Round-trip times of a plain eventfd ping-pong with a forked child (seconds)."""
    ping = os.eventfd(0, os.EFD_CLOEXEC)
    pong = os.eventfd(0, os.EFD_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            while os.eventfd_read(ping) < 1 << 32:
                os.eventfd_write(pong, 1)
        finally:
            os._exit(0)
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        os.eventfd_write(ping, 1)
        select.select([pong], [], [])
        os.eventfd_read(pong)
        samples.append(time.perf_counter() - start)
    os.eventfd_write(ping, 1 << 40)
    os.waitpid(pid, 0)
    os.close(ping)
    os.close(pong)
    return samples


class Bench:
    """A block worker over `disk` with `depth` reusable chains of one kind."""

    def __init__(self, zygote: Zygote, run_dir: str, disk: Path, depth: int) -> None:
        self.harness = BlockWorkerHarness(zygote, run_dir, str(disk), mem_size=64 * MiB, queue_size=256)
        self.harness.driver.event_idx = True
        assert self.harness.setup(FEATURES | c.feature(c.VIRTIO_F_EVENT_IDX)) & c.STATUS_DRIVER_OK
        self.depth = depth
        self.kicks = 0
        self.interrupts = 0

    def chains(self, kind: int, size: int) -> list[int]:
        drv = self.harness.driver
        if kind == RequestType.OUT:
            return [drv.make_chain([header(kind), bytes(size)], [1]) for _ in range(self.depth)]
        if kind == RequestType.IN:
            return [drv.make_chain([header(kind)], [size, 1]) for _ in range(self.depth)]
        return [drv.make_chain([header(kind)], [1]) for _ in range(self.depth)]

    def wait_used(self, count: int) -> None:
        """Wait until `count` more chains are used (the chains stay built: none is freed)."""
        drv = self.harness.driver
        target = (drv.last_used + count) & 0xFFFF
        while drv.used_idx != target:
            if not self.harness.wait_interrupt(5.0):
                raise TimeoutError("the block worker stopped completing requests")
        drv.last_used = target

    def run(self, heads: list[int], kind: int, sector: Callable[[int], int], seconds: float) -> tuple[int, float]:
        """(requests done, elapsed seconds) keeping `heads` in flight until `seconds` pass."""
        drv, h = self.harness.driver, self.harness
        header_addr = {head: drv.buffers(head)[0].addr for head in heads}
        n = 0

        def submit(batch: list[int]) -> None:
            nonlocal n
            for head in batch:
                drv.mem.write(header_addr[head], HEADER.pack(kind, 0, sector(n)))
                drv.publish(head)
                n += 1
            if drv.kick_needed():
                self.kicks += 1
                h.kick()

        done = 0
        drv.enable_interrupts()
        cpu = cpu_seconds(h.pid)
        start = time.perf_counter()
        submit(heads)
        idle = True  # nothing used that we have not seen: wait for the interrupt
        while time.perf_counter() - start < seconds:
            if idle:
                if not h.wait_interrupt(5.0):
                    raise TimeoutError(
                        "the block worker stopped completing requests: "
                        f"avail {drv.avail_idx} used {drv.used_idx} consumed {drv.last_used} "
                        f"avail_event {drv.avail_event()}, worker logs {h.logs}"
                    )
                self.interrupts += 1
            used = [head for head, _ in drv.used(release=False)]
            idle = drv.enable_interrupts()
            done += len(used)
            submit(used)
        elapsed = time.perf_counter() - start
        self.worker_cpu = cpu_seconds(h.pid) - cpu
        in_flight = (drv.avail_idx - drv.last_used) & 0xFFFF
        while in_flight:  # let the worker finish before it is stopped
            if not h.wait_interrupt(5.0):
                break
            in_flight -= len(drv.used(release=False))
            drv.enable_interrupts()
        return done, elapsed

    def notify_round_trips(self, rounds: int) -> list[float]:
        head = self.harness.driver.make_chain([header(RequestType.FLUSH)], [1])
        samples = []
        for _ in range(rounds):
            self.harness.driver.enable_interrupts()
            self.harness.driver.publish(head)
            start = time.perf_counter()
            self.harness.kick()
            self.wait_used(1)
            samples.append(time.perf_counter() - start)
        return samples

    def mmio_reads(self, rounds: int) -> list[float]:
        samples = []
        for _ in range(rounds):
            start = time.perf_counter()
            self.harness.mmio.read(c.MMIO_STATUS, 4)
            samples.append(time.perf_counter() - start)
        return samples

    def forwarded_writes(self, rounds: int) -> list[float]:
        """A register write that needs the device (QueueSel, as in queue set-up): still synchronous."""
        samples = []
        for _ in range(rounds):
            start = time.perf_counter()
            self.harness.mmio.write(c.MMIO_QUEUE_SEL, 4, 0)
            samples.append(time.perf_counter() - start)
        return samples

    def local_status_reads(self, rounds: int) -> list[float]:
        """InterruptStatus as the vCPU worker reads it: from the register page."""
        samples = []
        regs = self.harness.regs
        for _ in range(rounds):
            start = time.perf_counter()
            regs.read(c.MMIO_INTERRUPT_STATUS, 4)
            samples.append(time.perf_counter() - start)
        return samples

    def forwarded_status_reads(self, rounds: int) -> list[float]:
        """InterruptStatus over the MMIO channel, as every read was answered before."""
        samples = []
        for _ in range(rounds):
            start = time.perf_counter()
            self.harness.mmio.read(c.MMIO_INTERRUPT_STATUS, 4)
            samples.append(time.perf_counter() - start)
        return samples

    def close(self) -> None:
        self.harness.close()


def raw(fd: int, write: bool, size: int, sector: Callable[[int], int], seconds: float) -> tuple[int, float]:
    """The same I/O as plain preadv/pwritev calls from this process."""
    buf = [memoryview(bytearray(size))]
    op = os.pwritev if write else os.preadv
    n = 0
    global raw_cpu
    cpu = time.process_time()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        op(fd, buf, sector(n) * 512)
        n += 1
    raw_cpu = time.process_time() - cpu
    return n, time.perf_counter() - start


raw_cpu = 0.0  # CPU seconds of the last raw() run


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="per workload and side")
    parser.add_argument("--depth", type=int, default=32, help="requests in flight")
    parser.add_argument("--disk-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2000, help="round trips for the latency figures")
    opts = parser.parse_args()

    ping_pong = eventfd_ping_pong(opts.rounds)  # before any thread or ZeroMQ context exists
    zygote = Zygote.start()
    run_dir = tempfile.mkdtemp(prefix="embervm-bench-")
    disk = Path(run_dir) / "disk.img"
    disk.write_bytes(os.urandom(1 << 20) * opts.disk_mib)
    fd = os.open(disk, os.O_RDWR)
    rng = random.Random(1)
    sectors = disk.stat().st_size // 512
    big = 128 * KiB
    seq: Callable[[int], int] = lambda n: (n * (big // 512)) % (sectors - big // 512)  # noqa: E731
    rand: Callable[[int], int] = lambda n: rng.randrange(sectors // 8) * 8  # noqa: E731
    try:
        rows = []
        rates = []
        cpu_rows = []
        for name, kind, size, sector, write in (
            ("seq read 128 KiB", RequestType.IN, big, seq, False),
            ("seq write 128 KiB", RequestType.OUT, big, seq, True),
            ("rand read 4 KiB", RequestType.IN, 4 * KiB, rand, False),
        ):
            bench = Bench(zygote, run_dir, disk, opts.depth)  # a fresh worker and queue per workload
            try:
                done, elapsed = bench.run(bench.chains(kind, size), kind, sector, opts.seconds)
            finally:
                bench.close()
            rates.append((name, bench.kicks / max(done, 1), bench.interrupts / max(done, 1)))
            cpu_rows.append((name, bench.worker_cpu / max(done, 1)))
            raw_done, raw_elapsed = raw(fd, write, size, sector, opts.seconds)
            rows.append((name, done / elapsed, raw_done / raw_elapsed, size))
            cpu_rows[-1] += (raw_cpu / max(raw_done, 1),)
        print(f"block worker vs raw syscalls, depth {opts.depth}, {opts.seconds:g} s each (page-cached file)")
        print(f"{'workload':20} {'worker':>14} {'raw':>14} {'ratio':>7}")
        for name, ops, raw_ops, size in rows:
            if size >= 64 * KiB:
                print(f"{name:20} {ops * size / 1e6:9.0f} MB/s {raw_ops * size / 1e6:9.0f} MB/s {ops / raw_ops:7.2f}")
            else:
                print(f"{name:20} {ops:9.0f} IOPS {raw_ops:9.0f} IOPS {ops / raw_ops:7.2f}")
        print(f"\n{'workload':20} {'kicks/request':>14} {'interrupts/request':>19}")
        for name, kicks, interrupts in rates:
            print(f"{name:20} {kicks:14.3f} {interrupts:19.3f}")
        print("\nCPU time per request (what the machine's load does not inflate)")
        print(f"{'workload':20} {'worker µs':>10} {'raw µs':>8} {'ratio':>6}")
        for name, worker_cpu, raw_op_cpu in cpu_rows:
            print(f"{name:20} {worker_cpu * 1e6:10.1f} {raw_op_cpu * 1e6:8.1f} {raw_op_cpu / worker_cpu:6.2f}")
        bench = Bench(zygote, run_dir, disk, opts.depth)
        try:
            notify, mmio = bench.notify_round_trips(opts.rounds), bench.mmio_reads(opts.rounds)
            forwarded, local = bench.forwarded_status_reads(opts.rounds), bench.local_status_reads(opts.rounds)
            writes = bench.forwarded_writes(opts.rounds)
        finally:
            bench.close()
        print(f"\nround trips, {opts.rounds} samples (µs)              median      p99")
        for name, samples in (
            ("ioeventfd -> worker -> irqfd (FLUSH)", notify),
            ("plain eventfd ping-pong, 2 processes", ping_pong),
            ("Status read over the MMIO channel", mmio),
            ("QueueSel write over the MMIO channel", writes),
            ("InterruptStatus read, forwarded (before)", forwarded),
            ("InterruptStatus read, register page (now)", local),
        ):
            med, p99 = statistics.median(samples) * 1e6, percentile(samples, 0.99) * 1e6
            print(f"{name:44} {med:8.1f} {p99:8.1f}")
    finally:
        os.close(fd)
        zygote.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
