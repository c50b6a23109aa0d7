"""Serial input faster than the guest reads it: the vCPU worker holds it back, loses none of it
and keeps the microVM running (it used to die of a TypeError once the receive FIFO was full)."""

from __future__ import annotations

from controlplane.launcher import Launcher
from guest.build import GuestImages
from shared import exitcodes
from tests.integration.test_boot import start
from vcpu_worker.serial import RX_FIFO_SIZE

LINES = 40


def test_input_flood_is_consumed_in_order_and_the_guest_ends_normally(launcher: Launcher, guest_images: GuestImages):
    vm, console = start(launcher, guest_images.elf, "test=echo")
    try:
        console.wait_for("echo ready")
        lines = [f"flood line {i:03d} " + "x" * 20 for i in range(LINES)]
        flood = "".join(line + "\n" for line in lines).encode() + b"quit\n"
        assert len(flood) > 10 * RX_FIFO_SIZE, "more than the receive FIFO holds, in one go"

        vm.send_console_input(flood)

        assert vm.wait(timeout=60) == exitcodes.OK, f"the microVM did not end normally: {vm.exit_reason}"
        assert vm.exit_reason == "guest requested reset via the i8042"
        echoed = [line.removeprefix("echo: ") for line in console.text.splitlines() if line.startswith("echo: ")]
        assert echoed == lines, "every byte reached the guest, in order"
    finally:
        vm.stop()


def test_input_to_a_guest_that_never_reads_is_held_back_and_the_guest_keeps_running(
    launcher: Launcher, guest_images: GuestImages
):
    vm, console = start(launcher, guest_images.elf, "test=loop ticks_every=20000")
    try:
        console.wait_for("tick 1")
        vm.send_console_input(b"z" * (8 * RX_FIFO_SIZE))
        ticks = console.text.count("tick ")

        console.wait_for(f"tick {ticks + 2}\n", timeout=30)

        assert vm.state == "Running", vm.exit_reason
        assert vm.metrics()["uart"]["read_count"] == 0
    finally:
        vm.stop()
    assert (vm.exit_code, vm.exit_reason) == (exitcodes.OK, "stopped by the supervisor")
