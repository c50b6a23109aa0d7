"""Put a Linux kernel, its initrd and command line into guest memory, ready to run.

The supervisor calls `load_boot` once, before any vCPU starts; the vCPU worker then
applies `BootInfo.cpu_state`. What goes where (see shared/layout.py):

    BOOT_GDT_START   GDT (null, TSS, __BOOT_CS 0x10, __BOOT_DS 0x18), IDT after it
    ZERO_PAGE_START  boot_params: setup header, cmdline/initrd pointers, e820 map
    PML4_START..     identity page tables for the first 4 GiB
    CMDLINE_START    the NUL-terminated command line
    kernel           an ELF vmlinux at its segments' p_paddr, or a bzImage's
                     protected-mode part at HIMEM_START (1 MiB)
    initrd           as high in low RAM as the kernel accepts, page aligned

The MP table (EBDA) and ACPI tables (from RSDP_START) are written by other code;
pass the RSDP's guest address as `acpi_rsdp` so the zero page points the kernel at it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from shared.boot.bootparams import build_zero_page, write_zero_page
from shared.boot.bzimage import is_bzimage, load_bzimage
from shared.boot.cmdline import Cmdline
from shared.boot.cpu_state import BootCpuState, boot_cpu_state, write_boot_structures
from shared.boot.elf import is_elf, load_elf
from shared.boot.errors import BootError
from shared.boot.initrd import load_initrd
from shared.boot.kernel import LoadedKernel, mib
from shared.layout import CMDLINE_MAX_SIZE, CMDLINE_START, MIN_MEM_SIZE, ZERO_PAGE_START, e820_map
from shared.memory import GuestMemory

KernelKind = Literal["elf", "bzimage"]


@dataclass(frozen=True)
class BootInfo:
    """Where everything landed, and the CPU state to enter the kernel with."""

    kind: KernelKind
    entry: int
    zero_page: int
    kernel: tuple[int, int]  # [start, end): every byte the kernel claims
    initrd: tuple[int, int] | None  # (guest address, size)
    cmdline: tuple[int, int]  # (guest address, size with the NUL)
    cpu_state: BootCpuState

    def to_dict(self) -> dict[str, Any]:
        """Plain data for msgpack (tuples become lists on the wire)."""
        return {
            "kind": self.kind,
            "entry": self.entry,
            "zero_page": self.zero_page,
            "kernel": list(self.kernel),
            "initrd": list(self.initrd) if self.initrd else None,
            "cmdline": list(self.cmdline),
            "cpu_state": self.cpu_state.to_dict(),
        }


def _detect(head: bytes) -> KernelKind:
    if is_elf(head):
        return "elf"
    if is_bzimage(head):
        return "bzimage"
    raise BootError("kernel image is neither an ELF vmlinux nor a bzImage")


def _load_kernel(mem: GuestMemory, path: Path) -> tuple[KernelKind, LoadedKernel]:
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            kind = _detect(f.read(0x1000))
            if kind == "bzimage" and size > mem.size:  # an ELF's segments are checked one by one
                raise BootError(
                    f"kernel image {path} is {mib(size)} MiB, larger than guest memory ({mib(mem.size)} MiB)"
                )
            f.seek(0)
            loaded = load_elf(mem, f) if kind == "elf" else load_bzimage(mem, f.read())
    except OSError as exc:
        raise BootError(f"cannot read kernel image {path}: {exc.strerror or exc}") from exc
    return kind, loaded


def _cmdline(cmdline: str | Cmdline, kernel: LoadedKernel) -> bytes:
    """The command line bytes, checked against our buffer and the kernel's own limit."""
    capacity = CMDLINE_MAX_SIZE
    if kernel.cmdline_size:
        capacity = min(capacity, kernel.cmdline_size + 1)
    return Cmdline.from_str(str(cmdline), capacity).as_bytes()


def load_boot(
    mem: GuestMemory,
    kernel: Path,
    cmdline: str | Cmdline,
    initrd: Path | None,
    mem_size: int,
    acpi_rsdp: int | None = None,
) -> BootInfo:
    """Load kernel, initrd, command line, zero page, page tables and GDT into `mem`.

    `mem_size` is the guest's RAM size (the e820 map describes it); `acpi_rsdp` is the
    address of an RSDP another module wrote, or None to let the kernel scan for one.
    """
    if mem_size < MIN_MEM_SIZE:
        raise BootError(f"guest memory of {mib(mem_size)} MiB is below the minimum {mib(MIN_MEM_SIZE)} MiB")
    if mem.size != mem_size:
        raise BootError(f"guest memory maps {mem.size} bytes, but the VM is configured with {mem_size}")

    kind, loaded = _load_kernel(mem, Path(kernel))
    line = _cmdline(cmdline, loaded)

    initrd_range = None
    if initrd is not None:
        try:
            data = Path(initrd).read_bytes()
        except OSError as exc:
            raise BootError(f"cannot read initrd {initrd}: {exc.strerror or exc}") from exc
        initrd_range = load_initrd(mem, data, loaded.end, loaded.initrd_addr_max)

    mem.write(CMDLINE_START, line)
    page = build_zero_page(
        loaded.setup_header,
        cmdline_addr=CMDLINE_START,
        e820=e820_map(mem_size),
        initrd=initrd_range,
        acpi_rsdp=acpi_rsdp,
        cmdline_max=CMDLINE_MAX_SIZE - 1,
    )
    write_zero_page(mem, page, ZERO_PAGE_START)
    write_boot_structures(mem)
    return BootInfo(
        kind=kind,
        entry=loaded.entry,
        zero_page=ZERO_PAGE_START,
        kernel=(loaded.start, loaded.end),
        initrd=initrd_range,
        cmdline=(CMDLINE_START, len(line)),
        cpu_state=boot_cpu_state(loaded.entry, ZERO_PAGE_START),
    )
