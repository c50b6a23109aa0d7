"""Load an uncompressed ELF64 x86-64 kernel (`vmlinux`) into guest memory.

Each PT_LOAD segment goes to its physical address (p_paddr): a vmlinux links at a
high virtual address but its program headers carry the physical load address, and
its e_entry is the physical address of startup_64, the 64-bit boot entry point.
"""

from __future__ import annotations

from typing import BinaryIO

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from shared.boot.errors import BootError
from shared.boot.kernel import LoadedKernel, check_kernel_range
from shared.memory import GuestMemory

ELF_MAGIC = b"\x7fELF"
_COPY_CHUNK = 4 * 1024 * 1024


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def _open(stream: BinaryIO) -> ELFFile:
    try:
        elf = ELFFile(stream)
    except ELFError as exc:
        raise BootError(f"kernel is not a valid ELF file: {exc}") from exc
    if elf.elfclass != 64 or not elf.little_endian:
        raise BootError(f"kernel ELF is {elf.elfclass}-bit, expected a little-endian ELF64 vmlinux")
    if elf["e_machine"] != "EM_X86_64":
        raise BootError(f"kernel ELF is for {elf['e_machine']}, expected EM_X86_64")
    if elf["e_type"] != "ET_EXEC":
        raise BootError(f"kernel ELF type is {elf['e_type']}, expected ET_EXEC (a vmlinux)")
    return elf


def load_elf(mem: GuestMemory, stream: BinaryIO) -> LoadedKernel:
    """Copy the PT_LOAD segments of the vmlinux in `stream` into `mem`.

    All segments are validated before the first byte is written, so a bad image
    leaves guest memory untouched.
    """
    elf = _open(stream)
    segments = []
    for index, seg in enumerate(elf.iter_segments()):
        if seg["p_type"] != "PT_LOAD" or seg["p_memsz"] == 0:
            continue
        paddr, filesz, memsz = seg["p_paddr"], seg["p_filesz"], seg["p_memsz"]
        if filesz > memsz:
            raise BootError(f"kernel segment {index}: p_filesz {filesz:#x} > p_memsz {memsz:#x}")
        check_kernel_range(mem, f"kernel segment {index}", paddr, paddr + memsz)
        segments.append((paddr, filesz, memsz, seg["p_offset"]))
    if not segments:
        raise BootError("kernel ELF has no PT_LOAD segment")
    start = min(s[0] for s in segments)
    end = max(s[0] + s[2] for s in segments)
    entry = elf["e_entry"]
    if not any(paddr <= entry < paddr + memsz for paddr, _, memsz, _ in segments):
        raise BootError(f"kernel ELF entry {entry:#x} is outside its loaded segments")

    for paddr, filesz, memsz, offset in segments:
        _copy(stream, offset, filesz, mem, paddr)
        mem.fill(paddr + filesz, memsz - filesz)
    return LoadedKernel(entry=entry, start=start, end=end, setup_header=None)


def _copy(stream: BinaryIO, offset: int, size: int, mem: GuestMemory, addr: int) -> None:
    """Stream `size` bytes from file `offset` into guest memory, in chunks."""
    stream.seek(offset)
    done = 0
    while done < size:
        chunk = stream.read(min(_COPY_CHUNK, size - done))
        if not chunk:
            raise BootError(f"kernel ELF is truncated: segment data at {offset:#x} ends early")
        mem.write(addr + done, chunk)
        done += len(chunk)
