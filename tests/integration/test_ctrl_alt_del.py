"""SendCtrlAltDel reaches the guest as i8042 scancodes on IRQ 1 (as Firecracker sends them)."""

from __future__ import annotations

from controlplane.vm_spec import VmSpec
from shared import exitcodes
from tests.support.console import ConsoleCapture
from vcpu_worker.i8042 import CTRL_ALT_DEL


def test_ctrl_alt_del_is_delivered_as_scancodes_with_an_interrupt(launcher, guest_images):
    console = ConsoleCapture()
    vm = launcher.start_vm(
        VmSpec(kernel_image_path=str(guest_images.elf), boot_args="test=kbd", mem_size_mib=64),
        console,
        lambda code, reason: None,
    )
    console.wait_for("kbd: waiting")

    vm.send_ctrl_alt_del()

    assert vm.wait(timeout=30) == exitcodes.OK
    expected = " ".join(f"{b:02x}" for b in CTRL_ALT_DEL)
    assert f"kbd: scancodes {expected}\n" in console.text
