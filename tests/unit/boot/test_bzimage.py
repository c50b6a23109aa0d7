from __future__ import annotations

import dataclasses

import pytest

from shared.boot.bzimage import decompression_range, load_bzimage, parse_setup_header
from shared.boot.errors import BootError
from shared.layout import MiB

from .images import BzImageSpec, make_bzimage


def test_header_fields_are_decoded() -> None:
    spec = BzImageSpec(setup_sects=27, payload=b"P" * 100, init_size=0x1234000)
    h = parse_setup_header(make_bzimage(spec))
    assert h.setup_sects == 27 and h.setup_size == 28 * 512
    assert (h.boot_flag, h.header, h.version, h.version_str) == (0xAA55, b"HdrS", 0x020F, "2.15")
    assert (h.loadflags, h.code32_start, h.xloadflags) == (1, 0x100000, 3)
    assert (h.initrd_addr_max, h.kernel_alignment, h.relocatable_kernel) == (0x7FFFFFFF, 0x200000, True)
    assert (h.cmdline_size, h.pref_address, h.init_size) == (2047, 0x1000000, 0x1234000)
    assert (h.payload_offset, h.payload_length) == (len(spec.pm_code), 100)
    assert h.syssize == (len(spec.pm_code) + 100 + 15) // 16
    assert len(h.raw) == 0x26C - 0x1F1 and h.raw[0x202 - 0x1F1 :][:4] == b"HdrS"


def test_setup_sects_zero_means_four() -> None:
    assert parse_setup_header(make_bzimage(BzImageSpec(setup_sects=0))).setup_size == 5 * 512


@pytest.mark.parametrize(
    "spec",
    [BzImageSpec(version=0x020B), BzImageSpec(version=0x0206, xloadflags=0), BzImageSpec(xloadflags=0x2)],
)
def test_old_protocol_or_no_64bit_entry_is_rejected(spec: BzImageSpec) -> None:
    v = spec.version
    with pytest.raises(BootError, match=rf"bzImage boot protocol {v >> 8}\.{v & 0xFF} too old \(need 2\.12"):
        parse_setup_header(make_bzimage(spec))


def test_bad_boot_flag_and_missing_magic_are_rejected() -> None:
    with pytest.raises(BootError, match="boot_flag"):
        parse_setup_header(make_bzimage(BzImageSpec(boot_flag=0x1234)))
    image = bytearray(make_bzimage())
    image[0x202:0x206] = b"HdrX"
    with pytest.raises(BootError, match="HdrS"):
        parse_setup_header(bytes(image))


def test_truncated_setup_is_rejected() -> None:
    with pytest.raises(BootError, match="truncated"):
        parse_setup_header(make_bzimage(BzImageSpec(setup_sects=30))[:0x400])


def test_protected_mode_part_loads_at_1mib_with_entry_0x200_in(make_mem) -> None:  # type: ignore[no-untyped-def]
    mem = make_mem(64 * MiB)
    spec = BzImageSpec(setup_sects=3, payload=b"compressed" * 50)
    image = make_bzimage(spec)
    kernel = load_bzimage(mem, image)
    pm = spec.pm_code + spec.payload
    assert mem.read(0x100000, len(pm)) == pm
    assert mem.read(0x100000 - 16, 16) == bytes(16)  # real-mode setup is not loaded
    assert kernel.entry == 0x100200
    assert kernel.start == 0x100000
    assert kernel.end == 0x1000000 + spec.init_size  # decompression buffer at pref_address
    assert kernel.setup_header == image[0x1F1:0x26C]
    assert (kernel.initrd_addr_max, kernel.cmdline_size) == (0x7FFFFFFF, 2047)


def test_decompression_buffer_follows_alignment_and_pref_address() -> None:
    spec = BzImageSpec(init_size=0x100000)
    assert decompression_range(parse_setup_header(make_bzimage(spec)), 0x100000) == (0x1000000, 0x1100000)
    high = parse_setup_header(make_bzimage(dataclasses.replace(spec, pref_address=0)))
    assert decompression_range(high, 0x2100000) == (0x2200000, 0x2300000)  # aligned up to 2 MiB


def test_init_size_must_fit_in_memory(make_mem) -> None:  # type: ignore[no-untyped-def]
    mem = make_mem(32 * MiB)
    with pytest.raises(BootError, match=r"needs 20 MiB \(init_size\) at 0x1000000.*\(32 MiB\)"):
        load_bzimage(mem, make_bzimage(BzImageSpec(init_size=20 * MiB)))
    load_bzimage(mem, make_bzimage(BzImageSpec(init_size=16 * MiB)))  # exactly fits


def test_too_small_protected_mode_part_is_rejected(make_mem) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BootError, match="no 64-bit entry"):
        load_bzimage(make_mem(32 * MiB), make_bzimage(BzImageSpec(pm_code=b"x" * 0x100)))
