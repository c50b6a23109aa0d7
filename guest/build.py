"""Build the test guest: ELF (for the ELF loader) and bzImage.

    python -m guest.build [OUT_DIR]

`build_guest()` compiles guest/src with the machine's gcc into
`<out>/embervm-guest.elf`, flattens it with objcopy into `embervm-guest.bin`
and wraps that into `embervm-guest.bzImage`. It only rebuilds when a source
(or this builder) is newer than the outputs, and fails if the disassembly
holds an instruction the kvm_pvm emulator rejects.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile

from guest.mkbzimage import LOAD_ADDRESS, make_bzimage

GUEST_DIR = Path(__file__).resolve().parent
SRC_DIR = GUEST_DIR / "src"
LINKER_SCRIPT = GUEST_DIR / "linker.ld"
REPO_ROOT = GUEST_DIR.parent
DEFAULT_OUT_DIR = REPO_ROOT / "build" / "guest"
NAME = "embervm-guest"

CFLAGS = [
    "-std=gnu11",
    "-ffreestanding",
    "-nostdlib",
    "-nostdinc",
    "-mgeneral-regs-only",
    "-mno-red-zone",
    "-march=x86-64",
    "-mtune=generic",
    "-fno-pic",
    "-fno-pie",
    "-no-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fcf-protection=none",
    "-fno-tree-loop-distribute-patterns",  # no memset() calls from inside memset()
    "-fno-common",
    "-O2",
    "-static",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wno-unused-parameter",
]
LDFLAGS = [
    "-Wl,--build-id=none",
    "-Wl,-z,noexecstack",
    "-Wl,-z,max-page-size=0x1000",
    "-Wl,--no-warn-rwx-segments",
    f"-Wl,-T,{LINKER_SCRIPT}",
]

# What the kvm_pvm emulator of guest supervisor code rejects (or we must not rely
# on): FPU/SSE state save, popcnt, rdtscp, cmpxchg16b, iret, software interrupts,
# and any SSE/AVX/MMX register.
FORBIDDEN_PATTERNS = [
    r"\bxsave\w*",
    r"\bxrstor\w*",
    r"\bfxsave\w*",
    r"\bfxrstor\w*",
    r"\bpopcnt\w*",
    r"\brdtscp\b",
    r"\bcmpxchg16b\b",
    r"\biret[lqw]?\b",
    r"\bint[13]?\b",
    r"\binto\b",
    r"%[xyz]mm\d+",
    r"%mm\d\b",
    r"%st\b",
]
_FORBIDDEN_RE = re.compile("|".join(f"(?:{p})" for p in FORBIDDEN_PATTERNS))
_INSN_LINE_RE = re.compile(r"^\s*[0-9a-f]+:\t(.*)$")


class GuestBuildError(RuntimeError):
    """The guest could not be built (missing tool, compile error, forbidden instruction)."""


@dataclass(frozen=True)
class GuestImages:
    elf: Path
    bzimage: Path

    @property
    def flat(self) -> Path:
        """The flat binary (image from 1 MiB) the bzImage wraps."""
        return self.elf.with_suffix(".bin")


def source_files() -> list[Path]:
    """Everything the outputs depend on."""
    files = sorted(p for p in SRC_DIR.iterdir() if p.suffix in {".c", ".S", ".h"})
    return [*files, LINKER_SCRIPT, Path(__file__).resolve(), GUEST_DIR / "mkbzimage.py"]


def find_forbidden(disassembly: str) -> list[str]:
    """Lines of `objdump -d --no-show-raw-insn` output whose instruction the guest must not use."""
    bad = []
    for line in disassembly.splitlines():
        # "  100200:\tcli" -> check only the instruction, not addresses or symbol names.
        m = _INSN_LINE_RE.match(line)
        if m and _FORBIDDEN_RE.search(m.group(1).split("<")[0]):
            bad.append(line.strip())
    return bad


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        hint = "install gcc (Debian: apt-get install gcc)" if name == "gcc" else "install binutils"
        raise GuestBuildError(f"{name} not found on PATH; the test guest needs it: {hint}")
    return path


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise GuestBuildError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def _up_to_date(outputs: list[Path]) -> bool:
    try:
        oldest_output = min(p.stat().st_mtime_ns for p in outputs)
    except FileNotFoundError:
        return False
    return max(p.stat().st_mtime_ns for p in source_files()) <= oldest_output


def _image_extent(elf_path: Path) -> tuple[int, int]:
    """(file-backed end, memory end) of the PT_LOAD segments, as addresses."""
    with elf_path.open("rb") as f:
        loads = [s for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD"]
        file_end = max(s["p_paddr"] + s["p_filesz"] for s in loads)
        mem_end = max(s["p_paddr"] + s["p_memsz"] for s in loads)
    return file_end, mem_end


def build_guest(out_dir: Path | None = None) -> GuestImages:
    """Build (or reuse, when up to date) the guest ELF and bzImage in `out_dir`."""
    out_dir = Path(out_dir) if out_dir is not None else DEFAULT_OUT_DIR
    images = GuestImages(elf=out_dir / f"{NAME}.elf", bzimage=out_dir / f"{NAME}.bzImage")
    outputs = [images.elf, images.flat, images.bzimage]
    if _up_to_date(outputs):
        return images

    gcc, objcopy, objdump = _tool("gcc"), _tool("objcopy"), _tool("objdump")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Build under temporary names, then rename: concurrent builders never see half a file.
    tmp = f".tmp{os.getpid()}"
    tmp_elf = images.elf.with_name(images.elf.name + tmp)
    tmp_flat = images.flat.with_name(images.flat.name + tmp)
    tmp_bz = images.bzimage.with_name(images.bzimage.name + tmp)
    try:
        sources = sorted(str(p) for p in SRC_DIR.iterdir() if p.suffix in {".c", ".S"})
        _run([gcc, *CFLAGS, f"-I{SRC_DIR}", *LDFLAGS, *sources, "-o", str(tmp_elf)])

        bad = find_forbidden(_run([objdump, "-d", "--no-show-raw-insn", str(tmp_elf)]))
        if bad:
            raise GuestBuildError("the guest uses instructions the kvm_pvm emulator rejects:\n  " + "\n  ".join(bad))

        _run([objcopy, "-O", "binary", str(tmp_elf), str(tmp_flat)])
        flat = tmp_flat.read_bytes()
        file_end, mem_end = _image_extent(tmp_elf)
        if file_end - LOAD_ADDRESS != len(flat):
            raise GuestBuildError(
                f"flat binary is {len(flat)} bytes, expected {file_end - LOAD_ADDRESS} "
                f"(image must start at {LOAD_ADDRESS:#x})"
            )
        tmp_bz.write_bytes(make_bzimage(flat, mem_end - file_end))

        os.replace(tmp_elf, images.elf)
        os.replace(tmp_flat, images.flat)
        os.replace(tmp_bz, images.bzimage)
    finally:
        for p in (tmp_elf, tmp_flat, tmp_bz):
            p.unlink(missing_ok=True)
    return images


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        images = build_guest(Path(args[0]) if args else None)
    except GuestBuildError as e:
        print(f"guest build failed: {e}", file=sys.stderr)
        return 1
    print(f"elf:     {images.elf}")
    print(f"bzImage: {images.bzimage}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
