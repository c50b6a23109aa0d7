"""The CPU state the Linux 64-bit boot protocol expects at the kernel's entry.

boot.rst ("64-bit Boot Protocol"): long mode with paging on; an identity mapping of
the kernel, zero page and command line; a GDT with flat 4 GiB descriptors for
__BOOT_CS (selector 0x10, execute/read) and __BOOT_DS (0x18, read/write), CS loaded
with __BOOT_CS and DS/ES/SS with __BOOT_DS; interrupts off; %rsi = zero page.

The supervisor writes the tables (`write_boot_structures`); the vCPU worker applies
the register values (`boot_cpu_state`, `boot_msrs`, `set_lint`) with KVM ioctls.
Everything here is plain ints and dicts so it crosses a msgpack channel unchanged.

GDT (at BOOT_GDT_START, 4 entries = 32 bytes, so it ends right where the IDT starts):
    0x00 null
    0x08 TSS, 64-bit busy (0x808b): only TR's selector points at it; KVM takes TR's
         hidden state from sregs, and Linux loads its own GDT and TSS early on
    0x10 __BOOT_CS: 64-bit code, execute/read (0xa09b)
    0x18 __BOOT_DS: data, read/write (0xc093)
Firecracker puts code at 0x08 and data at 0x10; this layout follows the protocol's
selectors instead (Linux's own boot GDT also has code at index 2, data at 3).

Page tables: PML4 at PML4_START -> one PDPT at PDPTE_START -> 4 page directories
at PDE_START.. (0xb000-0xefff) identity-mapping the first 4 GiB with 2 MiB pages, so
the kernel, its decompression buffer and the initrd are covered wherever in low
RAM they are. Linux builds its own page tables right after entry.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from shared.layout import (
    BOOT_GDT_START,
    BOOT_IDT_START,
    BOOT_STACK_POINTER,
    PDE_START,
    PDPTE_START,
    PML4_START,
    GiB,
    MiB,
)
from shared.memory import GuestMemory

X86_CR0_PE = 0x1
X86_CR0_ET = 0x10
X86_CR0_PG = 0x80000000
X86_CR4_PAE = 0x20
EFER_LME = 0x100
EFER_LMA = 0x400
RFLAGS_RESERVED = 0x2  # bit 1 always reads 1; IF clear: interrupts off at entry

PTE_PRESENT = 0x1
PTE_RW = 0x2
PTE_PS = 0x80  # in a PDE: maps a 2 MiB page
PAGE_SIZE = 0x1000
LARGE_PAGE = 2 * MiB
IDENTITY_MAP_SIZE = 4 * GiB
PDE_PAGES = IDENTITY_MAP_SIZE // GiB  # one page directory maps 1 GiB

# GDT access/flags words in the compact form (flags nibble << 12 | access byte).
GDT_CODE64 = 0xA09B  # G, L, P, S, type 0xb (execute/read, accessed)
GDT_DATA = 0xC093  # G, D/B, P, S, type 0x3 (read/write, accessed)
GDT_TSS64 = 0x808B  # G, P, type 0xb (busy 64-bit TSS)
GDT_TSS_INDEX = 1
BOOT_CS_INDEX = 2
BOOT_DS_INDEX = 3
BOOT_CS = BOOT_CS_INDEX * 8  # 0x10, __BOOT_CS
BOOT_DS = BOOT_DS_INDEX * 8  # 0x18, __BOOT_DS
BOOT_TSS = GDT_TSS_INDEX * 8  # 0x08
IDT_LIMIT = 7  # one empty 8-byte slot, as Firecracker sets up

# MSRs set at boot (as Firecracker does, plus MTRRs so memory is write-back).
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MISC_ENABLE_FAST_STRING = 0x1
MTRR_ENABLE = 0x800  # MTRRdefType.E
MTRR_TYPE_WB = 0x6

# LAPIC registers inside struct kvm_lapic_state.regs (1024 bytes).
LAPIC_REGS_SIZE = 1024
APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7
_DELIVERY_MODE_MASK = 0x700


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """Pack a segment descriptor (Intel SDM vol. 3, 3.4.5) from the compact flags word."""
    return (
        (base & 0xFF000000) << 32
        | ((flags >> 12) & 0xF) << 52
        | (limit & 0xF0000) << 32
        | (flags & 0xFF) << 40
        | (base & 0xFFFFFF) << 16
        | limit & 0xFFFF
    )


def segment_from_gdt(entry: int, index: int) -> dict[str, int]:
    """The `struct kvm_segment` fields matching descriptor `entry` at GDT `index`.

    KVM wants the limit in bytes, so a page-granular limit is expanded.
    """
    granular = (entry >> 55) & 1
    raw_limit = (entry >> 32) & 0xF0000 | entry & 0xFFFF
    return {
        "base": (entry >> 32) & 0xFF000000 | (entry >> 16) & 0xFFFFFF,
        "limit": (raw_limit << 12 | 0xFFF) if granular else raw_limit,
        "selector": index * 8,
        "type": (entry >> 40) & 0xF,
        "present": (entry >> 47) & 1,
        "dpl": (entry >> 45) & 3,
        "db": (entry >> 54) & 1,
        "s": (entry >> 44) & 1,
        "l": (entry >> 53) & 1,
        "g": granular,
        "avl": (entry >> 52) & 1,
        "unusable": 0,
    }


def boot_gdt() -> list[int]:
    """The boot GDT, index by index (see the module docstring)."""
    gdt = [0] * 4
    gdt[GDT_TSS_INDEX] = gdt_entry(GDT_TSS64, 0, 0xFFFFF)
    gdt[BOOT_CS_INDEX] = gdt_entry(GDT_CODE64, 0, 0xFFFFF)
    gdt[BOOT_DS_INDEX] = gdt_entry(GDT_DATA, 0, 0xFFFFF)
    return gdt


def write_boot_structures(mem: GuestMemory) -> None:
    """Write the GDT, the empty IDT and the identity-mapping page tables."""
    gdt = boot_gdt()
    mem.write(BOOT_GDT_START, b"".join(e.to_bytes(8, "little") for e in gdt))
    mem.write(BOOT_IDT_START, bytes(IDT_LIMIT + 1))

    mem.fill(PML4_START, PAGE_SIZE)
    mem.write_u64(PML4_START, PDPTE_START | PTE_PRESENT | PTE_RW)
    mem.fill(PDPTE_START, PAGE_SIZE)
    for i in range(PDE_PAGES):
        mem.write_u64(PDPTE_START + i * 8, (PDE_START + i * PAGE_SIZE) | PTE_PRESENT | PTE_RW)
    mem.write(PDE_START, identity_map_table())


@functools.cache
def identity_map_table() -> bytes:
    """The page directory entries mapping the first IDENTITY_MAP_SIZE bytes 1:1 with 2 MiB
    pages: the same 16 KiB for every microVM, built once per process (the fork server
    builds it for every VMM it forks)."""
    entries = IDENTITY_MAP_SIZE // LARGE_PAGE
    return b"".join((i * LARGE_PAGE | PTE_PS | PTE_RW | PTE_PRESENT).to_bytes(8, "little") for i in range(entries))


@dataclass
class BootCpuState:
    """Register values for the boot vCPU, shaped like KVM's kvm_regs/kvm_sregs/kvm_fpu.

    `regs` holds the general registers to set (all others are 0); `sregs` holds the
    segments (kvm_segment fields), `gdt`/`idt` ({base, limit}) and cr0/cr3/cr4/efer;
    the worker overlays these on what KVM_GET_SREGS returns. `fpu` holds fcw/mxcsr.
    """

    regs: dict[str, int]
    sregs: dict[str, Any]
    fpu: dict[str, int] = field(default_factory=lambda: {"fcw": 0x37F, "mxcsr": 0x1F80})

    def to_dict(self) -> dict[str, Any]:
        return {"regs": dict(self.regs), "sregs": _copy_sregs(self.sregs), "fpu": dict(self.fpu)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BootCpuState:
        missing = {"regs", "sregs", "fpu"} - data.keys()
        if missing:
            raise ValueError(f"boot CPU state lacks {sorted(missing)}")
        return cls(regs=dict(data["regs"]), sregs=_copy_sregs(data["sregs"]), fpu=dict(data["fpu"]))


def _copy_sregs(sregs: dict[str, Any]) -> dict[str, Any]:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in sregs.items()}


def boot_cpu_state(entry: int, zero_page: int) -> BootCpuState:
    """Registers for entering the kernel at `entry` in long mode, %rsi = `zero_page`."""
    gdt = boot_gdt()
    code = segment_from_gdt(gdt[BOOT_CS_INDEX], BOOT_CS_INDEX)
    data = segment_from_gdt(gdt[BOOT_DS_INDEX], BOOT_DS_INDEX)
    tss = segment_from_gdt(gdt[GDT_TSS_INDEX], GDT_TSS_INDEX)
    sregs: dict[str, Any] = {
        "cs": code,
        "ds": dict(data),
        "es": dict(data),
        "fs": dict(data),
        "gs": dict(data),
        "ss": dict(data),
        "tr": tss,
        "gdt": {"base": BOOT_GDT_START, "limit": len(gdt) * 8 - 1},
        "idt": {"base": BOOT_IDT_START, "limit": IDT_LIMIT},
        # PE|PG enter protected mode with paging; ET is hard-wired to 1 on modern CPUs.
        # CD/NW (set in KVM's reset value) are left clear so caches are on.
        "cr0": X86_CR0_PE | X86_CR0_ET | X86_CR0_PG,
        "cr3": PML4_START,
        "cr4": X86_CR4_PAE,
        "efer": EFER_LME | EFER_LMA,
    }
    regs = {
        "rip": entry,
        "rsp": BOOT_STACK_POINTER,
        "rbp": BOOT_STACK_POINTER,
        "rsi": zero_page,
        "rflags": RFLAGS_RESERVED,
    }
    return BootCpuState(regs=regs, sregs=sregs)


def boot_msrs() -> list[tuple[int, int]]:
    """(index, value) MSRs to set on every vCPU before it runs."""
    return [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WB),
    ]


def _set_delivery_mode(regs: bytearray, offset: int, mode: int) -> None:
    value = int.from_bytes(regs[offset : offset + 4], "little")
    value = value & ~_DELIVERY_MODE_MASK | mode << 8
    regs[offset : offset + 4] = value.to_bytes(4, "little")


def set_lint(lapic_regs: bytearray) -> None:
    """Route LINT0 as ExtINT (the PIC) and LINT1 as NMI in a kvm_lapic_state regs buffer.

    This is the virtual-wire setup a PC's BIOS leaves behind; other bits (mask,
    trigger mode) are kept.
    """
    if len(lapic_regs) != LAPIC_REGS_SIZE:
        raise ValueError(f"kvm_lapic_state regs is {len(lapic_regs)} bytes, expected {LAPIC_REGS_SIZE}")
    _set_delivery_mode(lapic_regs, APIC_LVT_LINT0, APIC_MODE_EXTINT)
    _set_delivery_mode(lapic_regs, APIC_LVT_LINT1, APIC_MODE_NMI)
