"""Interrupts reach the test guest: UART THRE on IRQ 4 through the in-kernel IOAPIC and LAPIC,
and the LAPIC timer, with handlers that return without iretq (kvm_pvm cannot run it)."""

from __future__ import annotations

import re

from controlplane.launcher import Launcher
from controlplane.vm_spec import VmSpec
from guest.build import GuestImages
from shared import exitcodes
from tests.support.console import ConsoleCapture


def boot(launcher: Launcher, guest_images: GuestImages, args: str, **spec: object) -> tuple[int | None, str]:
    console = ConsoleCapture()
    vm = launcher.start_vm(
        VmSpec(kernel_image_path=str(guest_images.elf), boot_args=args, mem_size_mib=64, **spec),  # type: ignore[arg-type]
        console,
        lambda code, reason: None,
    )
    return vm.wait(timeout=30), console.text


def test_serial_thre_interrupts_are_delivered_and_counted(launcher, guest_images: GuestImages):
    code, out = boot(launcher, guest_images, "test=irq")

    assert code == exitcodes.OK, out
    assert "FAIL" not in out
    m = re.search(r"^irq: serial interrupts (\d+)$", out, re.M)
    assert m, out
    # One when THRE is enabled, then one per byte of the line printed with THRE enabled.
    assert int(m.group(1)) >= 2
    assert "irq: timer ok" in out


def test_interrupts_work_with_two_vcpus(launcher, guest_images: GuestImages):
    code, out = boot(launcher, guest_images, "test=irq", vcpu_count=2)

    assert code == exitcodes.OK, out
    assert re.search(r"^irq: serial interrupts [1-9]\d*$", out, re.M), out
