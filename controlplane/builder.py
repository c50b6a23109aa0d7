"""The one place that lays out a microVM's guest memory from a `VmSpec`.

It creates the sealed memfd, loads kernel + initrd + command line, and writes the
boot structures (zero page, page tables, GDT, MP table, ACPI tables). What it returns
is everything the vCPU worker needs, as msgpack-friendly values plus the memfd.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane.vm_spec import VmSpec
from shared import layout
from shared.boot.acpi import write_acpi_tables
from shared.boot.cpu_state import boot_msrs
from shared.boot.errors import BootError
from shared.boot.loader import load_boot
from shared.boot.mptable import write_mptable
from shared.memory import GuestMemory, create_guest_memfd


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


def build_guest(spec: VmSpec, virtio_devices: list[tuple[int, int]] | None = None) -> GuestPlan:
    """Create and fill guest memory for `spec`; the caller owns the returned memfd."""
    validate_spec(spec)
    devices = virtio_devices or []
    memfd = create_guest_memfd(spec.mem_size, f"embervm-{spec.vm_id}-mem")
    try:
        mem = GuestMemory.map(memfd, spec.mem_size)
        try:
            write_mptable(mem, spec.vcpu_count)
            rsdp = write_acpi_tables(mem, spec.vcpu_count, devices)
            boot = load_boot(
                mem,
                Path(spec.kernel_image_path),
                spec.effective_boot_args,
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
    return GuestPlan(memfd, vcpu_args, spec.effective_boot_args)
