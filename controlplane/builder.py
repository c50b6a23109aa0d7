"""The one place that lays out a microVM from a `VmSpec`: guest memory and its devices.

It creates the sealed memfd, loads kernel + initrd + command line, and writes the
boot structures (zero page, page tables, GDT, MP table, ACPI tables). What it returns
is everything the vCPU worker needs, as msgpack-friendly values plus the memfd.

Devices (`plan_block_devices`): each drive gets a virtio-mmio window in Firecracker's
order (the root device first, then the others as configured), its backing file opened
here (workers open no host paths), one eventfd per queue and an irqfd. The windows go
into the ACPI DSDT and onto the command line (`virtio_mmio.device=4K@<base>:<gsi>`),
and the root device adds `root=` and `ro`/`rw`, as Firecracker does.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane.vm_spec import DriveSpec, VmSpec
from shared import layout
from shared.boot.acpi import write_acpi_tables
from shared.boot.cmdline import Cmdline
from shared.boot.cpu_state import boot_msrs
from shared.boot.errors import BootError
from shared.boot.loader import load_boot
from shared.boot.mptable import write_mptable
from shared.memory import GuestMemory, create_guest_memfd

BLOCK_QUEUES = 1


@dataclass
class BlockDevicePlan:
    """One drive's window and the fds its worker and the vCPU worker share; `close()` frees them."""

    drive: DriveSpec
    base: int
    gsi: int
    backing_fd: int
    queue_fds: list[int] = field(default_factory=list)
    irqfd: int = -1

    @property
    def name(self) -> str:
        return f"block_{self.drive.drive_id}"

    def close(self) -> None:
        for fd in (self.backing_fd, *self.queue_fds, self.irqfd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.backing_fd, self.queue_fds, self.irqfd = -1, [], -1


def open_backing_file(drive: DriveSpec, path: str | None = None) -> int:
    """The drive's backing file, read-write unless the drive is read-only."""
    path = path or drive.path_on_host
    flags = (os.O_RDONLY if drive.is_read_only else os.O_RDWR) | os.O_CLOEXEC
    try:
        return os.open(path, flags)
    except OSError as e:
        raise BootError(f"drive {drive.drive_id}: cannot open the backing file {path}: {e.strerror}") from None


def _new_eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def plan_block_devices(spec: VmSpec) -> list[BlockDevicePlan]:
    """Open each drive's backing file and create its eventfds; the caller closes the plans."""
    drives = sorted(spec.drives, key=lambda d: not d.is_root_device)  # stable: root first
    plans: list[BlockDevicePlan] = []
    try:
        for index, drive in enumerate(drives):
            base, gsi = layout.virtio_mmio_window(index)
            plan = BlockDevicePlan(drive, base, gsi, open_backing_file(drive))
            plans.append(plan)
            plan.queue_fds = [_new_eventfd() for _ in range(BLOCK_QUEUES)]
            plan.irqfd = _new_eventfd()
    except BaseException:
        for plan in plans:
            plan.close()
        raise
    return plans


def kernel_cmdline(spec: VmSpec, devices: list[BlockDevicePlan]) -> str:
    """The boot args plus what the devices need the kernel to know."""
    cmdline = Cmdline.from_str(spec.effective_boot_args)
    for device in devices:
        if device.drive.is_root_device:
            partuuid = device.drive.partuuid
            cmdline.insert("root", f"PARTUUID={partuuid}" if partuuid else "/dev/vda")
            cmdline.insert_str("ro" if device.drive.is_read_only else "rw")
    for device in devices:
        cmdline.add_virtio_mmio_device(layout.VIRTIO_MMIO_SIZE, device.base, device.gsi)
    return str(cmdline)


@dataclass
class GuestPlan:
    memfd: int
    vcpu_args: dict[str, Any]
    cmdline: str


def validate_spec(spec: VmSpec) -> None:
    """Reject a spec the boot path cannot honour, with a message fit for an API client."""
    if not 1 <= spec.vcpu_count <= layout.MAX_VCPUS:
        raise BootError(f"vcpu_count must be between 1 and {layout.MAX_VCPUS}, got {spec.vcpu_count}")
    if spec.mem_size < layout.MIN_MEM_SIZE:
        raise BootError(f"mem_size_mib must be at least {layout.MIN_MEM_SIZE >> 20}, got {spec.mem_size_mib}")
    for what, path in (("kernel image", spec.kernel_image_path), ("initrd", spec.initrd_path)):
        if path is not None and not Path(path).is_file():
            raise BootError(f"{what} {path} does not exist or is not a file")


def build_guest(spec: VmSpec, devices: list[BlockDevicePlan] | None = None) -> GuestPlan:
    """Create and fill guest memory for `spec` with `devices`; the caller owns the returned memfd."""
    validate_spec(spec)
    devices = devices or []
    cmdline = kernel_cmdline(spec, devices)
    memfd = create_guest_memfd(spec.mem_size, f"embervm-{spec.vm_id}-mem")
    try:
        mem = GuestMemory.map(memfd, spec.mem_size)
        try:
            write_mptable(mem, spec.vcpu_count)
            rsdp = write_acpi_tables(mem, spec.vcpu_count, [(d.base, d.gsi) for d in devices])
            boot = load_boot(
                mem,
                Path(spec.kernel_image_path),
                cmdline,
                Path(spec.initrd_path) if spec.initrd_path else None,
                spec.mem_size,
                acpi_rsdp=rsdp,
            )
        finally:
            mem.close()
    except BaseException:
        os.close(memfd)
        raise
    vcpu_args = {
        "mem_size": spec.mem_size,
        "vcpu_count": spec.vcpu_count,
        "smt": spec.smt,
        "cpu_state": boot.cpu_state.to_dict(),
        "msrs": [list(m) for m in boot_msrs()],
        "cpu_template": spec.cpu_config or {},
        "cpuid_clear": [list(c) for c in spec.cpuid_clear],
    }
    return GuestPlan(memfd, vcpu_args, cmdline)
