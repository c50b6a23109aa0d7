from __future__ import annotations

import msgpack
import pytest

from shared.boot import cpu_state as cs
from shared.layout import BOOT_GDT_START, BOOT_IDT_START, PDE_START, PDPTE_START, PML4_START, GiB, MiB


def test_page_tables_identity_map_4gib_with_2mib_pages(make_mem) -> None:  # type: ignore[no-untyped-def]
    mem = make_mem(16 * MiB)
    mem.fill(PML4_START, 0x6000, 0xAA)  # stale bytes must not survive
    cs.write_boot_structures(mem)
    assert mem.read_u64(PML4_START) == PDPTE_START | 0x3
    assert mem.read(PML4_START + 8, 4096 - 8) == bytes(4096 - 8)
    for i in range(4):
        assert mem.read_u64(PDPTE_START + 8 * i) == (PDE_START + i * 0x1000) | 0x3
    assert mem.read(PDPTE_START + 32, 4096 - 32) == bytes(4096 - 32)
    for i in (0, 1, 511, 512, 2047):
        assert mem.read_u64(PDE_START + 8 * i) == i * 2 * MiB | 0x80 | 0x2 | 0x1
    assert mem.read_u64(PDE_START + 8 * 2047) == (4 * GiB - 2 * MiB) | 0x83


def walk(mem, vaddr: int) -> int:  # type: ignore[no-untyped-def]
    """Translate `vaddr` through the boot page tables like the MMU would."""
    pml4e = mem.read_u64(PML4_START + 8 * ((vaddr >> 39) & 511))
    assert pml4e & 1
    pdpte = mem.read_u64((pml4e & ~0xFFF) + 8 * ((vaddr >> 30) & 511))
    assert pdpte & 1 and not pdpte & 0x80
    pde = mem.read_u64((pdpte & ~0xFFF) + 8 * ((vaddr >> 21) & 511))
    assert pde & 1 and pde & 0x80
    return (pde & ~0x1FFFFF & (1 << 52) - 1) | vaddr & 0x1FFFFF


@pytest.mark.parametrize("addr", [0x7000, 0x100200, 0x1000000, 0x3FFFFFFF, 0xCFFFF123, 0xFFFFFFFF])
def test_translation_is_identity(make_mem, addr: int) -> None:  # type: ignore[no-untyped-def]
    mem = make_mem(16 * MiB)
    cs.write_boot_structures(mem)
    assert walk(mem, addr) == addr


def test_gdt_descriptors(make_mem) -> None:  # type: ignore[no-untyped-def]
    mem = make_mem(16 * MiB)
    cs.write_boot_structures(mem)
    gdt = [mem.read_u64(BOOT_GDT_START + 8 * i) for i in range(4)]
    assert gdt == [0, 0x008F8B000000FFFF, 0x00AF9B000000FFFF, 0x00CF93000000FFFF]
    assert BOOT_GDT_START + 8 * len(gdt) <= BOOT_IDT_START  # does not run into the IDT
    assert mem.read(BOOT_IDT_START, 8) == bytes(8)


def test_gdt_entry_packs_base_and_limit() -> None:
    entry = cs.gdt_entry(0xC093, 0x12345678, 0xABCDE)
    assert entry == 0x12CA_9334_5678_BCDE
    seg = cs.segment_from_gdt(entry, 5)
    assert (seg["base"], seg["limit"], seg["selector"]) == (0x12345678, 0xABCDEFFF, 0x28)


def test_segments_follow_the_64bit_boot_protocol() -> None:
    state = cs.boot_cpu_state(entry=0x1000000, zero_page=0x7000)
    s = state.sregs
    assert s["cs"] == {
        "base": 0, "limit": 0xFFFFFFFF, "selector": 0x10, "type": 0xB, "present": 1, "dpl": 0,
        "db": 0, "s": 1, "l": 1, "g": 1, "avl": 0, "unusable": 0,
    }  # fmt: skip
    for name in ("ds", "es", "fs", "gs", "ss"):
        assert s[name]["selector"] == 0x18
        assert (s[name]["type"], s[name]["db"], s[name]["l"], s[name]["s"], s[name]["present"]) == (3, 1, 0, 1, 1)
        assert s[name]["limit"] == 0xFFFFFFFF
    assert (s["tr"]["selector"], s["tr"]["type"], s["tr"]["s"], s["tr"]["present"]) == (0x08, 0xB, 0, 1)
    assert s["gdt"] == {"base": 0x500, "limit": 31}
    assert s["idt"] == {"base": 0x520, "limit": 7}


def test_control_registers_and_regs() -> None:
    state = cs.boot_cpu_state(entry=0x100200, zero_page=0x7000)
    s = state.sregs
    assert s["cr0"] & 0x80000001 == 0x80000001  # PG | PE
    assert s["cr0"] & 0x60000000 == 0  # caches on: no CD / NW
    assert s["cr3"] == 0x9000
    assert s["cr4"] == 0x20  # PAE
    assert s["efer"] == 0x500  # LME | LMA
    assert state.regs == {"rip": 0x100200, "rsp": 0x8FF0, "rbp": 0x8FF0, "rsi": 0x7000, "rflags": 0x2}
    assert state.fpu == {"fcw": 0x37F, "mxcsr": 0x1F80}


def test_state_round_trips_through_msgpack() -> None:
    state = cs.boot_cpu_state(entry=0x100200, zero_page=0x7000)
    wire = msgpack.unpackb(msgpack.packb(state.to_dict()))
    assert cs.BootCpuState.from_dict(wire) == state
    with pytest.raises(ValueError, match="fpu"):
        cs.BootCpuState.from_dict({"regs": {}, "sregs": {}})


def test_boot_msrs() -> None:
    msrs = dict(cs.boot_msrs())
    zero = [0x174, 0x175, 0x176, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000102, 0x10]
    assert {i: msrs[i] for i in zero} == dict.fromkeys(zero, 0)
    assert msrs[0x1A0] == 1  # IA32_MISC_ENABLE.FAST_STRING
    assert msrs[0x2FF] == 0x806  # MTRRdefType: enabled, write-back
    assert len(msrs) == len(cs.boot_msrs()) == 11


def test_set_lint_sets_delivery_modes_and_keeps_other_bits() -> None:
    regs = bytearray(1024)
    regs[0x350:0x354] = (0x10000 | 0x0400 | 0x20).to_bytes(4, "little")  # masked, mode 4, vector 0x20
    regs[0x360:0x364] = (0x10000 | 0x0700).to_bytes(4, "little")
    regs[0x370:0x374] = b"\xff\xff\xff\xff"
    cs.set_lint(regs)
    assert int.from_bytes(regs[0x350:0x354], "little") == 0x10000 | 0x0700 | 0x20  # ExtINT
    assert int.from_bytes(regs[0x360:0x364], "little") == 0x10000 | 0x0400  # NMI
    assert regs[0x370:0x374] == b"\xff\xff\xff\xff"
    with pytest.raises(ValueError, match="1024"):
        cs.set_lint(bytearray(512))
