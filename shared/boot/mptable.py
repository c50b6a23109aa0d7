"""The Intel MultiProcessor (MP 1.4) table, for guests that boot without ACPI.

With `acpi=off` (or kernels built without ACPI) Linux learns the CPUs, the IOAPIC and
the IRQ routing only from this table, found by scanning the top 1 KiB of base memory
(the EBDA at `EBDA_START`). It describes: one processor entry per vCPU, one ISA bus,
one IOAPIC, ISA IRQs 0..IRQ_MAX routed 1:1 to IOAPIC pins, and the LAPIC LINT0/LINT1
wiring of a PC (ExtINT from the 8259, NMI).
"""

from __future__ import annotations

import struct

from shared.layout import APIC_START, EBDA_START, IOAPIC_START, IRQ_MAX, LOW_RAM_END, MAX_VCPUS
from shared.memory import GuestMemory

MPTABLE_START = EBDA_START
SPEC_REV = 4  # MP spec 1.4
OEM_ID = b"EMBERVM "  # 8 bytes, space padded
PRODUCT_ID = b"EMBERVM     "  # 12 bytes, space padded

APIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
# CPU signature (family 6) and CPUID.1:EDX features (FPU, APIC), as a typical VMM reports.
CPU_SIGNATURE = 0x600
CPU_FEATURES = (1 << 0) | (1 << 9)

# Entry types (MP spec table 4-3).
ENTRY_PROCESSOR = 0
ENTRY_BUS = 1
ENTRY_IOAPIC = 2
ENTRY_IO_INTERRUPT = 3
ENTRY_LOCAL_INTERRUPT = 4

CPU_ENABLED = 0x1
CPU_BOOTSTRAP = 0x2
IOAPIC_ENABLED = 0x1

# Interrupt types (MP spec table 4-9).
INT_TYPE_INT = 0
INT_TYPE_NMI = 1
INT_TYPE_EXTINT = 3
INT_FLAGS_CONFORMS = 0  # polarity and trigger mode "conform to the bus"

ISA_BUS_ID = 0
ALL_LOCAL_APICS = 0xFF

# struct layouts, little-endian, no padding.
FLOATING_POINTER = struct.Struct("<4sIBBBB4s")  # 16 bytes
CONFIG_HEADER = struct.Struct("<4sHBB8s12sIHHIHBB")  # 44 bytes
PROCESSOR_ENTRY = struct.Struct("<BBBBII8x")  # 20 bytes
BUS_ENTRY = struct.Struct("<BB6s")  # 8 bytes
IOAPIC_ENTRY = struct.Struct("<BBBBI")  # 8 bytes
INTERRUPT_ENTRY = struct.Struct("<BBHBBBB")  # 8 bytes, I/O and local interrupt entries alike

CHECKSUM_OFFSET_FP = 10
CHECKSUM_OFFSET_CONFIG = 7


def mptable_size(vcpu_count: int) -> int:
    """Bytes the floating pointer plus configuration table take for `vcpu_count` vCPUs."""
    return (
        FLOATING_POINTER.size
        + CONFIG_HEADER.size
        + vcpu_count * PROCESSOR_ENTRY.size
        + BUS_ENTRY.size
        + IOAPIC_ENTRY.size
        + (IRQ_MAX + 1) * INTERRUPT_ENTRY.size
        + 2 * INTERRUPT_ENTRY.size
    )


def checksum_byte(data: bytes | bytearray) -> int:
    """The byte that makes `data` (with that byte still 0) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def _entries(vcpu_count: int) -> list[bytes]:
    ioapic_id = vcpu_count  # the first id after the LAPIC ids: APIC ids share one namespace
    entries = [
        PROCESSOR_ENTRY.pack(
            ENTRY_PROCESSOR,
            cpu,
            APIC_VERSION,
            CPU_ENABLED | (CPU_BOOTSTRAP if cpu == 0 else 0),
            CPU_SIGNATURE,
            CPU_FEATURES,
        )
        for cpu in range(vcpu_count)
    ]
    entries.append(BUS_ENTRY.pack(ENTRY_BUS, ISA_BUS_ID, b"ISA   "))
    entries.append(IOAPIC_ENTRY.pack(ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED, IOAPIC_START))
    entries.extend(
        INTERRUPT_ENTRY.pack(ENTRY_IO_INTERRUPT, INT_TYPE_INT, INT_FLAGS_CONFORMS, ISA_BUS_ID, irq, ioapic_id, irq)
        for irq in range(IRQ_MAX + 1)
    )
    # LINT0 takes the 8259's ExtINT (virtual wire mode), LINT1 the NMI, on every LAPIC.
    entries.append(
        INTERRUPT_ENTRY.pack(
            ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, INT_FLAGS_CONFORMS, ISA_BUS_ID, 0, ALL_LOCAL_APICS, 0
        )
    )
    entries.append(
        INTERRUPT_ENTRY.pack(ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, INT_FLAGS_CONFORMS, ISA_BUS_ID, 0, ALL_LOCAL_APICS, 1)
    )
    return entries


def build_mptable(vcpu_count: int, start: int = MPTABLE_START) -> bytes:
    """The floating pointer at `start`, followed directly by the configuration table."""
    if not 1 <= vcpu_count <= MAX_VCPUS:
        raise ValueError(f"MP table: vcpu_count must be 1..{MAX_VCPUS}, got {vcpu_count}")
    entries = _entries(vcpu_count)
    body = b"".join(entries)
    config_addr = start + FLOATING_POINTER.size

    config = bytearray(
        CONFIG_HEADER.pack(
            b"PCMP",
            CONFIG_HEADER.size + len(body),
            SPEC_REV,
            0,  # checksum, below
            OEM_ID,
            PRODUCT_ID,
            0,  # no OEM table
            0,
            len(entries),
            APIC_START,
            0,  # no extended table
            0,
            0,
        )
        + body
    )
    config[CHECKSUM_OFFSET_CONFIG] = checksum_byte(config)

    # Length is in 16-byte units; feature byte 1 = 0 (config table present), byte 2 bit 7
    # (IMCR) clear: the PIC is in virtual wire mode, which is what KVM emulates.
    floating = bytearray(FLOATING_POINTER.pack(b"_MP_", config_addr, 1, SPEC_REV, 0, 0, bytes(4)))
    floating[CHECKSUM_OFFSET_FP] = checksum_byte(floating)
    return bytes(floating + config)


def write_mptable(mem: GuestMemory, vcpu_count: int) -> None:
    """Write the MP table for `vcpu_count` vCPUs at EBDA_START; it must end below 640 KiB."""
    table = build_mptable(vcpu_count, MPTABLE_START)
    if MPTABLE_START + len(table) > LOW_RAM_END:
        raise ValueError(
            f"MP table for {vcpu_count} vCPUs takes {len(table)} bytes, more than the "
            f"{LOW_RAM_END - MPTABLE_START} bytes of EBDA at {MPTABLE_START:#x}"
        )
    mem.write(MPTABLE_START, table)
