"""Extract the ELF `vmlinux` from a bzImage's compressed payload.

A bzImage carries the kernel ELF compressed; the setup header's payload_offset
(from the start of the protected-mode part) and payload_length locate it. Booting an
ELF vmlinux directly skips the in-guest decompression, and tests use it to check
what the bzImage path does. The compressor is recognised by its magic bytes.

    python -m shared.boot.vmlinux BZIMAGE OUT
"""

from __future__ import annotations

import argparse
import bz2
import lzma
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from shared.boot.bzimage import parse_setup_header
from shared.boot.elf import is_elf
from shared.boot.errors import BootError
from shared.boot.lz4_legacy import Lz4Error, decompress_legacy

# Magic bytes at the start of each compressor's output, as the kernel build makes it.
MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x5d\x00\x00", "lzma"),
    (b"BZh", "bzip2"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x89LZO", "lzo"),
)


def detect_compression(payload: bytes | memoryview) -> str:
    """Name of the compressor that produced `payload`, from its magic bytes."""
    head = bytes(payload[:8])
    for magic, name in MAGICS:
        if head.startswith(magic):
            return name
    raise BootError(f"bzImage payload has an unknown compression format (starts with {head.hex()})")


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...

    def decompress(self, data: bytes) -> bytes: ...


def _stream(decompressor: _Decompressor, data: bytes) -> bytes:
    """Run a stdlib decompressor over `data`, ignoring what follows the stream."""
    out = decompressor.decompress(data)
    if not decompressor.eof:
        raise BootError("bzImage payload ends before its compressed stream does")
    return out


def _zstd(data: bytes) -> bytes:
    try:  # the standard library has zstd from Python 3.14 on
        from compression import zstd  # type: ignore[import-not-found]

        return _stream(zstd.ZstdDecompressor(), data)
    except ImportError:
        pass
    try:
        import zstandard  # type: ignore[import-not-found]
    except ImportError:
        raise BootError(
            "bzImage payload is zstd-compressed: install the 'zstandard' package from PyPI to extract it"
        ) from None
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


def _lz4(data: bytes) -> bytes:
    try:
        return decompress_legacy(data, expected_size=int.from_bytes(data[-4:], "little"))
    except Lz4Error as exc:
        raise BootError(f"bzImage payload: {exc}") from None


def _lzo(data: bytes) -> bytes:
    raise BootError("bzImage payload is LZO-compressed, which this tool does not decompress")


DECOMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda d: _stream(zlib.decompressobj(wbits=31), d),
    "xz": lambda d: _stream(lzma.LZMADecompressor(lzma.FORMAT_XZ), d),
    "lzma": lambda d: _stream(lzma.LZMADecompressor(lzma.FORMAT_ALONE), d),
    "bzip2": lambda d: _stream(bz2.BZ2Decompressor(), d),
    "zstd": _zstd,
    "lz4": _lz4,
    "lzo": _lzo,
}


def payload(bzimage: bytes) -> memoryview:
    """The compressed kernel inside `bzimage`."""
    header = parse_setup_header(bzimage)
    if header.payload_length == 0:
        raise BootError("bzImage has no payload (payload_length is 0)")
    start = header.setup_size + header.payload_offset
    end = start + header.payload_length
    if end > len(bzimage):
        raise BootError(f"bzImage payload [{start:#x}, {end:#x}) runs past the file's {len(bzimage)} bytes")
    return memoryview(bzimage)[start:end]


def decompress(data: bytes | memoryview) -> bytes:
    """Decompress a kernel payload, checking its size against the le32 size trailer.

    The kernel build appends the uncompressed size to every payload (gzip's own
    trailer holds it already), so a short or garbled result is caught here.
    """
    data = bytes(data)
    kind = detect_compression(data)
    try:
        out = DECOMPRESSORS[kind](data)
    except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error) as exc:
        raise BootError(f"bzImage payload ({kind}) does not decompress: {exc}") from exc
    expected = int.from_bytes(data[-4:], "little")
    if len(out) & 0xFFFFFFFF != expected:
        raise BootError(f"bzImage payload ({kind}) gave {len(out)} bytes, its trailer says {expected}")
    return out


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF vmlinux compressed inside `bzimage`."""
    elf = decompress(payload(bzimage))
    if not is_elf(elf):
        raise BootError("bzImage payload decompressed to something that is not an ELF file")
    return elf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.boot.vmlinux", description=__doc__.splitlines()[0])
    parser.add_argument("bzimage", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        data = args.bzimage.read_bytes()
        kind = detect_compression(payload(data))
        elf = extract_vmlinux(data)
    except (BootError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_bytes(elf)
    tmp.replace(args.out)
    print(f"{args.out}: {len(elf)} bytes of ELF vmlinux ({kind}-compressed in {args.bzimage})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
