"""Debian's real cloud kernel through the loaders (fetched once, see tests/support/linux_kernel.py)."""

from __future__ import annotations

import io

import pytest
from elftools.elf.elffile import ELFFile

from shared.boot.bzimage import XLF_KERNEL_64, parse_setup_header
from shared.boot.elf import load_elf
from shared.boot.loader import load_boot
from shared.boot.vmlinux import MAGICS, detect_compression, extract_vmlinux, payload
from shared.layout import CMDLINE_START, ZERO_PAGE_START, MiB
from tests.support.linux_kernel import KernelFiles, debian_kernel

pytestmark = pytest.mark.linux
MEM = 256 * MiB
# Zero-page bytes inside the setup header that the loader writes itself.
LOADER_FIELDS = {0x210} | set(range(0x218, 0x220)) | set(range(0x228, 0x22C))


@pytest.fixture(scope="module")
def kernel() -> KernelFiles:
    return debian_kernel()


def test_setup_header_is_a_modern_64bit_kernel(kernel: KernelFiles) -> None:
    header = parse_setup_header(kernel.bzimage.read_bytes())
    assert header.version >= 0x020C and header.xloadflags & XLF_KERNEL_64
    assert header.relocatable_kernel and header.pref_address == 0x1000000
    assert detect_compression(payload(kernel.bzimage.read_bytes())) in {name for _, name in MAGICS}


def test_bzimage_lands_at_1mib_with_its_header_in_the_zero_page(make_mem, kernel: KernelFiles, tmp_path) -> None:  # type: ignore[no-untyped-def]
    image = kernel.bzimage.read_bytes()
    header = parse_setup_header(image)
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"07070100" * 4096)
    mem = make_mem(MEM)
    info = load_boot(mem, kernel.bzimage, "console=ttyS0 panic=-1", initrd, MEM)

    pm = image[header.setup_size :]
    assert info.entry == 0x100200
    assert mem.read(0x100000, len(pm)) == pm
    assert info.kernel == (0x100000, header.pref_address + header.init_size)
    assert info.initrd is not None and info.initrd[0] >= info.kernel[1]
    assert info.initrd[0] + info.initrd[1] <= MEM

    zero_page = mem.read(ZERO_PAGE_START, 4096)
    copied = [i for i in range(0x1F1, header.header_end) if i not in LOADER_FIELDS]
    assert [zero_page[i] for i in copied] == [image[i] for i in copied]
    assert zero_page[0x210] == 0xFF
    assert int.from_bytes(zero_page[0x228:0x22C], "little") == CMDLINE_START


def test_extracted_vmlinux_is_an_elf_that_loads_in_ram(make_mem, kernel: KernelFiles) -> None:  # type: ignore[no-untyped-def]
    data = kernel.vmlinux.read_bytes()
    assert extract_vmlinux(kernel.bzimage.read_bytes()) == data
    header = parse_setup_header(kernel.bzimage.read_bytes())
    elf = ELFFile(io.BytesIO(data))
    assert elf["e_machine"] == "EM_X86_64"
    assert 0x100000 <= elf["e_entry"] < MEM

    mem = make_mem(MEM)
    loaded = load_elf(mem, io.BytesIO(data))
    assert loaded.entry == elf["e_entry"] == header.pref_address  # physical startup_64
    assert loaded.end <= header.pref_address + header.init_size  # init_size covers the image
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_LOAD":
            head = data[seg["p_offset"] : seg["p_offset"] + min(seg["p_filesz"], 4096)]
            assert mem.read(seg["p_paddr"], len(head)) == head
