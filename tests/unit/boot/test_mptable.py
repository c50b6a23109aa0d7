"""MP table layout: checksums, entries at their MP 1.4 offsets, and the EBDA bound."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest

from shared.boot.mptable import build_mptable, mptable_size, write_mptable
from shared.layout import APIC_START, EBDA_START, IOAPIC_START, IRQ_MAX, LOW_RAM_END, MAX_VCPUS, MiB
from shared.memory import GuestMemory, create_guest_memfd

MEM_SIZE = 2 * MiB


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    fd = create_guest_memfd(MEM_SIZE)
    guest = GuestMemory.map(fd, MEM_SIZE)
    try:
        yield guest
    finally:
        guest.close()
        os.close(fd)


def _config(mem: GuestMemory) -> tuple[int, bytes]:
    """(address, bytes) of the configuration table the floating pointer names."""
    addr = mem.read_u32(EBDA_START + 4)
    length = mem.read_u16(addr + 4)
    return addr, mem.read(addr, length)


def _entries(config: bytes) -> list[bytes]:
    """Split the base table into entries (processor entries are 20 bytes, the rest 8)."""
    entries, offset = [], 44
    while offset < len(config):
        size = 20 if config[offset] == 0 else 8
        entries.append(config[offset : offset + size])
        offset += size
    assert offset == len(config)
    return entries


@pytest.mark.parametrize("vcpus", [1, 2, 7, MAX_VCPUS])
def test_checksums_sum_to_zero(mem: GuestMemory, vcpus: int) -> None:
    write_mptable(mem, vcpus)
    assert sum(mem.read(EBDA_START, 16)) % 256 == 0
    _, config = _config(mem)
    assert sum(config) % 256 == 0


def test_floating_pointer_fields(mem: GuestMemory) -> None:
    write_mptable(mem, 2)
    fp = mem.read(EBDA_START, 16)
    assert fp[0:4] == b"_MP_"
    assert struct.unpack_from("<I", fp, 4)[0] == EBDA_START + 16
    assert fp[8] == 1  # length in 16-byte paragraphs
    assert fp[9] == 4  # spec revision 1.4
    assert fp[11] == 0  # a configuration table is present (no default config)
    assert fp[12:16] == bytes(4)


def test_config_header_fields(mem: GuestMemory) -> None:
    write_mptable(mem, 3)
    addr, config = _config(mem)
    assert addr == EBDA_START + 16
    assert config[0:4] == b"PCMP"
    assert struct.unpack_from("<H", config, 4)[0] == len(config) == mptable_size(3) - 16
    assert config[6] == 4
    assert config[8:16] == b"EMBERVM "
    assert struct.unpack_from("<IH", config, 28) == (0, 0)  # no OEM table
    assert struct.unpack_from("<H", config, 34)[0] == 3 + 1 + 1 + (IRQ_MAX + 1) + 2
    assert struct.unpack_from("<I", config, 36)[0] == APIC_START
    assert struct.unpack_from("<HB", config, 40) == (0, 0)  # no extended table


@pytest.mark.parametrize("vcpus", [1, 4, MAX_VCPUS])
def test_entry_counts_by_type(mem: GuestMemory, vcpus: int) -> None:
    write_mptable(mem, vcpus)
    _, config = _config(mem)
    entries = _entries(config)
    assert struct.unpack_from("<H", config, 34)[0] == len(entries)
    types = [e[0] for e in entries]
    assert types.count(0) == vcpus
    assert types.count(1) == 1
    assert types.count(2) == 1
    assert types.count(3) == IRQ_MAX + 1
    assert types.count(4) == 2
    assert types == sorted(types)  # the spec orders entries by type


def test_processor_entries(mem: GuestMemory) -> None:
    write_mptable(mem, 4)
    _, config = _config(mem)
    cpus = [e for e in _entries(config) if e[0] == 0]
    for cpu, entry in enumerate(cpus):
        _, apic_id, apic_ver, flags, signature, features = struct.unpack("<BBBBII8x", entry)
        assert apic_id == cpu
        assert apic_ver == 0x14
        assert flags & 1  # enabled
        assert bool(flags & 2) == (cpu == 0)  # only vCPU 0 is the bootstrap processor
        assert signature == 0x600
        assert features & (1 << 9) and features & 1  # APIC and FPU
        assert entry[12:20] == bytes(8)


def test_bus_and_ioapic_entries(mem: GuestMemory) -> None:
    write_mptable(mem, 5)
    _, config = _config(mem)
    entries = _entries(config)
    (bus,) = [e for e in entries if e[0] == 1]
    assert bus == bytes([1, 0]) + b"ISA   "
    (ioapic,) = [e for e in entries if e[0] == 2]
    assert struct.unpack("<BBBBI", ioapic) == (2, 5, 0x11, 1, IOAPIC_START)


def test_io_interrupt_entries_route_isa_irqs_to_matching_pins(mem: GuestMemory) -> None:
    write_mptable(mem, 2)
    _, config = _config(mem)
    ints = [struct.unpack("<BBHBBBB", e) for e in _entries(config) if e[0] == 3]
    assert ints == [(3, 0, 0, 0, irq, 2, irq) for irq in range(IRQ_MAX + 1)]


def test_local_interrupt_entries(mem: GuestMemory) -> None:
    write_mptable(mem, 2)
    _, config = _config(mem)
    lints = [struct.unpack("<BBHBBBB", e) for e in _entries(config) if e[0] == 4]
    # (type, int type, flags, bus, bus irq, dest LAPIC, LINTIN#)
    assert lints == [(4, 3, 0, 0, 0, 0xFF, 0), (4, 1, 0, 0, 0, 0xFF, 1)]


def test_max_vcpus_fits_below_640k(mem: GuestMemory) -> None:
    write_mptable(mem, MAX_VCPUS)
    addr, config = _config(mem)
    assert addr + len(config) <= LOW_RAM_END
    assert EBDA_START + mptable_size(MAX_VCPUS) <= LOW_RAM_END
    assert len(build_mptable(MAX_VCPUS)) == mptable_size(MAX_VCPUS)


@pytest.mark.parametrize("vcpus", [0, -1, MAX_VCPUS + 1])
def test_bad_vcpu_counts_are_rejected(mem: GuestMemory, vcpus: int) -> None:
    with pytest.raises(ValueError, match="vcpu_count"):
        write_mptable(mem, vcpus)
    assert mem.read(EBDA_START, 4) == bytes(4)  # nothing was written
