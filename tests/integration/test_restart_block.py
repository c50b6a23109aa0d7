"""Fault containment with virtio-blk (docs/faults.md): the test guest writes and verifies a
long run of sectors (`test=blk blk.loops=N`) while its block worker is killed, crashed
through the fault API, or hung; the supervisor replaces it under the running guest.

Each loop writes its own 8 sectors once (the disk has one slot per loop), so a write that
was acknowledged and then lost in a crash shows in the file afterwards, and a request
that failed shows on the guest's console as `FAIL`.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from controlplane.faults import FaultSpec
from controlplane.launcher import Launcher
from controlplane.microvm import MicroVm
from controlplane.vm_spec import DriveSpec, VmSpec
from guest.build import GuestImages
from shared import exitcodes
from tests.support.console import ConsoleCapture
from tests.support.waiting import wait_until

MEM_MIB = 64
SECTOR = 512
LOOPS = 120  # long enough that the guest is still writing when the test kills for the last time
SECTORS = 16 + 8 * LOOPS  # one 8-sector slot per loop


def host_pattern(sector: int) -> bytes:
    return bytes((sector * 7 + i) & 0xFF for i in range(SECTOR))


def guest_pattern(sector: int) -> bytes:
    return bytes((sector * 13 + i + 1) & 0xFF for i in range(SECTOR))


def make_disk(path: Path, sectors: int = SECTORS) -> Path:
    path.write_bytes(b"".join(host_pattern(s) for s in range(sectors)))
    return path


def start(
    launcher: Launcher, guest: GuestImages, args: str, drives: list[DriveSpec], **spec: object
) -> tuple[MicroVm, ConsoleCapture]:
    console = ConsoleCapture()
    vm_spec = VmSpec(
        kernel_image_path=str(guest.elf),
        boot_args=args,
        mem_size_mib=MEM_MIB,
        drives=drives,
        enable_fault_injection=True,
        **spec,  # type: ignore[arg-type]
    )
    return launcher.start_vm(vm_spec, console, lambda code, reason: None), console


def worker(vm: MicroVm, name: str) -> dict[str, object]:
    (info,) = [w for w in vm.workers() if w["name"] == name]
    return info


def wait_replaced(vm: MicroVm, name: str, old_pid: object, timeout: float = 10.0) -> dict[str, object]:
    assert wait_until(lambda: worker(vm, name)["pid"] != old_pid and worker(vm, name)["alive"], timeout), worker(
        vm, name
    )
    return worker(vm, name)


def assert_disk_written_by_the_guest(path: Path, loops: int) -> None:
    data = path.read_bytes()
    assert data[: 16 * SECTOR] == b"".join(host_pattern(s) for s in range(16))  # never written
    for s in range(16, 16 + 8 * loops):
        assert data[s * SECTOR : (s + 1) * SECTOR] == guest_pattern(s), f"sector {s} lost its write"


def loop_line(k: int) -> str:
    return f"blk0: loop {k} ok\n"


@pytest.mark.parametrize("options", ["", "blk.irq=1 blk.event_idx=1 blk.indirect=1"], ids=["polled", "irq"])
@pytest.mark.parametrize("cache", ["Unsafe", "Writeback"])
def test_guest_writes_and_verifies_through_repeated_sigkills(launcher, guest_images, tmp_path, options, cache):
    disk = make_disk(tmp_path / "rootfs.img")
    drives = [DriveSpec("rootfs", str(disk), is_root_device=True, cache_type=cache)]
    vm, console = start(launcher, guest_images, f"test=blk blk.loops={LOOPS} {options}", drives)

    for k in (5, 30, 55):
        console.wait_for(loop_line(k), timeout=30)
        victim = worker(vm, "block_rootfs")["pid"]
        os.kill(int(victim), signal.SIGKILL)  # type: ignore[call-overload]
        wait_replaced(vm, "block_rootfs", victim)

    assert vm.wait(timeout=60) == exitcodes.OK
    assert "FAIL" not in console.text, console.text
    assert "blk0: write ok" in console.text and "blk: done" in console.text
    assert_disk_written_by_the_guest(disk, LOOPS)
    info = worker(vm, "block_rootfs")
    assert (info["restarts"], info["last_restart_cause"]) == (3, "killed by signal SIGKILL")
    metrics = vm.metrics()
    assert metrics["embervm_workers"]["restarts_signal"] == 3
    assert metrics["block_rootfs"]["worker_restarts"] == 3
    # counters carry over: more writes than the last worker alone can have done (after loop 55)
    assert metrics["block_rootfs"]["write_count"] > LOOPS - 55 + 1


def test_crashes_injected_through_the_fault_api_mid_request_are_invisible_to_the_guest(
    launcher, guest_images, tmp_path
):
    disk = make_disk(tmp_path / "rootfs.img")
    drives = [DriveSpec("rootfs", str(disk), is_root_device=True, cache_type="Writeback")]
    vm, console = start(launcher, guest_images, f"test=blk blk.loops={LOOPS}", drives)
    console.wait_for(loop_line(2), timeout=30)

    # every 25th request: the write (or read) is executed, then the worker dies before completing it
    vm.inject_fault("rootfs", FaultSpec(kind="crash", after_requests=25, count=3))

    assert vm.wait(timeout=60) == exitcodes.OK
    assert "FAIL" not in console.text, console.text
    assert_disk_written_by_the_guest(disk, LOOPS)
    info = worker(vm, "block_rootfs")
    assert info["restarts"] == 3 and str(info["last_restart_cause"]).startswith("injected crash")
    assert vm.metrics()["embervm_workers"]["restarts_fault"] == 3
    assert vm.faults() == []  # count used up


def test_crashes_after_a_completion_before_its_interrupt_lose_no_interrupt_and_run_nothing_twice(
    launcher, guest_images, tmp_path
):
    """The other crash edge: the used-ring entry is published, then the worker dies before
    the interrupt. The guest waits for interrupts (blk.irq=1), so a lost one would stall it;
    the replacement raises one after its restore (docs/faults.md, "Exactly once")."""
    disk = make_disk(tmp_path / "rootfs.img")
    drives = [DriveSpec("rootfs", str(disk), is_root_device=True)]
    vm, console = start(launcher, guest_images, f"test=blk blk.loops={LOOPS} blk.irq=1", drives)
    console.wait_for(loop_line(2), timeout=30)

    vm.inject_fault("rootfs", FaultSpec(kind="crash_completed", after_requests=25, count=3))

    assert vm.wait(timeout=60) == exitcodes.OK
    assert "FAIL" not in console.text, console.text
    assert_disk_written_by_the_guest(disk, LOOPS)
    info = worker(vm, "block_rootfs")
    assert info["restarts"] == 3 and str(info["last_restart_cause"]).startswith("injected crash")


def test_a_hung_worker_is_detected_by_its_heartbeat_and_replaced_in_bounded_time(launcher, guest_images, tmp_path):
    disk = make_disk(tmp_path / "rootfs.img")
    drives = [DriveSpec("rootfs", str(disk), is_root_device=True)]
    hang_timeout = 1.0
    vm, console = start(
        launcher,
        guest_images,
        f"test=blk blk.loops={LOOPS}",
        drives,
        restart_policy={"hang_timeout_s": hang_timeout},
    )
    console.wait_for(loop_line(3), timeout=30)
    victim = worker(vm, "block_rootfs")["pid"]

    begin = time.monotonic()
    vm.inject_fault("rootfs", FaultSpec(kind="hang"))
    wait_replaced(vm, "block_rootfs", victim, timeout=hang_timeout + 5)
    elapsed = time.monotonic() - begin

    assert elapsed < hang_timeout + 3, elapsed
    assert vm.wait(timeout=60) == exitcodes.OK
    assert "FAIL" not in console.text, console.text
    assert_disk_written_by_the_guest(disk, LOOPS)
    info = worker(vm, "block_rootfs")
    assert info["last_restart_cause"] == f"hung: no heartbeat for {hang_timeout:g} s (injected hang)"
    assert vm.metrics()["embervm_workers"]["restarts_hang"] == 1


def test_io_error_and_delay_faults_reach_the_guest_as_such(launcher, guest_images, tmp_path):
    disk = make_disk(tmp_path / "rootfs.img")
    drives = [DriveSpec("rootfs", str(disk), is_root_device=True)]
    vm, console = start(launcher, guest_images, "test=blk blk.loops=1000", drives)
    console.wait_for(loop_line(2), timeout=30)

    vm.inject_fault("rootfs", FaultSpec(kind="io_error", after_requests=2))

    assert vm.wait(timeout=60) == exitcodes.OK
    assert re.search(r"blk0: FAIL (write|flush|read back): status 1, expected 0", console.text), console.text
    assert vm.metrics()["block_rootfs"]["faults_injected"] == 1
    assert worker(vm, "block_rootfs")["restarts"] == 0


def test_exhausted_restart_policy_sets_needs_reset_and_the_guest_and_other_drive_carry_on(
    launcher, guest_images, tmp_path
):
    rootfs, data = make_disk(tmp_path / "rootfs.img"), make_disk(tmp_path / "data.img", 64)
    drives = [
        DriveSpec("rootfs", str(rootfs), is_root_device=True),
        DriveSpec("data", str(data), is_read_only=True),
    ]
    policy = {"backoff_initial_s": 0.01, "rootfs": {"max_restarts": 2, "window_s": 60}}  # for rootfs only
    vm, console = start(
        launcher, guest_images, "test=blk blk.loops=100000 blk.timeout_ms=1500", drives, restart_policy=policy
    )

    for k in (2, 6):  # two restarts are allowed ...
        console.wait_for(loop_line(k), timeout=30)
        victim = worker(vm, "block_rootfs")["pid"]
        os.kill(int(victim), signal.SIGKILL)  # type: ignore[call-overload]
        wait_replaced(vm, "block_rootfs", victim)
    console.wait_for(loop_line(10), timeout=30)
    victim = worker(vm, "block_rootfs")["pid"]
    os.kill(int(victim), signal.SIGKILL)  # type: ignore[call-overload]  # ... the third is one too many

    assert vm.wait(timeout=60) == exitcodes.OK  # the guest gave up on blk0, tested blk1 and powered off
    text = console.text
    assert "blk0: FAIL" in text and "blk1: read ok" in text and "blk1: write rejected ok" in text, text
    status = re.search(r"virtio: 0xd0000000 queue 0 timeout: .* status 0x([0-9a-f]+) isr 0x([0-9a-f]+)", text)
    assert status is not None, text
    assert int(status.group(1), 16) & 0x40  # DEVICE_NEEDS_RESET, as the guest read it
    assert int(status.group(2), 16) & 0x2  # with a configuration-change interrupt
    info = worker(vm, "block_rootfs")
    assert info["broken"] is True and info["restarts"] == 3
    assert worker(vm, "block_data")["restarts"] == 0
    metrics = vm.metrics()
    assert metrics["block_rootfs"]["worker_broken"] == 1 and metrics["embervm_workers"]["broken"] == 1


def test_a_replacement_worker_gets_the_patched_disk_and_rate_limiter(launcher, guest_images, tmp_path):
    first, second = make_disk(tmp_path / "first.img", 64), make_disk(tmp_path / "second.img", 64)
    vm, console = start(launcher, guest_images, "test=loop ticks_every=20000", [DriveSpec("rootfs", str(first))])
    console.wait_for("tick 1\n")
    vm.update_drive("rootfs", path_on_host=str(second), rate_limiter={"ops": {"size": 100, "refill_time": 1000}})
    victim = worker(vm, "block_rootfs")["pid"]

    os.kill(int(victim), signal.SIGKILL)  # type: ignore[call-overload]
    new = wait_replaced(vm, "block_rootfs", victim)

    targets = {os.readlink(f"/proc/{new['pid']}/fd/{fd}") for fd in os.listdir(f"/proc/{new['pid']}/fd")}
    assert str(second) in targets and str(first) not in targets
    assert vm._sup.slots["block_rootfs"].plan.args["rate_limiter"] == {"ops": {"size": 100, "refill_time": 1000}}
    vm.stop()


def test_delay_faults_slow_requests_down_without_failing_them(launcher, guest_images, tmp_path):
    disk = make_disk(tmp_path / "rootfs.img")
    vm, console = start(launcher, guest_images, "test=blk blk.loops=12", [DriveSpec("rootfs", str(disk))])
    console.wait_for(loop_line(1), timeout=30)

    vm.inject_fault("rootfs", FaultSpec(kind="delay", delay_ms=100, count=5))
    begin = time.monotonic()

    assert vm.wait(timeout=60) == exitcodes.OK
    assert time.monotonic() - begin >= 0.5  # five requests, 100 ms each
    assert "FAIL" not in console.text and "blk0: write ok" in console.text, console.text
    assert vm.metrics()["block_rootfs"]["faults_injected"] == 5
    assert vm.faults() == [] and worker(vm, "block_rootfs")["restarts"] == 0


def test_dropped_request_is_never_completed_and_the_guest_times_out(launcher, guest_images, tmp_path):
    disk = make_disk(tmp_path / "rootfs.img")
    args = "test=blk blk.loops=1000 blk.timeout_ms=500"
    vm, console = start(launcher, guest_images, args, [DriveSpec("rootfs", str(disk))])
    console.wait_for(loop_line(1), timeout=30)

    vm.inject_fault("rootfs", FaultSpec(kind="drop"))

    assert vm.wait(timeout=60) == exitcodes.OK
    assert "timeout waiting for the request to complete" in console.text, console.text
    assert worker(vm, "block_rootfs")["restarts"] == 0
