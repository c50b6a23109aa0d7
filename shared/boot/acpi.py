"""Hardware-reduced ACPI tables: how a stock Linux kernel finds CPUs and devices.

Distribution kernels enumerate virtio-mmio devices only from ACPI (the `LNRO0005`
devices in the DSDT), so embervm writes, from RSDP_START up:

    RSDP (rev 2) -> XSDT -> FADT (rev 6, HW_REDUCED_ACPI) -> DSDT (AML)
                         -> MADT (LAPICs, IOAPIC)

The FADT's hardware-reduced flag tells Linux there is no PM timer, SCI, GPE or
fixed-feature hardware to drive; the DSDT names the virtio-mmio windows, COM1 and the
i8042 so that Linux probes exactly those. `write_acpi_tables` returns the RSDP address
for boot_params.acpi_rsdp_addr.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from shared.boot import aml
from shared.layout import (
    ACPI_END,
    APIC_START,
    I8042_COMMAND_PORT,
    I8042_DATA_PORT,
    I8042_IRQ,
    IOAPIC_START,
    IRQ_MAX,
    MAX_VCPUS,
    RSDP_START,
    SERIAL_IRQ,
    SERIAL_PORT,
    VIRTIO_MMIO_SIZE,
)
from shared.memory import GuestMemory

OEM_ID = b"EMBRVM"
OEM_TABLE_ID = b"EMBERVM "
OEM_REVISION = 1
CREATOR_ID = b"EMBR"
CREATOR_REVISION = 1

TABLE_ALIGN = 16

SDT_HEADER = struct.Struct("<4sIBB6s8sI4sI")  # 36 bytes, common to every table but the RSDP
SDT_CHECKSUM_OFFSET = 9
RSDP = struct.Struct("<8sB6sBIIQB3x")  # 36 bytes (ACPI 2.0+)
RSDP_V1_LENGTH = 20  # the first checksum covers only the ACPI 1.0 part
RSDP_EXT_CHECKSUM_OFFSET = 32

XSDT_REVISION = 1
FADT_REVISION = 6
FADT_MINOR_REVISION = 5  # ACPI 6.5
FADT_LENGTH = 276
MADT_REVISION = 5
DSDT_REVISION = 2  # 2+: AML integers are 64-bit

# FADT field offsets (ACPI 6.5, table 5.9).
FADT_DSDT = 40
FADT_IAPC_BOOT_ARCH = 109
FADT_FLAGS = 112
FADT_MINOR_VERSION = 131
FADT_X_DSDT = 140

# IA-PC boot architecture flags: we have an i8042, no VGA, no PCI (so no MSI), no CMOS RTC.
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5
IAPC_BOOT_ARCH = IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_CMOS_RTC_NOT_PRESENT
FADT_HW_REDUCED_ACPI = 1 << 20

# MADT (ACPI 6.5, 5.2.12).
MADT_PCAT_COMPAT = 1  # KVM's in-kernel irqchip includes the dual 8259 (the MP table says ExtINT too)
MADT_LOCAL_APIC = struct.Struct("<BBBBI")  # type 0, length 8: UID, APIC id, flags
MADT_IO_APIC = struct.Struct("<BBBxII")  # type 1, length 12: id, address, GSI base
MADT_TYPE_LOCAL_APIC = 0
MADT_TYPE_IO_APIC = 1
LAPIC_ENABLED = 1

VIRTIO_MMIO_HID = "LNRO0005"


@dataclass(frozen=True)
class AcpiTables:
    """The encoded tables, as one blob meant for `start`, and where each table sits."""

    start: int
    blob: bytes
    rsdp: int
    xsdt: int
    fadt: int
    madt: int
    dsdt: int


def checksum_byte(data: bytes | bytearray) -> int:
    """The byte that makes `data` (with that byte still 0) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: the common header over `body`, checksummed."""
    table = bytearray(
        SDT_HEADER.pack(
            signature,
            SDT_HEADER.size + len(body),
            revision,
            0,
            OEM_ID,
            OEM_TABLE_ID,
            OEM_REVISION,
            CREATOR_ID,
            CREATOR_REVISION,
        )
        + body
    )
    table[SDT_CHECKSUM_OFFSET] = checksum_byte(table)
    return bytes(table)


def rsdp(xsdt_addr: int) -> bytes:
    """RSDP revision 2 pointing to the XSDT only (no 32-bit RSDT)."""
    data = bytearray(RSDP.pack(b"RSD PTR ", 0, OEM_ID, 2, 0, RSDP.size, xsdt_addr, 0))
    data[8] = checksum_byte(data[:RSDP_V1_LENGTH])
    data[RSDP_EXT_CHECKSUM_OFFSET] = checksum_byte(data)
    return bytes(data)


def xsdt(table_addrs: list[int]) -> bytes:
    return sdt(b"XSDT", XSDT_REVISION, b"".join(struct.pack("<Q", addr) for addr in table_addrs))


def fadt(dsdt_addr: int) -> bytes:
    """FADT revision 6, hardware-reduced: every PM/GPE/SCI field stays zero."""
    body = bytearray(FADT_LENGTH - SDT_HEADER.size)

    def put(offset: int, fmt: str, value: int) -> None:
        struct.pack_into(fmt, body, offset - SDT_HEADER.size, value)

    put(FADT_DSDT, "<I", dsdt_addr)
    put(FADT_IAPC_BOOT_ARCH, "<H", IAPC_BOOT_ARCH)
    put(FADT_FLAGS, "<I", FADT_HW_REDUCED_ACPI)
    put(FADT_MINOR_VERSION, "<B", FADT_MINOR_REVISION)
    put(FADT_X_DSDT, "<Q", dsdt_addr)
    return sdt(b"FACP", FADT_REVISION, bytes(body))


def madt(vcpu_count: int) -> bytes:
    """One enabled Local APIC per vCPU and the IOAPIC with GSIs 0..23 on pins 0..23.

    ISA IRQs map 1:1 to GSIs with the ISA defaults (edge, active high), as in the MP
    table, so no Interrupt Source Override is needed.
    """
    ioapic_id = vcpu_count  # the first id after the LAPIC ids, as in the MP table
    body = struct.pack("<II", APIC_START, MADT_PCAT_COMPAT)
    body += b"".join(
        MADT_LOCAL_APIC.pack(MADT_TYPE_LOCAL_APIC, MADT_LOCAL_APIC.size, cpu, cpu, LAPIC_ENABLED)
        for cpu in range(vcpu_count)
    )
    body += MADT_IO_APIC.pack(MADT_TYPE_IO_APIC, MADT_IO_APIC.size, ioapic_id, IOAPIC_START, 0)
    return sdt(b"APIC", MADT_REVISION, body)


def _isa_interrupt(irq: int) -> bytes:
    return aml.extended_interrupt(irq, edge=True, active_low=False, shared=False)


def dsdt_aml(virtio_devices: list[tuple[int, int]]) -> bytes:
    """The DSDT's AML body: \\_SB_ with COM1, the i8042 and one device per virtio-mmio window."""
    com1 = aml.device(
        "COM1",
        aml.name("_HID", aml.eisa_id("PNP0501")),
        aml.name("_UID", aml.integer(0)),
        aml.name("_CRS", aml.resource_template(aml.io(SERIAL_PORT, 8), _isa_interrupt(SERIAL_IRQ))),
    )
    i8042 = aml.device(
        "PS2K",
        aml.name("_HID", aml.eisa_id("PNP0303")),
        aml.name("_UID", aml.integer(0)),
        aml.name(
            "_CRS",
            aml.resource_template(aml.io(I8042_DATA_PORT, 1), aml.io(I8042_COMMAND_PORT, 1), _isa_interrupt(I8042_IRQ)),
        ),
    )
    virtio = [
        aml.device(
            f"VR{index:02X}",
            aml.name("_HID", aml.string(VIRTIO_MMIO_HID)),
            aml.name("_UID", aml.integer(index)),
            aml.name(
                "_CRS",
                aml.resource_template(aml.memory32_fixed(base, VIRTIO_MMIO_SIZE), _isa_interrupt(gsi)),
            ),
        )
        for index, (base, gsi) in enumerate(virtio_devices)
    ]
    return aml.scope("\\_SB_", com1, i8042, *virtio)


def _check_args(vcpu_count: int, virtio_devices: list[tuple[int, int]]) -> None:
    if not 1 <= vcpu_count <= MAX_VCPUS:
        raise ValueError(f"ACPI: vcpu_count must be 1..{MAX_VCPUS}, got {vcpu_count}")
    if len(virtio_devices) > 0x100:
        raise ValueError(f"ACPI: at most 256 virtio-mmio devices, got {len(virtio_devices)}")
    for base, gsi in virtio_devices:
        if not 0 <= gsi <= IRQ_MAX:
            raise ValueError(f"ACPI: virtio-mmio GSI {gsi} is not an IOAPIC pin (0..{IRQ_MAX})")
        if base % VIRTIO_MMIO_SIZE or not 0 <= base <= (1 << 32) - VIRTIO_MMIO_SIZE:
            raise ValueError(f"ACPI: virtio-mmio base {base:#x} is not a 4 KiB window below 4 GiB")


def _align(addr: int) -> int:
    return (addr + TABLE_ALIGN - 1) & -TABLE_ALIGN


def build_acpi_tables(vcpu_count: int, virtio_devices: list[tuple[int, int]], start: int = RSDP_START) -> AcpiTables:
    """Encode all tables for placement at `start` (RSDP first, then XSDT, FADT, MADT, DSDT)."""
    _check_args(vcpu_count, virtio_devices)
    dsdt = sdt(b"DSDT", DSDT_REVISION, dsdt_aml(virtio_devices))
    madt_table = madt(vcpu_count)

    xsdt_addr = _align(start + RSDP.size)
    fadt_addr = _align(xsdt_addr + SDT_HEADER.size + 2 * 8)
    madt_addr = _align(fadt_addr + FADT_LENGTH)
    dsdt_addr = _align(madt_addr + len(madt_table))
    end = dsdt_addr + len(dsdt)

    placed = {
        start: rsdp(xsdt_addr),
        xsdt_addr: xsdt([fadt_addr, madt_addr]),
        fadt_addr: fadt(dsdt_addr),
        madt_addr: madt_table,
        dsdt_addr: dsdt,
    }
    blob = bytearray(end - start)
    for addr, data in placed.items():
        blob[addr - start : addr - start + len(data)] = data
    return AcpiTables(start, bytes(blob), start, xsdt_addr, fadt_addr, madt_addr, dsdt_addr)


def write_acpi_tables(mem: GuestMemory, vcpu_count: int, virtio_devices: list[tuple[int, int]]) -> int:
    """Write the ACPI tables at RSDP_START and return the RSDP's guest address.

    `virtio_devices` lists (MMIO base, GSI) pairs as `virtio_mmio_window` gives them.
    """
    tables = build_acpi_tables(vcpu_count, virtio_devices, RSDP_START)
    if tables.start + len(tables.blob) > ACPI_END:
        raise ValueError(
            f"ACPI tables take {len(tables.blob)} bytes, more than the "
            f"{ACPI_END - RSDP_START} bytes between {RSDP_START:#x} and {ACPI_END:#x}"
        )
    mem.write(tables.start, tables.blob)
    return tables.rsdp
