"""The test guest boots through supervisor → zygote → vCPU worker, on this host's KVM."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest

from controlplane.launcher import Launcher
from controlplane.microvm import MicroVm, VmStartError
from controlplane.vm_spec import VmSpec
from guest.build import GuestImages
from shared import exitcodes, layout
from tests.support.console import ConsoleCapture
from tests.support.waiting import wait_until

MEM_MIB = 64


def start(launcher: Launcher, kernel: Path, args: str, **spec: object) -> tuple[MicroVm, ConsoleCapture]:
    console = ConsoleCapture()
    vm = launcher.start_vm(
        VmSpec(kernel_image_path=str(kernel), boot_args=args, mem_size_mib=MEM_MIB, **spec),  # type: ignore[arg-type]
        console,
        lambda code, reason: None,
    )
    return vm, console


def boot_to_exit(launcher: Launcher, kernel: Path, args: str, **spec: object) -> tuple[MicroVm, str]:
    vm, console = start(launcher, kernel, args, **spec)
    assert vm.wait(timeout=30) is not None, "guest did not exit"
    return vm, console.text


def expected_e820_lines(mem_size: int) -> list[str]:
    names = {layout.E820_RAM: "usable", layout.E820_RESERVED: "reserved"}
    return [
        f"BIOS-e820: [mem 0x{addr:016x}-0x{addr + size - 1:016x}] {names[kind]}"
        for addr, size, kind in layout.e820_map(mem_size)
    ]


def test_guest_prints_exact_cmdline_and_our_e820_map_then_resets(launcher, guest_images: GuestImages):
    vm, out = boot_to_exit(launcher, guest_images.elf, "console=ttyS0 test=boot marker=e820-check")

    assert "cmdline: console=ttyS0 test=boot marker=e820-check\n" in out
    assert [line for line in out.splitlines() if line.startswith("BIOS-e820")] == expected_e820_lines(MEM_MIB << 20)
    assert "embervm-guest: ok" in out
    assert (vm.exit_code, vm.exit_reason) == (exitcodes.OK, "guest requested reset via the i8042")
    assert out.endswith("embervm-guest: ok\n"), "the guest ran on after its reset request"


def test_bzimage_guest_boots_through_the_64bit_entry(launcher, guest_images: GuestImages):
    vm, out = boot_to_exit(launcher, guest_images.bzimage, "test=boot via=bzimage")

    assert "cmdline: test=boot via=bzimage" in out
    assert vm.exit_code == exitcodes.OK


def test_triple_fault_is_reported_with_registers(launcher, guest_images: GuestImages):
    vm, out = boot_to_exit(launcher, guest_images.elf, "test=triple")

    assert "triple-faulting" in out
    assert vm.exit_code == exitcodes.GENERIC_ERROR
    assert "triple-faulted" in (vm.exit_reason or "")
    assert "rip=0x" in vm.exit_detail and "cr3=0x" in vm.exit_detail


def test_unclaimed_port_reads_as_all_ones_and_is_counted(launcher, guest_images: GuestImages):
    vm, console = start(launcher, guest_images.elf, "test=portio")
    assert vm.wait(timeout=30) == exitcodes.OK

    assert "portio: 0xff" in console.text
    assert vm.metrics()["embervm_bus"]["unhandled_pio_reads"] >= 1


def test_serial_input_reaches_the_guest(launcher, guest_images: GuestImages):
    vm, console = start(launcher, guest_images.elf, "test=echo")
    console.wait_for("echo ready")

    vm.send_console_input(b"hello from the host\nquit\n")

    assert vm.wait(timeout=30) == exitcodes.OK
    assert "echo: hello from the host" in console.text


def test_pause_stops_guest_progress_and_resume_continues(launcher, guest_images: GuestImages):
    vm, console = start(launcher, guest_images.elf, "test=loop ticks_every=20000")
    try:
        console.wait_for("tick 2")
        vm.pause()
        paused_output = console.text
        with pytest.raises(AssertionError):
            console.wait_for(f"tick {paused_output.count('tick') + 1}\n", timeout=1.0)
        assert vm.state == "Paused"

        vm.resume()

        console.wait_for(f"tick {paused_output.count('tick') + 2}\n")
        assert vm.state == "Running"
    finally:
        vm.stop()
    assert vm.state == "Exited"


def test_two_vcpus_boot(launcher, guest_images: GuestImages):
    vm, _out = boot_to_exit(launcher, guest_images.elf, "test=boot", vcpu_count=2)

    assert vm.exit_code == exitcodes.OK


def test_vcpu_worker_is_its_own_named_process(launcher, guest_images: GuestImages):
    vm, _console = start(launcher, guest_images.elf, "test=loop")
    try:
        (worker,) = vm.workers()
        pid = int(worker["pid"])  # type: ignore[call-overload]

        assert pid not in (os.getpid(), launcher.zygote.pid)
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "embervm-vcpu"
        targets = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert "/dev/kvm" in targets
        assert any(t.startswith("/memfd:embervm-") for t in targets)
        assert not any(t.startswith("/") and t.endswith((".py", ".log")) for t in targets)
    finally:
        vm.stop()


def test_killed_vcpu_worker_is_reported(launcher, guest_images: GuestImages):
    exits: list[tuple[int, str]] = []
    reported = threading.Event()
    console = ConsoleCapture()
    vm = launcher.start_vm(
        VmSpec(kernel_image_path=str(guest_images.elf), boot_args="test=loop", mem_size_mib=MEM_MIB),
        console,
        lambda code, reason: (exits.append((code, reason)), reported.set()),
    )
    os.kill(int(vm.workers()[0]["pid"]), 9)  # type: ignore[call-overload]

    assert vm.wait(timeout=10) == exitcodes.GENERIC_ERROR
    assert reported.wait(timeout=10)
    assert exits == [(exitcodes.GENERIC_ERROR, "vCPU worker killed by signal SIGKILL")]
    assert vm.workers()[0]["alive"] is False


def test_kernel_that_is_neither_elf_nor_bzimage_is_refused(launcher, tmp_path: Path):
    """Guest memory is written while the workers start: the vCPU worker already asked for is
    stopped when the image turns out not to boot, and none is left."""
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a kernel" * 100)

    with pytest.raises(VmStartError, match="neither an ELF vmlinux nor a bzImage"):
        launcher.start_vm(VmSpec(kernel_image_path=str(junk)), ConsoleCapture(), lambda c, r: None)
    assert wait_until(lambda: not _live_children(launcher.zygote.pid)), _live_children(launcher.zygote.pid)


def _live_children(pid: int) -> list[int]:
    pids = [int(c) for t in Path(f"/proc/{pid}/task").glob("*/children") for c in t.read_text().split()]
    live = []
    for child in pids:
        try:
            if Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                live.append(child)
        except OSError:
            pass
    return live


def test_missing_kernel_file_is_refused(launcher, tmp_path: Path):
    with pytest.raises(VmStartError, match="does not exist"):
        launcher.start_vm(VmSpec(kernel_image_path=str(tmp_path / "nope")), ConsoleCapture(), lambda c, r: None)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("vcpu_count", 0, "vcpu_count"), ("vcpu_count", 33, "vcpu_count"), ("mem_size_mib", 1, "mem_size_mib")],
)
def test_out_of_range_machine_config_is_refused(launcher, guest_images: GuestImages, field, value, message):
    spec = VmSpec(kernel_image_path=str(guest_images.elf), **{field: value})

    with pytest.raises(VmStartError, match=message):
        launcher.start_vm(spec, ConsoleCapture(), lambda c, r: None)


def test_thirty_two_vcpus_boot(launcher, guest_images: GuestImages):
    vm, _out = boot_to_exit(launcher, guest_images.elf, "test=boot", vcpu_count=32)

    assert vm.exit_code == exitcodes.OK


def test_a_cpu_template_with_msr_modifiers_boots(launcher, guest_images: GuestImages):
    low16 = "0b" + "x" * 48 + "0000_0000_0001_0000"  # IA32_SYSENTER_CS: applied and read back by the vCPU worker
    template = {"msr_modifiers": [{"addr": "0x174", "bitmap": low16}], "kvm_capabilities": ["!9999"]}
    vm, _out = boot_to_exit(launcher, guest_images.elf, "test=boot", cpu_config=template)

    assert vm.exit_code == exitcodes.OK


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ({"kvm_capabilities": ["9999"]}, "Missing KVM capabilities: 9999"),
        ({"msr_modifiers": [{"addr": "0x400000ff", "bitmap": "0b" + "0" * 64}]}, "KVM_GET_MSRS read 0 of 1"),
    ],
)
def test_a_cpu_template_kvm_cannot_honour_fails_the_start(launcher, guest_images: GuestImages, template, message):
    spec = VmSpec(kernel_image_path=str(guest_images.elf), mem_size_mib=MEM_MIB, cpu_config=template)

    with pytest.raises(VmStartError, match=message):
        launcher.start_vm(spec, ConsoleCapture(), lambda c, r: None)


def test_boot_timer_logs_the_guest_boot_time(launcher, guest_images: GuestImages, caplog: pytest.LogCaptureFixture):
    caplog.set_level("INFO")
    vm, out = boot_to_exit(launcher, guest_images.elf, "test=boottimer", boot_timer=True)

    assert vm.exit_code == exitcodes.OK and "boot timer signalled" in out
    [line] = [r.getMessage() for r in caplog.records if "Guest-boot-time" in r.getMessage()]
    assert re.search(r"Guest-boot-time = +\d+ us \d+ ms, +\d+ CPU us \d+ CPU ms", line), line


def test_boot_timer_takes_the_first_mmio_window_and_no_interrupt():
    assert layout.virtio_mmio_window(0, boot_timer=True) == (layout.BOOT_TIMER_BASE + layout.VIRTIO_MMIO_SIZE, 5)
    assert layout.virtio_mmio_window(0) == (layout.BOOT_TIMER_BASE, 5)
