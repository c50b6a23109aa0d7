"""ACPI tables and the AML encoder: checksums, links between tables, MADT entries,
PkgLength boundaries, and what ACPICA's own disassembler (`iasl -d`) reads back."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.boot import acpi, aml
from shared.boot.acpi import build_acpi_tables, write_acpi_tables
from shared.layout import (
    ACPI_END,
    APIC_START,
    IOAPIC_START,
    MAX_VCPUS,
    RSDP_START,
    MiB,
    virtio_mmio_window,
)
from shared.memory import GuestMemory, create_guest_memfd

MEM_SIZE = 2 * MiB
TWO_DEVICES = [virtio_mmio_window(0), virtio_mmio_window(1)]


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    fd = create_guest_memfd(MEM_SIZE)
    guest = GuestMemory.map(fd, MEM_SIZE)
    try:
        yield guest
    finally:
        guest.close()
        os.close(fd)


def read_table(mem: GuestMemory, addr: int) -> bytes:
    """The whole SDT at `addr`, as long as its header says."""
    return mem.read(addr, mem.read_u32(addr + 4))


def root_tables(mem: GuestMemory, rsdp_addr: int) -> dict[bytes, tuple[int, bytes]]:
    """Signature -> (address, bytes) of every table reachable from the RSDP."""
    xsdt_addr = mem.read_u64(rsdp_addr + 24)
    xsdt = read_table(mem, xsdt_addr)
    tables = {b"XSDT": (xsdt_addr, xsdt)}
    for (addr,) in struct.iter_unpack("<Q", xsdt[36:]):
        table = read_table(mem, addr)
        tables[table[:4]] = (addr, table)
    _, fadt = tables[b"FACP"]
    dsdt_addr = struct.unpack_from("<Q", fadt, 140)[0]
    tables[b"DSDT"] = (dsdt_addr, read_table(mem, dsdt_addr))
    return tables


def madt_entries(madt: bytes) -> list[bytes]:
    entries, offset = [], 44
    while offset < len(madt):
        length = madt[offset + 1]
        assert length >= 2, f"MADT entry of length {length} at {offset}"
        entries.append(madt[offset : offset + length])
        offset += length
    assert offset == len(madt)
    return entries


# --- RSDP and table links ---------------------------------------------------


def test_returns_rsdp_address_and_rsdp_fields(mem: GuestMemory) -> None:
    addr = write_acpi_tables(mem, 2, TWO_DEVICES)
    assert addr == RSDP_START
    rsdp = mem.read(addr, 36)
    sig, _, oem, revision, rsdt, length, xsdt, _ = struct.unpack("<8sB6sBIIQB3x", rsdp)
    assert sig == b"RSD PTR "
    assert oem == b"EMBRVM"
    assert revision == 2
    assert rsdt == 0
    assert length == 36
    assert mem.read(xsdt, 4) == b"XSDT"
    assert sum(rsdp[:20]) % 256 == 0  # ACPI 1.0 checksum
    assert sum(rsdp) % 256 == 0  # extended checksum


@pytest.mark.parametrize("signature", [b"XSDT", b"FACP", b"APIC", b"DSDT"])
@pytest.mark.parametrize("vcpus", [1, 3, MAX_VCPUS])
def test_every_table_checksums_to_zero(mem: GuestMemory, signature: bytes, vcpus: int) -> None:
    tables = root_tables(mem, write_acpi_tables(mem, vcpus, TWO_DEVICES))
    _, table = tables[signature]
    assert sum(table) % 256 == 0


@pytest.mark.parametrize(("signature", "revision"), [(b"XSDT", 1), (b"FACP", 6), (b"APIC", 5), (b"DSDT", 2)])
def test_headers(mem: GuestMemory, signature: bytes, revision: int) -> None:
    _, table = root_tables(mem, write_acpi_tables(mem, 2, TWO_DEVICES))[signature]
    sig, length, rev, _, oem, oem_table, _, creator, _ = struct.unpack_from("<4sIBB6s8sI4sI", table)
    assert sig == signature
    assert length == len(table) > 36
    assert rev == revision
    assert (oem, oem_table, creator) == (b"EMBRVM", b"EMBERVM ", b"EMBR")


def test_xsdt_points_to_fadt_and_madt(mem: GuestMemory) -> None:
    tables = root_tables(mem, write_acpi_tables(mem, 2, TWO_DEVICES))
    _, xsdt = tables[b"XSDT"]
    pointers = [addr for (addr,) in struct.iter_unpack("<Q", xsdt[36:])]
    assert pointers == [tables[b"FACP"][0], tables[b"APIC"][0]]


def test_fadt_is_hardware_reduced_and_points_to_dsdt(mem: GuestMemory) -> None:
    tables = root_tables(mem, write_acpi_tables(mem, 2, TWO_DEVICES))
    _, fadt = tables[b"FACP"]
    dsdt_addr = tables[b"DSDT"][0]
    assert len(fadt) == 276
    assert struct.unpack_from("<I", fadt, 40)[0] == dsdt_addr  # DSDT
    assert struct.unpack_from("<Q", fadt, 140)[0] == dsdt_addr  # X_DSDT
    assert mem.read(dsdt_addr, 4) == b"DSDT"
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & (1 << 20)  # HW_REDUCED_ACPI
    boot_arch = struct.unpack_from("<H", fadt, 109)[0]
    assert boot_arch & (1 << 1)  # 8042 present
    assert boot_arch & (1 << 2)  # VGA not present
    assert fadt[131] == 5  # minor revision: 6.5
    assert struct.unpack_from("<H", fadt, 46)[0] == 0  # no SCI in hardware-reduced mode


def test_tables_are_aligned_disjoint_and_inside_the_acpi_area(mem: GuestMemory) -> None:
    tables = root_tables(mem, write_acpi_tables(mem, MAX_VCPUS, TWO_DEVICES))
    spans = sorted([(RSDP_START, RSDP_START + 36)] + [(a, a + len(t)) for a, t in tables.values()])
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start
    assert all(start % 16 == 0 for start, _ in spans)
    assert spans[0][0] == RSDP_START
    assert spans[-1][1] <= ACPI_END


# --- MADT ---------------------------------------------------------------------


@pytest.mark.parametrize("vcpus", [1, 2, 5, MAX_VCPUS])
def test_madt_has_one_enabled_lapic_per_vcpu_and_one_ioapic(mem: GuestMemory, vcpus: int) -> None:
    _, madt = root_tables(mem, write_acpi_tables(mem, vcpus, TWO_DEVICES))[b"APIC"]
    assert struct.unpack_from("<I", madt, 36)[0] == APIC_START
    entries = madt_entries(madt)
    lapics = [struct.unpack("<BBBBI", e) for e in entries if e[0] == 0]
    assert lapics == [(0, 8, cpu, cpu, 1) for cpu in range(vcpus)]
    ioapics = [struct.unpack("<BBBxII", e) for e in entries if e[0] == 1]
    assert ioapics == [(1, 12, vcpus, IOAPIC_START, 0)]
    assert len(entries) == vcpus + 1  # no interrupt source overrides: ISA IRQs are identity-mapped


# --- argument checks ------------------------------------------------------------


@pytest.mark.parametrize("vcpus", [0, MAX_VCPUS + 1])
def test_bad_vcpu_count_is_rejected(mem: GuestMemory, vcpus: int) -> None:
    with pytest.raises(ValueError, match="vcpu_count"):
        write_acpi_tables(mem, vcpus, TWO_DEVICES)
    assert mem.read(RSDP_START, 8) == bytes(8)


@pytest.mark.parametrize(
    ("device", "message"),
    [((0xD000_0000, 24), "GSI 24"), ((0xD000_0800, 5), "4 KiB window"), ((1 << 32, 5), "below 4 GiB")],
)
def test_bad_virtio_device_is_rejected(mem: GuestMemory, device: tuple[int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_acpi_tables(mem, 1, [device])


def test_tables_that_do_not_fit_are_rejected(mem: GuestMemory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(acpi, "ACPI_END", RSDP_START + 0x200)
    with pytest.raises(ValueError, match=r"more than the 512 bytes"):
        write_acpi_tables(mem, 2, TWO_DEVICES)
    assert mem.read(RSDP_START, 8) == bytes(8)


def test_nineteen_devices_fit() -> None:
    devices = [virtio_mmio_window(i) for i in range(19)]
    tables = build_acpi_tables(MAX_VCPUS, devices)
    assert tables.start + len(tables.blob) <= ACPI_END
    assert tables.blob.count(b"LNRO0005") == 19


# --- AML encoder ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "size"),
    [
        (0, 1),
        (62, 1),  # total 63: the largest 1-byte form
        (63, 2),  # total 65
        (4093, 2),  # total 4095: the largest 2-byte form
        (4094, 3),  # total 4097
        ((1 << 20) - 4, 3),  # total 2^20 - 1
        ((1 << 20) - 3, 4),
        ((1 << 28) - 5, 4),  # total 2^28 - 1, the largest AML allows
    ],
)
def test_pkg_length_forms_at_their_boundaries(content: int, size: int) -> None:
    encoded = aml.pkg_length(content)
    assert len(encoded) == size
    if size > 1:
        assert encoded[0] >> 6 == size - 1
        assert encoded[0] & 0x30 == 0  # bits 4-5 are reserved in the multi-byte forms
    assert aml.decode_pkg_length(encoded) == (content + size, size)


def test_pkg_length_exact_bytes() -> None:
    assert aml.pkg_length(0) == b"\x01"
    assert aml.pkg_length(62) == b"\x3f"
    assert aml.pkg_length(63) == bytes([0x41, 0x04])  # 65 = 0x41
    assert aml.pkg_length(4094) == bytes([0x80 | 0x1, 0x00, 0x01])  # 4097 = 0x1001


def test_pkg_length_too_long() -> None:
    with pytest.raises(aml.AmlError, match="longer than AML allows"):
        aml.pkg_length((1 << 28) - 4)
    with pytest.raises(aml.AmlError):
        aml.pkg_length(-1)


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (2, b"\x0a\x02"),
        (0xFF, b"\x0a\xff"),
        (0x100, b"\x0b\x00\x01"),
        (0xFFFF, b"\x0b\xff\xff"),
        (0x10000, b"\x0c\x00\x00\x01\x00"),
        (0xFFFF_FFFF, b"\x0c\xff\xff\xff\xff"),
        (1 << 32, b"\x0e" + (1 << 32).to_bytes(8, "little")),
        ((1 << 64) - 1, b"\xff"),
    ],
)
def test_integer_encodings(value: int, encoded: bytes) -> None:
    assert aml.integer(value) == encoded


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_integer_out_of_range(value: int) -> None:
    with pytest.raises(aml.AmlError):
        aml.integer(value)


def test_names() -> None:
    assert aml.name_seg("_SB") == b"_SB_"
    assert aml.name_string("\\_SB_") == b"\\_SB_"
    assert aml.name_string("^^FOO") == b"^^FOO_"
    assert aml.name_string("_SB.COM1") == b"\x2e_SB_COM1"
    assert aml.name_string("\\A.B.C") == b"\\\x2f\x03A___B___C___"
    for bad in ["", "1ABC", "ABCDE", "com1"]:
        with pytest.raises(aml.AmlError):
            aml.name_seg(bad)


def test_string_eisa_id_and_name() -> None:
    assert aml.string("LNRO0005") == b"\x0dLNRO0005\x00"
    assert aml.eisa_id("PNP0501") == b"\x0c\x41\xd0\x05\x01"
    assert aml.eisa_id("PNP0303") == b"\x0c\x41\xd0\x03\x03"
    assert aml.name("_UID", aml.integer(0)) == b"\x08_UID\x00"
    with pytest.raises(aml.AmlError):
        aml.eisa_id("pnp0501")


def test_resource_descriptors() -> None:
    assert aml.memory32_fixed(0xD000_0000, 0x1000) == bytes.fromhex("860900 01 0000 00d0 00100000".replace(" ", ""))
    assert aml.io(0x3F8, 8) == bytes.fromhex("4701f803f8030108")
    assert aml.extended_interrupt(5) == bytes.fromhex("890600 03 01 05000000".replace(" ", ""))
    assert aml.extended_interrupt(9, edge=False, active_low=True, shared=True)[3] == 0x0D
    template = aml.resource_template(aml.io(0x60, 1))
    assert template[0] == 0x11  # BufferOp
    data = template[4:]  # BufferOp, PkgLength, BytePrefix + size
    assert template[3] == len(data)
    assert data[-2] == 0x79
    assert sum(data) % 256 == 0  # the End Tag checksum covers the whole list


# --- iasl -----------------------------------------------------------------------


def _iasl() -> str:
    path = shutil.which("iasl")
    if path is None:
        pytest.skip("iasl (acpica-tools) is not installed: cannot cross-check tables with ACPICA")
    return path


def _disassemble(tmp_path: Path, name: str, table: bytes) -> str:
    """Run `iasl -d` on one binary table; fail on a non-zero exit or any error/warning."""
    source = tmp_path / f"{name}.dat"
    source.write_bytes(table)
    proc = subprocess.run(
        [_iasl(), "-d", str(source)], capture_output=True, text=True, cwd=tmp_path, timeout=60, check=False
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert not re.search(r"error|warning|invalid|unknown", log, re.IGNORECASE), log
    dsl = (tmp_path / f"{name}.dsl").read_text()
    assert not re.search(r"error|warning|invalid|unknown", dsl, re.IGNORECASE), dsl
    return dsl


@pytest.mark.parametrize("signature", [b"XSDT", b"FACP", b"APIC", b"DSDT"])
def test_iasl_disassembles_every_table(mem: GuestMemory, tmp_path: Path, signature: bytes) -> None:
    _, table = root_tables(mem, write_acpi_tables(mem, 2, TWO_DEVICES))[signature]
    dsl = _disassemble(tmp_path, signature.decode().lower(), table)
    assert f'"{signature.decode()}"' in dsl


def test_iasl_reads_fadt_and_madt_fields(mem: GuestMemory, tmp_path: Path) -> None:
    tables = root_tables(mem, write_acpi_tables(mem, 3, TWO_DEVICES))
    fadt = _disassemble(tmp_path, "facp", tables[b"FACP"][1])
    assert re.search(r"Hardware Reduced \(V5\) : 1", fadt)
    assert re.search(rf"DSDT Address : 0*{tables[b'DSDT'][0]:X}\b", fadt)
    madt = _disassemble(tmp_path, "apic", tables[b"APIC"][1])
    assert len(re.findall(r"\[Processor Local APIC\]", madt)) == 3
    assert re.findall(r"Local Apic ID : (\w+)", madt) == ["00", "01", "02"]
    assert re.search(r"I/O Apic ID : 03", madt)
    assert re.search(rf"Address : {IOAPIC_START:08X}", madt)


def _devices(dsl: str) -> dict[str, str]:
    """Device name -> its text in an iasl disassembly (up to the next Device)."""
    parts = re.split(r"Device \((\w+)\)", dsl)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_iasl_dsdt_names_virtio_devices_with_their_resources(mem: GuestMemory, tmp_path: Path) -> None:
    devices = [virtio_mmio_window(0), virtio_mmio_window(3)]
    _, dsdt = root_tables(mem, write_acpi_tables(mem, 2, devices))[b"DSDT"]
    dsl = _disassemble(tmp_path, "dsdt", dsdt)
    assert "Scope (\\_SB)" in dsl
    found = {name: body for name, body in _devices(dsl).items() if 'Name (_HID, "LNRO0005")' in body}
    assert len(found) == 2
    for uid, ((base, gsi), body) in enumerate(zip(devices, found.values(), strict=True)):
        assert re.search(rf"Name \(_UID, {['Zero', 'One'][uid]}\)", body)
        assert re.search(rf"Memory32Fixed \(ReadWrite,\s+0x{base:08X},\s+// Address Base\s+0x00001000,", body)
        assert re.search(r"Interrupt \(ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, \)", body)
        assert re.search(rf"\{{\s+0x{gsi:08X},\s+\}}", body)


def test_iasl_dsdt_has_com1_and_i8042(mem: GuestMemory, tmp_path: Path) -> None:
    _, dsdt = root_tables(mem, write_acpi_tables(mem, 1, []))[b"DSDT"]
    devices = _devices(_disassemble(tmp_path, "dsdt", dsdt))
    com1, kbd = devices["COM1"], devices["PS2K"]
    assert 'EisaId ("PNP0501")' in com1
    assert re.search(r"IO \(Decode16,\s+0x03F8,\s+// Range Minimum\s+0x03F8,", com1)
    assert re.search(r"0x08,\s+// Length", com1)
    assert re.search(r"\{\s+0x00000004,\s+\}", com1)
    assert 'EisaId ("PNP0303")' in kbd
    assert re.search(r"IO \(Decode16,\s+0x0060,", kbd)
    assert re.search(r"IO \(Decode16,\s+0x0064,", kbd)
    assert re.search(r"\{\s+0x00000001,\s+\}", kbd)
    assert not [name for name in devices if name.startswith("VR")]


def test_iasl_recompiles_the_dsdt_disassembly(mem: GuestMemory, tmp_path: Path) -> None:
    """ACPICA's compiler accepts what its disassembler made of our AML, with no diagnostics."""
    _, dsdt = root_tables(mem, write_acpi_tables(mem, 2, TWO_DEVICES))[b"DSDT"]
    _disassemble(tmp_path, "dsdt", dsdt)
    proc = subprocess.run(
        [_iasl(), "-oa", "-p", "recompiled", "dsdt.dsl"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "0 Errors, 0 Warnings, 0 Remarks" in log, log
    # Disassembling the recompiled AML gives the same ASL: nothing was lost or misread.
    # (-oa keeps iasl from shortening names; the bytes still differ harmlessly: iasl writes
    # End Tag checksums of 0, "not checksummed", where we compute real ones.)
    again = _disassemble(tmp_path, "recompiled", (tmp_path / "recompiled.aml").read_bytes())
    original = (tmp_path / "dsdt.dsl").read_text()
    assert _strip_comments(again) == _strip_comments(original)
    assert "LNRO0005" in again


def _strip_comments(dsl: str) -> str:
    return re.sub(r"/\*.*?\*/", "", dsl, flags=re.DOTALL)


def test_iasl_reads_methods_packages_and_long_packages(tmp_path: Path) -> None:
    """The encoder parts the DSDT does not use yet, and a 3-byte PkgLength, through ACPICA."""
    body = aml.scope(
        "\\_SB_",
        aml.device(
            "TST0",
            aml.name("_HID", aml.eisa_id("PNP0C02")),
            aml.method("_STA", 0, aml.return_(aml.integer(0x0F))),
            aml.method("ADD1", 1, aml.return_(aml.integer(0x1234_5678_9A)), serialized=True),
            aml.name("PKG0", aml.package(aml.integer(1), aml.string("two"), aml.integer(0x300))),
            aml.name("BIG0", aml.buffer(bytes(range(256)) * 20)),  # 5120 bytes: 3-byte PkgLength
        ),
    )
    dsl = _disassemble(tmp_path, "custom", acpi.sdt(b"SSDT", 2, body))
    assert re.search(r"Method \(_STA, 0, NotSerialized\).*?Return \(0x0F\)", dsl, re.DOTALL)
    assert re.search(r"Method \(ADD1, 1, Serialized\).*?Return \(0x000000123456789A\)", dsl, re.DOTALL)
    assert re.search(r'Package \(0x03\)\s+\{\s+One,\s+"two",\s+0x0300\s+\}', dsl)
    assert re.search(r"Name \(BIG0, Buffer \(0x1400\)", dsl)
    assert 'EisaId ("PNP0C02")' in dsl
