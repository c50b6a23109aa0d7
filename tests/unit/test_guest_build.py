"""The test guest builds into a loadable ELF and a valid bzImage, free of forbidden instructions."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.constants import P_FLAGS
from elftools.elf.elffile import ELFFile

from guest import build as guest_build
from guest.build import GuestBuildError, GuestImages, build_guest, find_forbidden
from guest.mkbzimage import make_bzimage

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")

ENTRY = 0x100200
LOAD = 0x100000


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> GuestImages:
    return build_guest(tmp_path_factory.mktemp("guest"))


def _header(bz: bytes) -> dict[str, int | bytes]:
    def u(fmt: str, off: int) -> int:
        return struct.unpack_from("<" + fmt, bz, off)[0]

    return {
        "setup_sects": u("B", 0x1F1),
        "syssize": u("I", 0x1F4),
        "boot_flag": u("H", 0x1FE),
        "jump": bz[0x200:0x202],
        "header": bz[0x202:0x206],
        "version": u("H", 0x206),
        "loadflags": u("B", 0x211),
        "code32_start": u("I", 0x214),
        "kernel_alignment": u("I", 0x230),
        "relocatable_kernel": u("B", 0x234),
        "xloadflags": u("H", 0x236),
        "cmdline_size": u("I", 0x238),
        "payload_offset": u("I", 0x248),
        "payload_length": u("I", 0x24C),
        "pref_address": u("Q", 0x258),
        "init_size": u("I", 0x260),
        "kernel_info_offset": u("I", 0x268),
    }


def test_elf_is_x86_64_with_entry_and_load_at_1mib(images: GuestImages) -> None:
    with images.elf.open("rb") as f:
        elf = ELFFile(f)
        assert elf.elfclass == 64
        assert elf["e_machine"] == "EM_X86_64"
        assert elf["e_type"] == "ET_EXEC"
        assert elf["e_entry"] == ENTRY
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert loads, "no PT_LOAD segment"
        assert min(s["p_paddr"] for s in loads) == LOAD
        for seg in loads:
            assert seg["p_paddr"] == seg["p_vaddr"]
        first = min(loads, key=lambda s: s["p_paddr"])
        assert first["p_flags"] & P_FLAGS.PF_X
        assert first["p_paddr"] + first["p_filesz"] > ENTRY
        symbols = elf.get_section_by_name(".symtab")
        assert symbols.get_symbol_by_name("_start64")[0]["st_value"] == ENTRY
        # The page tables, stack and bss all lie inside the first GiB the VMM maps.
        assert max(s["p_paddr"] + s["p_memsz"] for s in loads) < 1 << 30


def test_flat_binary_matches_elf_segments(images: GuestImages) -> None:
    flat = images.flat.read_bytes()
    with images.elf.open("rb") as f:
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] != "PT_LOAD":
                continue
            off = seg["p_paddr"] - LOAD
            assert flat[off : off + seg["p_filesz"]] == seg.data()
    # The 64-bit entry starts with `cli` (0xfa), the 32-bit stub too.
    assert flat[0x200] == 0xFA
    assert flat[0] == 0xFA


def test_bzimage_header(images: GuestImages) -> None:
    bz = images.bzimage.read_bytes()
    flat = images.flat.read_bytes()
    h = _header(bz)
    assert h["boot_flag"] == 0xAA55
    assert h["header"] == b"HdrS"
    assert h["version"] >= 0x020C
    assert h["version"] == 0x020F
    assert h["jump"][0] == 0xEB
    assert h["loadflags"] & 0x01  # LOADED_HIGH
    assert h["xloadflags"] & 0x01  # XLF_KERNEL_64
    assert h["code32_start"] == LOAD
    assert h["pref_address"] == LOAD
    assert h["relocatable_kernel"] == 0
    assert h["kernel_alignment"] > 0
    assert h["kernel_alignment"] & (h["kernel_alignment"] - 1) == 0
    assert h["cmdline_size"] == 2047
    assert h["payload_offset"] == 0
    assert h["payload_length"] == 0

    setup_sects = h["setup_sects"] or 4
    pm_offset = (setup_sects + 1) * 512
    protected = bz[pm_offset:]
    assert h["syssize"] * 16 == len(protected)
    assert protected[: len(flat)] == flat
    assert protected[len(flat) :] == bytes(len(protected) - len(flat))

    with images.elf.open("rb") as f:
        mem_end = max(s["p_paddr"] + s["p_memsz"] for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD")
    assert h["init_size"] >= mem_end - LOAD

    ki = h["kernel_info_offset"]
    assert protected[ki : ki + 4] == b"LToP"
    size, size_total = struct.unpack_from("<II", protected, ki + 4)
    assert 12 <= size <= size_total


def test_no_forbidden_instructions(images: GuestImages) -> None:
    objdump = shutil.which("objdump")
    assert objdump
    disasm = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", str(images.elf)], capture_output=True, text=True, check=True
    ).stdout
    assert "<_start64>:" in disasm
    assert find_forbidden(disasm) == []
    assert "xmm" not in disasm


def test_forbidden_instruction_checker_catches_each_kind() -> None:
    bad = [
        "  100300:\tfxsave (%rax)",
        "  100301:\txsaveopt (%rdi)",
        "  100302:\tmovaps %xmm0,%xmm1",
        "  100303:\tiretq",
        "  100304:\tint    $0x80",
        "  100305:\tpopcnt %rax,%rax",
        "  100306:\trdtscp",
        "  100307:\tlock cmpxchg16b (%rsi)",
        "  100308:\tfxrstor64 (%rax)",
        "  100309:\tint3",
    ]
    good = [
        "  100400:\tcall   100500 <save_xsave_area>",
        "  100401:\tmov    %rax,%rbx",
        "  100402:\trdtsc",
        "  100403:\tcmpxchg %rcx,(%rdx)",
        "0000000000100200 <interrupt_iretq_helper>:",
    ]
    found = find_forbidden("\n".join(bad + good))
    assert [line.split(":", 1)[0] for line in found] == [line.split(":", 1)[0].strip() for line in bad]


def test_build_is_idempotent(images: GuestImages) -> None:
    before = [p.stat().st_mtime_ns for p in (images.elf, images.flat, images.bzimage)]
    again = build_guest(images.elf.parent)
    assert again == images
    assert [p.stat().st_mtime_ns for p in (images.elf, images.flat, images.bzimage)] == before


def test_build_reruns_when_a_source_is_newer(tmp_path: Path) -> None:
    images = build_guest(tmp_path)
    # An output older than every source (1970) must be rebuilt.
    os.utime(images.elf, ns=(10**9, 10**9))
    build_guest(tmp_path)
    assert images.elf.stat().st_mtime_ns > 10**9


def test_missing_gcc_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(GuestBuildError, match="gcc not found"):
        build_guest(tmp_path / "out")


def test_build_rejects_forbidden_instruction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    shutil.copytree(guest_build.SRC_DIR, src)
    (src / "bad.c").write_text(
        "void use_popcnt(unsigned long x);\n"
        'void use_popcnt(unsigned long x) { __asm__ volatile("popcnt %0, %0" : "+r"(x)); }\n'
    )
    monkeypatch.setattr(guest_build, "SRC_DIR", src)
    with pytest.raises(GuestBuildError, match="popcnt"):
        build_guest(tmp_path / "out")
    assert not (tmp_path / "out" / "embervm-guest.elf").exists()


def test_make_bzimage_layout() -> None:
    flat = bytes([0xFA]) + bytes(0x1FF) + bytes([0xFA, 0xF4]) + b"x" * 13  # 0x20f bytes, not 16-aligned
    bz = make_bzimage(flat, 0x3000)
    h = _header(bz)
    pm = bz[(h["setup_sects"] + 1) * 512 :]
    assert len(pm) == 0x210
    assert h["syssize"] == 0x21
    assert pm[: len(flat)] == flat
    assert h["init_size"] == 0x4000
    assert h["kernel_info_offset"] == 0  # no "LToP" in this image
    with pytest.raises(ValueError):
        make_bzimage(b"\x00" * 16, 0)


def _registered_tests(elf_path: Path) -> list[str]:
    """Names in the GUEST_TEST registry (struct guest_test {const char *name; void (*run)(void);})."""
    with elf_path.open("rb") as f:
        elf = ELFFile(f)
        symtab = elf.get_section_by_name(".symtab")
        start = symtab.get_symbol_by_name("__guest_tests_start")[0]["st_value"]
        end = symtab.get_symbol_by_name("__guest_tests_end")[0]["st_value"]
        rodata = elf.get_section_by_name(".rodata")
        base, data = rodata["sh_addr"], rodata.data()
        names = []
        for entry in range(start, end, 16):
            name_ptr = struct.unpack_from("<Q", data, entry - base)[0]
            names.append(data[name_ptr - base : data.index(b"\0", name_ptr - base)].decode())
    return names


def test_registry_holds_the_builtin_and_driver_tests(images: GuestImages) -> None:
    names = _registered_tests(images.elf)

    assert {"boot", "echo", "loop", "triple", "portio", "irq", "blk"} <= set(names)
    assert len(names) == len(set(names))


def test_interrupt_stubs_are_16_bytes_apart_and_return_without_iret(images: GuestImages) -> None:
    objdump = shutil.which("objdump")
    assert objdump
    with images.elf.open("rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        stubs = symtab.get_symbol_by_name("irq_stubs")[0]["st_value"]
        dispatch = symtab.get_symbol_by_name("irq_dispatch")[0]["st_value"]
    assert stubs % 16 == 0
    disasm = subprocess.run(
        [
            objdump,
            "-d",
            "--no-show-raw-insn",
            f"--start-address={stubs:#x}",
            f"--stop-address={stubs + 256 * 16 + 0x100:#x}",
            str(images.elf),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    insns = [m.group(1).split() for line in disasm.splitlines() if (m := guest_build._INSN_LINE_RE.match(line))]
    addrs = [int(line.split(":")[0], 16) for line in disasm.splitlines() if guest_build._INSN_LINE_RE.match(line)]
    # Each vector's stub starts on its 16-byte slot and pushes its vector number.
    for vector in (0, 8, 14, 32, 0x35, 0xEF, 0xFF):
        slot = addrs.index(stubs + 16 * vector)
        pushes = [i for i in insns[slot : slot + 3] if i[0] == "push"]
        assert pushes[-1][1] == f"${vector:#x}"
    # #PF (14) comes with a CPU error code: no dummy push; vector 32 has one.
    assert [i[0] for i in insns[addrs.index(stubs + 16 * 14) :][:2]] == ["push", "jmp"]
    assert [i[0] for i in insns[addrs.index(stubs + 16 * 32) :][:3]] == ["push", "push", "jmp"]
    # The common path calls irq_dispatch and ends "popf; ret".
    ops = [i[0] for i in insns]
    assert any(i[0] == "call" and int(i[1], 16) == dispatch for i in insns if len(i) > 1 and i[0] == "call")
    end = ops.index("popf") if "popf" in ops else ops.index("popfq")
    assert ops[end + 1].startswith("ret")
