"""The block worker as a real process, driven from the host: rings in the memfd, kicks on its
ioeventfd, completions on its irqfd, register accesses over its MMIO channel."""

from __future__ import annotations

import os
import select
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devices.block.request import RequestType, Status
from devices.block.testing import FEATURES, BlockWorkerHarness, header
from shared import protocol as p
from shared.memlimit import DEVICE_HEADROOM
from shared.virtio import constants as c

SECTORS = 128  # 64 KiB disk
SECTOR = 512


def sector_pattern(sector: int) -> bytes:
    return bytes([sector % 256]) * SECTOR


def make_disk(path: Path, sectors: int = SECTORS) -> Path:
    path.write_bytes(b"".join(sector_pattern(i) for i in range(sectors)))
    return path


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return make_disk(tmp_path / "disk.img")


@pytest.fixture
def worker(launcher, disk: Path) -> Iterator[BlockWorkerHarness]:
    with BlockWorkerHarness(launcher.zygote, launcher.run_dir, str(disk), cache_type="Writeback") as harness:
        assert harness.setup() & c.STATUS_DRIVER_OK
        yield harness


def status(worker: BlockWorkerHarness) -> int:
    return worker.mmio.read(c.MMIO_STATUS, 4)


# --- requests -------------------------------------------------------------------------------


def test_read_fills_guest_buffer_from_disk(worker: BlockWorkerHarness) -> None:
    head = worker.add_read(7, 2 * SECTOR)

    assert worker.submit(head) == [(head, 2 * SECTOR + 1)]
    assert worker.driver.written(head)[0] == sector_pattern(7) + sector_pattern(8)
    assert worker.status_of(head) == Status.OK


def test_write_reaches_the_disk_file(worker: BlockWorkerHarness, disk: Path) -> None:
    head = worker.add_write(3, b"\xab" * SECTOR)

    worker.submit(head)

    assert worker.status_of(head) == Status.OK
    assert disk.read_bytes()[3 * SECTOR : 4 * SECTOR] == b"\xab" * SECTOR


def test_flush_is_served_when_writeback(worker: BlockWorkerHarness) -> None:
    head = worker.driver.add_chain([header(RequestType.FLUSH)], [1])

    worker.submit(head)

    assert worker.status_of(head) == Status.OK
    assert worker.metrics()["flush_count"] == 1


def test_get_id_answers_the_drive_id(worker: BlockWorkerHarness) -> None:
    head = worker.driver.add_chain([header(RequestType.GET_ID)], [20, 1])

    worker.submit(head)

    assert worker.driver.written(head)[0] == b"vda".ljust(20, b"\0")


def test_read_past_the_end_is_ioerr(worker: BlockWorkerHarness) -> None:
    head = worker.add_read(SECTORS - 1, 2 * SECTOR)

    worker.submit(head)

    assert worker.status_of(head) == Status.IOERR


def test_unknown_request_type_is_unsupp(worker: BlockWorkerHarness) -> None:
    head = worker.driver.add_chain([header(99)], [1])

    worker.submit(head)

    assert worker.status_of(head) == Status.UNSUPP


def test_write_to_read_only_drive_is_ioerr_and_disk_unchanged(launcher, disk: Path) -> None:
    with BlockWorkerHarness(launcher.zygote, launcher.run_dir, str(disk), read_only=True) as ro:
        ro.setup()
        head = ro.add_write(0, b"\xee" * SECTOR)

        ro.submit(head)

        assert ro.status_of(head) == Status.IOERR
    assert disk.read_bytes()[:SECTOR] == sector_pattern(0)


def test_config_space_shows_capacity_and_features_offer_flush(worker: BlockWorkerHarness) -> None:
    assert worker.mmio.read(c.MMIO_CONFIG, 8) == SECTORS
    worker.mmio.write(c.MMIO_DEVICE_FEATURES_SEL, 4, 0)
    assert worker.mmio.read(c.MMIO_DEVICE_FEATURES, 4) & (1 << 9)  # VIRTIO_BLK_F_FLUSH


def test_completion_sets_interrupt_status(worker: BlockWorkerHarness) -> None:
    worker.submit(worker.add_read(0, SECTOR))

    assert worker.mmio.read(c.MMIO_INTERRUPT_STATUS, 4) & c.INTERRUPT_USED_RING


# --- a hostile guest ----------------------------------------------------------------------------


def _alive_and_serving(worker: BlockWorkerHarness) -> bool:
    head = worker.add_read(1, SECTOR)
    worker.submit(head)
    return worker.alive() and worker.driver.written(head)[0] == sector_pattern(1)


def _publish_raw(worker: BlockWorkerHarness, head: int) -> list[tuple[int, int]]:
    worker.driver.publish(head)
    worker.kick()
    return worker.wait_used(1)


def test_descriptor_loop_fails_the_request_only(worker: BlockWorkerHarness) -> None:
    drv = worker.driver
    addr = drv.alloc(16)
    drv.mem.write(addr, header(RequestType.IN))
    drv.write_descriptor(10, addr, 16, c.VIRTQ_DESC_F_NEXT, 11)
    drv.write_descriptor(11, addr, 16, c.VIRTQ_DESC_F_NEXT, 10)

    assert _publish_raw(worker, 10) == [(10, 0)]
    assert _alive_and_serving(worker)
    assert worker.metrics()["invalid_reqs_count"] == 1


def test_buffer_outside_guest_memory_fails_the_request_only(worker: BlockWorkerHarness) -> None:
    worker.driver.write_descriptor(20, 0xFFFF_0000_0000, 16, 0, 0)

    assert _publish_raw(worker, 20) == [(20, 0)]
    assert _alive_and_serving(worker)


def test_zero_length_status_is_a_failed_request(worker: BlockWorkerHarness) -> None:
    drv = worker.driver
    addr = drv.alloc(16)
    drv.mem.write(addr, header(RequestType.IN))
    drv.write_descriptor(30, addr, 16, c.VIRTQ_DESC_F_NEXT, 31)
    drv.write_descriptor(31, drv.alloc(16), 0, c.VIRTQ_DESC_F_WRITE, 0)

    assert _publish_raw(worker, 30) == [(30, 0)]
    assert _alive_and_serving(worker)


def test_readable_after_writable_fails_the_request_only(worker: BlockWorkerHarness) -> None:
    drv = worker.driver
    drv.write_descriptor(40, drv.alloc(16), 16, c.VIRTQ_DESC_F_WRITE | c.VIRTQ_DESC_F_NEXT, 41)
    drv.write_descriptor(41, drv.alloc(16), 16, 0, 0)

    assert _publish_raw(worker, 40) == [(40, 0)]
    assert _alive_and_serving(worker)


def test_header_in_a_writable_buffer_is_ioerr(worker: BlockWorkerHarness) -> None:
    head = worker.driver.add_chain([], [16, SECTOR, 1])

    worker.submit(head)

    assert worker.status_of(head) == Status.IOERR
    assert _alive_and_serving(worker)


def test_chain_longer_than_the_queue_fails_the_request_only(launcher, disk: Path) -> None:
    with BlockWorkerHarness(launcher.zygote, launcher.run_dir, str(disk), queue_size=16) as w:
        w.setup(FEATURES | c.feature(c.VIRTIO_F_INDIRECT_DESC))
        data = w.driver.alloc(16)
        w.driver.mem.write(data, header(RequestType.IN))
        entries = [(data, 16, c.VIRTQ_DESC_F_NEXT, i + 1) for i in range(40)] + [(data, 1, c.VIRTQ_DESC_F_WRITE, 0)]
        table = w.driver.write_indirect_table(entries)
        w.driver.write_descriptor(0, table, 16 * len(entries), c.VIRTQ_DESC_F_INDIRECT)

        assert _publish_raw(w, 0) == [(0, 0)]
        assert w.alive()


def test_runaway_avail_index_sets_needs_reset_and_worker_survives(worker: BlockWorkerHarness) -> None:
    worker.driver.set_avail_idx(5000)

    worker.kick()

    assert worker.wait_interrupt()
    assert status(worker) & c.STATUS_DEVICE_NEEDS_RESET
    assert worker.mmio.read(c.MMIO_INTERRUPT_STATUS, 4) & c.INTERRUPT_CONFIG_CHANGE
    assert worker.alive() and worker.mmio.read(c.MMIO_MAGIC_VALUE, 4) == c.MMIO_MAGIC


def test_device_is_usable_again_after_reset(worker: BlockWorkerHarness) -> None:
    worker.driver.set_avail_idx(5000)
    worker.kick()
    worker.wait_interrupt()
    fresh = type(worker.driver)(worker.mem, size=64, base=0x200000)
    worker.driver = fresh

    assert worker.setup(drivers=[fresh]) & c.STATUS_DRIVER_OK
    assert _alive_and_serving(worker)


def test_garbage_on_every_channel_leaves_the_worker_serving(worker: BlockWorkerHarness) -> None:
    import socket

    raw = worker.mmio._sock  # the vCPU worker's end of the MMIO channel
    raw.send(b"\xc1 not msgpack")
    raw.send(p.encode(p.MmioRead(1, 0x2000, 4)))  # outside the window: all-ones
    worker.control.send_multipart([worker.name.encode(), b"\x93garbage"])
    worker.fd_channel.send(b"not a message")
    socket.send_fds(worker.fd_channel, [p.encode(p.ReplaceBackingFile(9))], [os.open("/dev/null", os.O_RDONLY)])

    assert select.select([raw], [], [], 5.0)[0] and p.decode(raw.recv(256)) == p.MmioDone(1, 0xFFFFFFFF)
    try:
        result = worker.expect(p.UpdateResult, timeout=20.0)  # generous: CI runs this on a loaded 2-core host
    except TimeoutError as e:
        raise AssertionError(f"{e}; worker alive: {worker.alive()}; its stderr: {worker.stderr()[-3000:]}") from None
    assert not result.ok  # /dev/null is no disk
    assert _alive_and_serving(worker)
    assert worker.metrics()["bad_messages"] == 3


# --- the process and its fds --------------------------------------------------------------------


def test_worker_is_its_own_process_holding_only_its_fds(worker: BlockWorkerHarness, disk: Path) -> None:
    pid = worker.pid
    targets = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd") if int(fd) > 2}

    assert pid not in (os.getpid(), worker.zygote.pid)  # type: ignore[attr-defined]
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "embervm-block_v"
    assert str(disk) in targets
    assert any(t.startswith("/memfd:") for t in targets)
    paths = {t for t in targets if t.startswith("/") and not t.startswith("/memfd:")}
    assert paths == {str(disk)}
    assert not any("kvm" in t for t in targets)


def test_stop_ends_the_worker_cleanly(launcher, disk: Path) -> None:
    harness = BlockWorkerHarness(launcher.zygote, launcher.run_dir, str(disk))
    try:
        wait_status = harness.stop()

        assert wait_status is not None and os.WIFEXITED(wait_status) and os.WEXITSTATUS(wait_status) == 0
    finally:
        harness.close()


# --- run-time updates ------------------------------------------------------------------------------


def test_new_backing_file_changes_capacity_content_and_interrupts(worker: BlockWorkerHarness, tmp_path: Path) -> None:
    bigger = tmp_path / "bigger.img"
    bigger.write_bytes(b"\x5a" * SECTOR * 256)
    generation = worker.mmio.read(c.MMIO_CONFIG_GENERATION, 4)
    fd = os.open(bigger, os.O_RDWR)

    result = worker.replace_backing_file(fd)
    os.close(fd)

    assert result.ok
    assert worker.wait_interrupt()
    assert worker.mmio.read(c.MMIO_INTERRUPT_STATUS, 4) & c.INTERRUPT_CONFIG_CHANGE
    assert worker.mmio.read(c.MMIO_CONFIG_GENERATION, 4) == generation + 1
    assert worker.mmio.read(c.MMIO_CONFIG, 8) == 256
    head = worker.add_read(200, SECTOR)
    worker.submit(head)
    assert worker.driver.written(head)[0] == b"\x5a" * SECTOR
    assert worker.metrics()["update_count"] == 1


def _throughput(worker: BlockWorkerHarness, requests: int, size: int) -> float:
    """Bytes per second for `requests` reads of `size` bytes, queued at once."""
    heads = [worker.add_read(0, size) for _ in range(requests)]
    start = time.monotonic()
    worker.submit(*heads)
    return requests * size / (time.monotonic() - start)


def test_rate_limited_drive_runs_within_ten_percent_of_its_rate(launcher, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "big.img", sectors=2048)
    rate = 2 << 20  # bytes/s: 256 KiB every 125 ms
    limiter = {"bandwidth": {"size": 256 << 10, "refill_time": 125}, "ops": None}
    with BlockWorkerHarness(launcher.zygote, launcher.run_dir, str(disk), rate_limiter=limiter) as w:
        w.setup()
        w.submit(*[w.add_read(0, 64 << 10) for _ in range(4)])  # spend the initial full bucket

        measured = _throughput(w, 24, 64 << 10)  # 1.5 MiB: ~0.75 s at the limit

        assert abs(measured - rate) / rate < 0.10, f"{measured / 2**20:.2f} MiB/s, limit {rate / 2**20:.2f}"
        assert w.metrics()["rate_limiter_throttled_events"] > 0


def test_rate_limiter_update_takes_effect(launcher, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "big.img", sectors=2048)
    slow = {"bandwidth": {"size": 64 << 10, "refill_time": 1000}, "ops": None}  # 64 KiB/s
    with BlockWorkerHarness(launcher.zygote, launcher.run_dir, str(disk), rate_limiter=slow) as w:
        w.setup()
        w.submit(w.add_read(0, 64 << 10))  # bucket now empty: the next read would wait ~1 s
        heads = [w.add_read(0, 64 << 10) for _ in range(4)]
        w.kick()

        w.send(p.UpdateRateLimiter(5, {"size": 64 << 20, "refill_time": 1000}, None))

        assert w.expect(p.UpdateResult) == p.UpdateResult(5, True, "")
        assert len(w.wait_used(len(heads), timeout=0.5)) == len(heads)


def test_metrics_use_firecracker_names(worker: BlockWorkerHarness) -> None:
    worker.submit(worker.add_read(0, SECTOR), worker.add_write(1, b"\1" * SECTOR))

    metrics = worker.metrics()

    assert (metrics["read_count"], metrics["write_count"]) == (1, 1)
    assert (metrics["read_bytes"], metrics["write_bytes"]) == (SECTOR, SECTOR)
    assert {"execute_fails", "rate_limiter_throttled_events", "update_count"} <= set(metrics)


def test_bad_fd_channel_message_closes_the_fds_it_carried(worker: BlockWorkerHarness, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    marker.write_bytes(b"")
    fd = os.open(marker, os.O_RDONLY)
    import socket

    socket.send_fds(worker.fd_channel, [struct.pack("B", 0xC1)], [fd])
    os.close(fd)

    assert _alive_and_serving(worker)
    targets = {os.readlink(f"/proc/{worker.pid}/fd/{n}") for n in os.listdir(f"/proc/{worker.pid}/fd")}
    assert str(marker) not in targets


def vm_size(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


def test_the_worker_runs_under_its_memory_ceiling(worker: BlockWorkerHarness) -> None:
    """RLIMIT_AS = the address space it was forked with + guest memory + headroom
    (shared.memlimit), set by the worker itself."""
    with open(f"/proc/{worker.pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max address space"))
    soft, hard = line.split()[3:5]
    inherited = int(hard) - worker.mem.size - DEVICE_HEADROOM
    zygote_size = vm_size(worker.zygote.pid)  # type: ignore[attr-defined]
    assert int(soft) == int(hard) and 0 < inherited <= zygote_size + (64 << 20)
    assert vm_size(worker.pid) < int(hard)
    head = worker.add_read(1, SECTOR)
    assert worker.submit(head) == [(head, SECTOR + 1)]  # and serves within it
