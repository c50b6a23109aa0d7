"""virtio-blk end to end: the test guest's driver, the vCPU worker's MMIO forwarding and
ioeventfd/irqfd wiring, and one block worker process per drive."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.launcher import Launcher
from controlplane.microvm import DeviceUpdateError, MicroVm, VmStartError
from controlplane.vm_spec import DriveSpec, VmSpec
from guest.build import GuestImages
from shared import exitcodes
from shared.layout import MiB
from shared.memlimit import DEVICE_HEADROOM, vcpu_headroom
from tests.support.console import ConsoleCapture
from tests.support.waiting import wait_until

MEM_MIB = 64
SECTORS = 64
SECTOR = 512


def host_pattern(sector: int) -> bytes:
    """What the guest expects in sectors 0..7 (guest/README.md, test=blk)."""
    return bytes((sector * 7 + i) & 0xFF for i in range(SECTOR))


def guest_pattern(sector: int) -> bytes:
    """What the guest writes."""
    return bytes((sector * 13 + i + 1) & 0xFF for i in range(SECTOR))


def make_disk(path: Path) -> Path:
    path.write_bytes(b"".join(host_pattern(s) for s in range(SECTORS)))
    return path


@pytest.fixture
def disks(tmp_path: Path) -> tuple[Path, Path]:
    return make_disk(tmp_path / "rootfs.img"), make_disk(tmp_path / "data.img")


def two_drives(disks: tuple[Path, Path]) -> list[DriveSpec]:
    rootfs, data = disks
    return [
        DriveSpec("data", str(data), is_read_only=True),  # listed first, attached second
        DriveSpec("rootfs", str(rootfs), is_root_device=True, cache_type="Writeback"),
    ]


def start(launcher: Launcher, guest: GuestImages, args: str, drives: list[DriveSpec]) -> tuple[MicroVm, ConsoleCapture]:
    console = ConsoleCapture()
    spec = VmSpec(kernel_image_path=str(guest.elf), boot_args=args, mem_size_mib=MEM_MIB, drives=drives)
    return launcher.start_vm(spec, console, lambda code, reason: None), console


@pytest.fixture
def looping_vm(launcher, guest_images: GuestImages, disks) -> Iterator[tuple[MicroVm, ConsoleCapture]]:
    vm, console = start(launcher, guest_images, "test=loop ticks_every=20000", two_drives(disks))
    yield vm, console
    vm.stop()


def block_workers(vm: MicroVm) -> dict[str, dict[str, object]]:
    return {str(w["drive_id"]): w for w in vm.workers() if w["kind"] == "block"}


def fd_targets(pid: object) -> set[str]:
    targets = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            if int(fd) > 2:
                targets.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return targets


def zygote_children(launcher: Launcher) -> set[str]:
    pid = launcher.zygote.pid
    return set(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())


@pytest.mark.parametrize(
    "options", ["", "blk.irq=1 blk.event_idx=1 blk.indirect=1"], ids=["polled", "irqfd+event_idx+indirect"]
)
def test_guest_driver_reads_writes_and_identifies_two_drives(launcher, guest_images, disks, options):
    vm, console = start(launcher, guest_images, f"test=blk {options}", two_drives(disks))

    assert vm.wait(timeout=60) == exitcodes.OK
    lines = console.text.splitlines()
    for line in [
        f"blk0: capacity {SECTORS}",
        "blk0: id rootfs",
        "blk0: read ok",
        "blk0: write ok",
        "blk1: id data",
        "blk1: read ok",
        "blk1: write rejected ok",
        "blk: done",
    ]:
        assert line in lines, console.text
    rootfs, data = disks
    assert rootfs.read_bytes()[16 * SECTOR : 17 * SECTOR] == guest_pattern(16)
    assert data.read_bytes() == b"".join(host_pattern(s) for s in range(SECTORS))


def test_interrupt_status_and_ack_stay_in_the_vcpu_worker(launcher, guest_images, disks):
    vm, console = start(launcher, guest_images, "test=blk blk.irq=1 blk.event_idx=1", two_drives(disks))

    assert vm.wait(timeout=60) == exitcodes.OK, console.text
    interrupts = sum(int(n) for n in re.findall(r"^blk\d: interrupts (\d+)$", console.text, re.M))
    bus = vm.metrics()["embervm_bus"]
    assert interrupts >= 4, console.text
    # Each interrupt's InterruptStatus read and ACK write was answered from the register page,
    # not forwarded to the block worker (set-up and config reads come from the page too).
    assert bus["virtio_mmio_local_reads"] >= interrupts
    assert bus["virtio_mmio_local_writes"] >= interrupts


def test_metrics_have_per_drive_groups_and_their_sum(launcher, guest_images, disks):
    vm, _ = start(launcher, guest_images, "test=blk", two_drives(disks))
    vm.wait(timeout=60)

    metrics = vm.metrics()

    assert metrics["block_rootfs"]["write_count"] >= 1
    assert metrics["block_data"]["write_count"] == 0
    assert metrics["block_data"]["invalid_reqs_count"] == 1  # the rejected write
    assert metrics["block"]["read_count"] == metrics["block_rootfs"]["read_count"] + metrics["block_data"]["read_count"]
    assert metrics["block"]["get_id_count"] == 2


def test_cmdline_carries_root_and_one_window_per_drive_root_first(looping_vm):
    vm, _ = looping_vm

    assert vm.cmdline.endswith("root=/dev/vda rw virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6")


def test_each_drive_has_its_own_process_holding_only_its_own_disk(looping_vm, disks):
    vm, _ = looping_vm
    rootfs, data = disks
    vcpu = vm.workers()[0]
    drives = block_workers(vm)
    pids = {vcpu["pid"], drives["rootfs"]["pid"], drives["data"]["pid"]}

    assert len(pids) == 3 and os.getpid() not in pids
    root_fds, data_fds = fd_targets(drives["rootfs"]["pid"]), fd_targets(drives["data"]["pid"])
    assert str(rootfs) in root_fds and str(data) not in root_fds
    assert str(data) in data_fds and str(rootfs) not in data_fds
    assert not any("kvm" in t for t in root_fds | data_fds)
    assert not {str(rootfs), str(data)} & fd_targets(vcpu["pid"])
    assert {str(rootfs), str(data)} <= fd_targets(os.getpid())  # kept to restart a worker (docs/faults.md)


def test_killed_block_worker_is_replaced_and_the_guest_keeps_running(looping_vm):
    vm, console = looping_vm
    console.wait_for("tick 1\n")
    victim = block_workers(vm)["data"]

    os.kill(int(victim["pid"]), 9)  # type: ignore[call-overload]

    assert wait_until(lambda: block_workers(vm)["data"]["pid"] != victim["pid"] and block_workers(vm)["data"]["alive"])
    ticks = console.text.count("tick")
    console.wait_for(f"tick {ticks + 1}\n")
    new = block_workers(vm)["data"]
    assert new["restarts"] == 1 and new["last_restart_cause"] == "killed by signal SIGKILL"
    assert block_workers(vm)["rootfs"]["alive"] is True
    metrics = vm.metrics()
    assert metrics["block_data"]["worker_alive"] == 1 and metrics["block_data"]["worker_restarts"] == 1
    assert metrics["embervm_workers"]["restarts_signal"] == 1 and metrics["embervm_workers"]["dead"] == 0
    assert vm.state == "Running"
    vm.update_drive("data", rate_limiter={"bandwidth": {"size": 1000, "refill_time": 100}})  # the new worker answers


def test_guest_survives_a_drive_whose_worker_dies_mid_run_without_restarts(launcher, guest_images, disks):
    console = ConsoleCapture()
    spec = VmSpec(
        kernel_image_path=str(guest_images.elf),
        boot_args="test=blk blk.loops=1000 blk.timeout_ms=300",
        mem_size_mib=MEM_MIB,
        drives=two_drives(disks),
        restart_policy={"max_restarts": 0},  # the first death exhausts it: DEVICE_NEEDS_RESET
    )
    vm = launcher.start_vm(spec, console, lambda code, reason: None)
    console.wait_for("blk0: loop 2 ok")

    os.kill(int(block_workers(vm)["rootfs"]["pid"]), 9)  # type: ignore[call-overload]

    assert vm.wait(timeout=60) == exitcodes.OK
    assert "blk0: FAIL" in console.text
    assert "blk1: read ok" in console.text and "blk: done" in console.text
    assert block_workers(vm)["rootfs"]["broken"] is True


def test_update_drive_swaps_the_backing_file_and_the_rate_limiter(looping_vm, tmp_path):
    vm, _ = looping_vm
    new_disk = make_disk(tmp_path / "new.img")

    vm.update_drive("rootfs", path_on_host=str(new_disk))
    vm.update_drive("rootfs", rate_limiter={"ops": {"size": 100, "refill_time": 1000}})

    assert vm.metrics()["block_rootfs"]["update_count"] == 2
    assert str(new_disk) in fd_targets(block_workers(vm)["rootfs"]["pid"])
    assert next(d for d in vm.spec.drives if d.drive_id == "rootfs").path_on_host == str(new_disk)


def test_update_of_an_unknown_drive_or_a_missing_file_is_refused(looping_vm, tmp_path):
    vm, _ = looping_vm

    with pytest.raises(DeviceUpdateError, match="no drive"):
        vm.update_drive("nope", path_on_host=str(tmp_path / "x"))
    with pytest.raises(DeviceUpdateError, match="cannot open"):
        vm.update_drive("rootfs", path_on_host=str(tmp_path / "missing.img"))


def test_missing_backing_file_refuses_to_start(launcher, guest_images, tmp_path):
    drives = [DriveSpec("rootfs", str(tmp_path / "missing.img"), is_root_device=True)]

    with pytest.raises(VmStartError, match=r"drive rootfs: cannot open the backing file .*missing\.img"):
        start(launcher, guest_images, "test=boot", drives)


def test_block_worker_that_cannot_start_fails_the_start_and_leaves_no_worker(launcher, guest_images, disks):
    rootfs, _ = disks
    bad = {"bandwidth": {"size": -1, "refill_time": 100}, "ops": None}
    drives = [DriveSpec("rootfs", str(rootfs), is_root_device=True, rate_limiter=bad)]
    before = zygote_children(launcher)

    with pytest.raises(VmStartError, match="block_rootfs worker cannot start"):
        start(launcher, guest_images, "test=boot", drives)
    assert zygote_children(launcher) <= before


def test_a_worker_failing_while_the_others_start_fails_the_start_and_leaves_nothing(launcher, guest_images, disks):
    # The workers start concurrently (controlplane/worker_start.py): the second drive's worker
    # fails while the first drive's and the vCPU worker are starting; all of them go, and
    # every fd the start made is closed.
    rootfs, data = disks
    bad = {"bandwidth": {"size": -1, "refill_time": 100}, "ops": None}
    drives = [
        DriveSpec("rootfs", str(rootfs), is_root_device=True),
        DriveSpec("data", str(data), rate_limiter=bad),
    ]
    before, fds = zygote_children(launcher), set(os.listdir("/proc/self/fd"))

    with pytest.raises(VmStartError, match="block_data worker cannot start"):
        start(launcher, guest_images, "test=boot", drives)

    assert zygote_children(launcher) <= before
    assert set(os.listdir("/proc/self/fd")) <= fds


def test_every_worker_of_a_running_vm_has_its_memory_ceiling(looping_vm) -> None:
    """RLIMIT_AS (shared.memlimit): guest memory + headroom, per worker, set by the worker."""
    vm, _ = looping_vm
    expected = {"vcpu": MEM_MIB * MiB + vcpu_headroom(1), "block": MEM_MIB * MiB + DEVICE_HEADROOM}
    with open(f"/proc/{vm.launcher.zygote.pid}/status") as f:  # what every worker inherits, at most
        zygote_size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    seen = set()
    for worker in vm.workers():
        with open(f"/proc/{worker['pid']}/limits") as f:
            fields = next(line for line in f if line.startswith("Max address space")).split()
        inherited = int(fields[4]) - expected[str(worker["kind"])]
        assert int(fields[3]) == int(fields[4]) and 0 < inherited <= zygote_size + 64 * MiB, worker
        seen.add(worker["kind"])
    assert seen == {"vcpu", "block"}
