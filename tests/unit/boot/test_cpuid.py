from __future__ import annotations

import msgpack
import pytest

from shared.boot.cpuid import (
    PVM_UNSAFE_FEATURES,
    BitClear,
    CpuidEntry,
    apply_cpu_template,
    clear_bits,
    normalize,
    parse_bitmap,
    vendor,
)
from shared.boot.errors import BootError


def regs(text: str) -> tuple[int, int, int]:
    """EBX, EDX, ECX holding a 12-character vendor string."""
    raw = text.encode()
    return tuple(int.from_bytes(raw[i : i + 4], "little") for i in (0, 4, 8))  # type: ignore[return-value]


def cache(index: int, level: int, kind: int) -> CpuidEntry:
    # Host values: 2 threads share L1/L2, 64 share L3, 32 cores per package.
    sharing = 1 if level <= 2 else 63
    eax = 31 << 26 | sharing << 14 | level << 5 | kind if kind else 0
    return CpuidEntry(4, index, 1, eax, 0x01C0003F, 0x3F, 0)


def host(vendor_name: str = "GenuineIntel") -> list[CpuidEntry]:
    ebx, edx, ecx = regs(vendor_name)
    return [
        CpuidEntry(0, 0, 0, 0x1F, ebx, ecx, edx),
        CpuidEntry(1, 0, 0, 0x000906EA, 0x07100800, 0x7FFAFBFF, 0xBFEBFBFF),
        cache(0, 1, 1),
        cache(1, 1, 2),
        cache(2, 2, 3),
        cache(3, 3, 3),
        cache(4, 0, 0),
        CpuidEntry(0xB, 0, 1, 1, 2, 0x100, 7),
        CpuidEntry(0xB, 1, 1, 6, 64, 0x201, 7),
        CpuidEntry(0x40000000, 0, 0, 0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D),
        CpuidEntry(0x40000001, 0, 0, 0x01007AFB, 0, 0, 0),
        CpuidEntry(0x80000000, 0, 0, 0x80000008, 0, 0, 0),
        CpuidEntry(0x80000001, 0, 0, 0, 0, 0x121, 0x2C100800),
        CpuidEntry(0x80000008, 0, 0, 0x3030, 0, 0x703F, 0),
    ]


def find(entries: list[CpuidEntry], function: int, index: int = 0) -> CpuidEntry:
    (entry,) = [e for e in entries if e.function == function and e.index == index]
    return entry


@pytest.mark.parametrize(("index", "count"), [(0, 1), (3, 4), (31, 32)])
def test_leaf1_apic_id_count_htt_and_hypervisor_bit(index: int, count: int) -> None:
    leaf1 = find(normalize(host(), index, count), 1)
    assert leaf1.ebx >> 24 == index
    assert (leaf1.ebx >> 16) & 0xFF == count
    assert leaf1.ebx & 0xFFFF == 0x0800  # CLFLUSH line size kept
    assert leaf1.ecx & 1 << 31
    assert bool(leaf1.edx & 1 << 28) == (count > 1)
    assert leaf1.eax == 0x000906EA


def test_leaf4_describes_cores_and_sharing() -> None:
    out = normalize(host(), 1, 4)
    l1d, l2, l3, end = find(out, 4, 0), find(out, 4, 2), find(out, 4, 3), find(out, 4, 4)
    assert l1d.eax >> 26 == 3  # 4 cores - 1
    assert (l1d.eax >> 14) & 0xFFF == 0  # 1 thread per core shares L1
    assert (l2.eax >> 14) & 0xFFF == 0
    assert (l3.eax >> 14) & 0xFFF == 3  # all 4 vCPUs share L3
    assert l1d.eax & 0x3FFF == 1 << 5 | 1  # level and type kept
    assert end.eax == 0


def test_smt_topology_two_threads_per_core() -> None:
    out = normalize(host(), 5, 8, smt=True)
    assert find(out, 4, 0).eax >> 26 == 3  # 4 cores
    assert (find(out, 4, 0).eax >> 14) & 0xFFF == 1  # 2 threads share L1
    smt, core, end = find(out, 0xB, 0), find(out, 0xB, 1), find(out, 0xB, 2)
    assert (smt.eax, smt.ebx, smt.ecx, smt.edx) == (1, 2, 0x100, 5)
    assert (core.eax, core.ebx, core.ecx, core.edx) == (3, 8, 0x201, 5)
    assert (end.eax, end.ebx, end.ecx & 0xFF00, end.edx) == (0, 0, 0, 5)
    with pytest.raises(BootError, match="even"):
        normalize(host(), 0, 3, smt=True)


def test_leaf_0xb_without_smt() -> None:
    out = normalize(host(), 2, 3)
    smt, core = find(out, 0xB, 0), find(out, 0xB, 1)
    assert (smt.eax, smt.ebx, smt.ecx, smt.edx) == (0, 1, 0x100, 2)
    assert (core.eax, core.ebx, core.ecx, core.edx) == (2, 3, 0x201, 2)
    assert all(e.flags & 1 for e in out if e.function == 0xB)


def test_other_leaves_kept_hypervisor_leaves_included() -> None:
    before = host()
    out = normalize(before, 0, 2)
    for function in (0, 0x40000000, 0x40000001, 0x80000000, 0x80000001, 0x80000008):
        assert find(out, function) == find(before, function)
    assert vendor(out) == "GenuineIntel"
    assert before == host()  # input not modified


def test_amd_topology_leaves() -> None:
    entries = [*host("AuthenticAMD"), CpuidEntry(0x8000001E, 0, 0, 0, 0x100, 0x300, 0)]
    out = normalize(entries, 3, 6)
    assert find(out, 0x80000008).ecx == 0x3005  # ApicIdSize 3, NC 5
    ext = find(out, 0x8000001E)
    assert (ext.eax, ext.ebx, ext.ecx) == (3, 3, 0)


@pytest.mark.parametrize(("index", "count"), [(0, 0), (2, 2), (0, 33), (-1, 4)])
def test_bad_vcpu_numbers_are_rejected(index: int, count: int) -> None:
    with pytest.raises(BootError, match="vCPU"):
        normalize(host(), index, count)


def test_clear_bits_by_leaf_subleaf_and_register() -> None:
    entries = host()
    out = clear_bits(entries, [(1, None, "ecx", 1 << 13 | 1 << 0), BitClear(4, 3, "ebx", 0xFFFF)])
    assert find(out, 1).ecx == find(entries, 1).ecx & ~(1 << 13 | 1)
    assert find(out, 4, 3).ebx == 0x01C00000
    assert find(out, 4, 2).ebx == 0x01C0003F  # other subleaf untouched
    with pytest.raises(BootError, match="unknown CPUID register"):
        clear_bits(entries, [(1, None, "esi", 1)])


def test_pvm_unsafe_features() -> None:
    out = clear_bits(normalize(host(), 0, 1), PVM_UNSAFE_FEATURES)
    for bit in (13, 23, 26, 27, 28):
        assert not find(out, 1).ecx & 1 << bit
    assert not find(out, 0x80000001).edx & 1 << 27
    assert find(out, 1).ecx & 1 << 31  # hypervisor bit survives
    assert find(out, 0x80000001).edx & 1 << 11  # SYSCALL untouched


def test_parse_bitmap() -> None:
    assert parse_bitmap("0b1x0") == (0b101, 0b100)
    assert parse_bitmap("0b" + "x" * 32) == (0, 0)
    assert parse_bitmap("0b1111_0000") == (0xFF, 0xF0)
    assert parse_bitmap("0b1" + "x" * 31) == (1 << 31, 1 << 31)
    for bad in ("1x0", "0b", "0b12", "0b" + "1" * 33):
        with pytest.raises(BootError, match="bitmap"):
            parse_bitmap(bad)


def test_firecracker_template_sets_clears_and_keeps() -> None:
    template = {
        "cpuid_modifiers": [
            {
                "leaf": "0x1",
                "subleaf": "0x0",
                "flags": 0,
                "modifiers": [{"register": "eax", "bitmap": "0bxxxx000000000011xx00011011110010"}],
            },
            {"leaf": "0x7", "subleaf": "0x0", "flags": 1, "modifiers": [{"register": "ebx", "bitmap": "0b1"}]},
        ]
    }
    entries = [CpuidEntry(1, 0, 0, 0xFFFFFFFF, 1, 2, 3)]
    out = apply_cpu_template(entries, template)
    leaf1 = find(out, 1)
    # Firecracker's doc: clear 0b00001111111111000011100100001101, set 0b00000000000000110000011011110010.
    assert leaf1.eax == 0xFFFFFFFF & ~0b00001111111111000011100100001101 | 0b00000000000000110000011011110010
    assert (leaf1.ebx, leaf1.ecx, leaf1.edx) == (1, 2, 3)
    assert find(out, 7) == CpuidEntry(7, 0, 1, 0, 1, 0, 0)  # missing leaf added


def test_malformed_template_is_rejected() -> None:
    with pytest.raises(BootError, match="malformed"):
        apply_cpu_template([], {"cpuid_modifiers": [{"leaf": "0x1"}]})
    with pytest.raises(BootError, match="not a number"):
        apply_cpu_template([], {"cpuid_modifiers": [{"leaf": "one", "subleaf": 0, "modifiers": []}]})


def test_entries_round_trip_through_msgpack() -> None:
    entries = host()
    wire = msgpack.unpackb(msgpack.packb([e.to_dict() for e in entries]))
    assert [CpuidEntry.from_dict(d) for d in wire] == entries
