"""The balloon and entropy devices end to end with the test guest (test=balloon, test=rng):
the vCPU worker's MMIO forwarding, the workers, the supervisor's PATCH path and its memory
figures, and a balloon worker restart under the running guest."""

from __future__ import annotations

import os
import re
import signal
import time

from controlplane.launcher import Launcher
from controlplane.microvm import MicroVm
from controlplane.vm_spec import VmSpec
from guest.build import GuestImages
from shared import exitcodes
from shared.layout import MiB
from tests.support.console import ConsoleCapture

MEM_MIB = 64
TARGET_MIB = 16
TARGET_PAGES = TARGET_MIB * 256


def start(launcher: Launcher, guest: GuestImages, test: str, **devices: object) -> tuple[MicroVm, ConsoleCapture]:
    console = ConsoleCapture()
    spec = VmSpec(kernel_image_path=str(guest.elf), boot_args=f"test={test}", mem_size_mib=MEM_MIB, **devices)  # type: ignore[arg-type]
    return launcher.start_vm(spec, console, lambda code, reason: None), console


def resident(vm: MicroVm) -> int:
    return vm.metrics()["embervm_memory"]["guest_memory_resident_bytes"]


def wait_actual(vm: MicroVm, pages: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while vm.balloon_report().actual_pages != pages:
        assert time.monotonic() < deadline, vm.balloon_report()
        time.sleep(0.05)


def balloon(stats: int = 1) -> dict[str, object]:
    return {"amount_mib": TARGET_MIB, "deflate_on_oom": True, "stats_polling_interval_s": stats}


def test_inflate_gives_memory_back_and_deflated_pages_are_zeros(launcher, guest_images: GuestImages) -> None:
    vm, console = start(launcher, guest_images, "balloon", balloon=balloon())
    try:
        console.wait_for(f"balloon: target {TARGET_PAGES}", timeout=30)
        console.wait_for(f"balloon: inflated {TARGET_PAGES}", timeout=60)
        wait_actual(vm, TARGET_PAGES)
        after_inflate = resident(vm)
        assert after_inflate <= MEM_MIB * MiB - TARGET_MIB * MiB, (
            after_inflate
        )  # 16 MiB of 64 were touched, then given back
        metrics = vm.metrics()["balloon"]
        assert metrics["inflated_pages"] == TARGET_PAGES and metrics["released_bytes"] == TARGET_MIB * MiB
        assert metrics["invalid_pfns"] == 0
        time.sleep(2.5)  # two polling intervals: the guest answered the stats requests
        stats_updates = vm.metrics()["balloon"]["stats_updates_count"]
        assert stats_updates >= 2, stats_updates

        vm.update_balloon(0)  # PATCH /balloon
        text = console.wait_for("balloon: done", timeout=60)
        assert f"balloon: new target 0 actual {TARGET_PAGES}" in text
        assert "balloon: zeros ok" in text and f"balloon: reuse ok {TARGET_PAGES}" in text
        assert vm.wait(timeout=30) == exitcodes.OK
    finally:
        vm.stop()


def test_balloon_worker_restart_keeps_target_and_actual(launcher, guest_images: GuestImages) -> None:
    vm, console = start(launcher, guest_images, "balloon", balloon=balloon())
    try:
        console.wait_for(f"balloon: inflated {TARGET_PAGES}", timeout=60)
        wait_actual(vm, TARGET_PAGES)
        old = next(w for w in vm.workers() if w["name"] == "balloon")
        os.kill(int(old["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
        deadline = time.monotonic() + 30
        while True:
            new = next(w for w in vm.workers() if w["name"] == "balloon")
            if new["pid"] != old["pid"] and new["alive"]:
                break
            assert time.monotonic() < deadline, vm.workers()
            time.sleep(0.05)
        assert vm.balloon_report().actual_pages == TARGET_PAGES
        vm.update_balloon(0)  # the replacement is active at once: it restored the device
        text = console.wait_for("balloon: done", timeout=60)
        assert f"balloon: new target 0 actual {TARGET_PAGES}" in text  # actual survived, read by the guest
        assert re.search(r"balloon: zeros ok", text)
        worker = next(w for w in vm.workers() if w["name"] == "balloon")
        assert worker["restarts"] == 1 and not worker["broken"], worker
        assert vm.wait(timeout=30) == exitcodes.OK
    finally:
        vm.stop()


def test_guest_reads_random_bytes_from_the_entropy_device(launcher, guest_images: GuestImages) -> None:
    vm, console = start(launcher, guest_images, "rng", entropy={"rate_limiter": None})
    try:
        console.wait_for("rng: ok 1024 bytes", timeout=30)
        assert vm.wait(timeout=30) == exitcodes.OK
        assert vm.metrics()["entropy"]["entropy_bytes"] == 1024
    finally:
        vm.stop()
