from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import subprocess
from pathlib import Path

import pytest

from shared.boot.errors import BootError
from shared.boot.lz4_legacy import LEGACY_MAGIC, Lz4Error, decode_block, decompress_legacy
from shared.boot.vmlinux import decompress, detect_compression, extract_vmlinux, main, payload

from .images import BzImageSpec, Segment, make_bzimage, make_elf

ELF = make_elf([Segment(0x1000000, bytes(range(256)) * 64, memsz=0x8000)], entry=0x1000000)


def with_size(data: bytes, size: int = len(ELF)) -> bytes:
    """What the kernel build does to every payload: append the le32 uncompressed size."""
    return data + size.to_bytes(4, "little")


def lz4_literals_block(data: bytes) -> bytes:
    """An LZ4 block holding `data` as one run of literals (valid, if not compressed)."""
    n = len(data) - 15
    ext = b""
    if n >= 0:
        ext = b"\xff" * (n // 255) + bytes([n % 255])
    return bytes([min(len(data), 15) << 4]) + ext + data


def lz4_legacy(data: bytes) -> bytes:
    block = lz4_literals_block(data)
    return LEGACY_MAGIC + len(block).to_bytes(4, "little") + block


PAYLOADS = {
    "gzip": gzip.compress(ELF),
    "xz": with_size(lzma.compress(ELF, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)),
    "lzma": with_size(lzma.compress(ELF, format=lzma.FORMAT_ALONE)),
    "bzip2": with_size(bz2.compress(ELF)),
    "lz4": with_size(lz4_legacy(ELF)),
}


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_extract_vmlinux_for_each_stdlib_or_builtin_format(kind: str) -> None:
    image = make_bzimage(BzImageSpec(payload=PAYLOADS[kind]))
    assert detect_compression(payload(image)) == kind
    assert extract_vmlinux(image) == ELF


def test_payload_is_located_from_the_setup_header() -> None:
    spec = BzImageSpec(setup_sects=9, payload=b"\x1f\x8bPAYLOAD")
    image = make_bzimage(spec) + b"trailing"
    assert bytes(payload(image)) == b"\x1f\x8bPAYLOAD"


def test_size_trailer_mismatch_is_caught() -> None:
    bad = with_size(lzma.compress(ELF, format=lzma.FORMAT_XZ), size=len(ELF) + 1)
    with pytest.raises(BootError, match="trailer says"):
        decompress(bad)


def test_corrupt_payload_is_a_boot_error() -> None:
    data = bytearray(PAYLOADS["xz"])
    data[40:60] = bytes(20)
    with pytest.raises(BootError, match=r"payload \(xz\) does not decompress"):
        decompress(bytes(data))


def test_unknown_lzo_and_non_elf_payloads() -> None:
    with pytest.raises(BootError, match="unknown compression format"):
        detect_compression(b"\x00\x01\x02\x03")
    with pytest.raises(BootError, match="LZO"):
        decompress(b"\x89LZO\x00" + bytes(8))
    not_elf = make_bzimage(BzImageSpec(payload=gzip.compress(b"just some bytes")))
    with pytest.raises(BootError, match="not an ELF"):
        extract_vmlinux(not_elf)


def test_zstd_needs_a_package_or_python_3_14() -> None:
    try:
        from compression import zstd  # type: ignore[import-not-found]

        compress = zstd.compress
    except ImportError:
        try:
            import zstandard  # type: ignore[import-not-found]

            compress = zstandard.ZstdCompressor().compress
        except ImportError:
            with pytest.raises(BootError, match="install the 'zstandard' package"):
                decompress(b"\x28\xb5\x2f\xfd" + bytes(16))
            return
    assert decompress(with_size(compress(ELF))) == ELF


def test_lz4_block_with_overlapping_match() -> None:
    # 'ab' literal, then a match of 4+3=7 bytes at offset 2, then literal 'Z'.
    block = bytes([0x23]) + b"ab" + b"\x02\x00" + bytes([0x10]) + b"Z"
    assert decode_block(block) == b"ab" + b"abababa" + b"Z"
    # Long match with extension bytes: offset 1, length 15 + 255 + 10 + 4.
    block = bytes([0x1F]) + b"x" + b"\x01\x00" + b"\xff\x0a"
    assert decode_block(block) == b"x" * (1 + 15 + 255 + 10 + 4)


def test_lz4_errors() -> None:
    with pytest.raises(Lz4Error, match="before the start"):
        decode_block(bytes([0x10]) + b"a" + b"\x05\x00")
    with pytest.raises(Lz4Error, match="literals run past"):
        decode_block(bytes([0x50]) + b"ab")
    with pytest.raises(Lz4Error, match="bad magic"):
        decompress_legacy(b"\x00" * 8)


@pytest.mark.skipif(shutil.which("lz4") is None, reason="the lz4 command is not installed")
def test_lz4_command_legacy_output_decodes(tmp_path: Path) -> None:
    data = (b"kernel text " * 5000) + bytes(range(256)) * 100
    out = subprocess.run(["lz4", "-l", "-c", "-9"], input=data, capture_output=True, check=True).stdout
    assert decompress_legacy(out) == data


def test_cli_writes_the_vmlinux(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = tmp_path / "bzImage", tmp_path / "vmlinux"
    src.write_bytes(make_bzimage(BzImageSpec(payload=PAYLOADS["lz4"])))
    assert main([str(src), str(dst)]) == 0
    assert dst.read_bytes() == ELF
    assert "lz4-compressed" in capsys.readouterr().out
    src.write_bytes(b"not a kernel" * 100)
    assert main([str(src), str(dst)]) == 1
    assert "HdrS" in capsys.readouterr().err
