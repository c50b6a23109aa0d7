"""A pure-Python decoder for LZ4's legacy frame format, the one Linux uses.

Debian compresses its kernels with LZ4 (CONFIG_KERNEL_LZ4), and the kernel build
writes LZ4's *legacy* format (`lz4 -l`): a magic number, then blocks of
[le32 compressed size][LZ4 block], each decompressing on its own to at most 8 MiB.
Kernel data decodes in long runs, so plain Python is fast enough here (about a
second for Debian's 53 MB vmlinux) and no binary package is needed.
"""

from __future__ import annotations

LEGACY_MAGIC = b"\x02\x21\x4c\x18"  # 0x184C2102, little-endian
LEGACY_BLOCK_MAX = 8 * 1024 * 1024


class Lz4Error(ValueError):
    """The data is not valid LZ4 legacy-format data."""


def decode_block(src: bytes | memoryview) -> bytearray:
    """Decode one raw LZ4 block (https://github.com/lz4/lz4 lz4_Block_format.md)."""
    src = bytes(src)
    out = bytearray()
    i, n = 0, len(src)
    try:
        while i < n:
            token = src[i]
            i += 1
            length = token >> 4
            if length == 15:
                while True:
                    byte = src[i]
                    i += 1
                    length += byte
                    if byte != 255:
                        break
            if length:
                if i + length > n:
                    raise Lz4Error("LZ4 literals run past the end of the block")
                out += src[i : i + length]
                i += length
            if i >= n:  # the last sequence holds literals only
                break
            offset = src[i] | src[i + 1] << 8
            i += 2
            length = token & 15
            if length == 15:
                while True:
                    byte = src[i]
                    i += 1
                    length += byte
                    if byte != 255:
                        break
            length += 4
            start = len(out) - offset
            if offset == 0 or start < 0:
                raise Lz4Error(f"LZ4 match offset {offset} points before the start of the block")
            if offset >= length:
                out += out[start : start + length]
            else:  # overlapping copy: the match repeats its last `offset` bytes
                pattern = out[start:]
                out += (pattern * (length // offset + 1))[:length]
    except IndexError:
        raise Lz4Error("LZ4 block is truncated") from None
    return out


def decompress_legacy(data: bytes | memoryview, expected_size: int | None = None) -> bytes:
    """Decode LZ4 legacy-format `data`; trailing bytes that are not a block are ignored.

    A kernel payload ends with its le32 decompressed size, which reads like a block
    size larger than what is left; decoding stops there (or at `expected_size`).
    """
    view = memoryview(data)
    if bytes(view[:4]) != LEGACY_MAGIC:
        raise Lz4Error("not LZ4 legacy-format data (bad magic)")
    out = bytearray()
    pos = 4
    while pos + 4 <= len(view):
        if expected_size is not None and len(out) >= expected_size:
            break
        size = int.from_bytes(view[pos : pos + 4], "little")
        if bytes(view[pos : pos + 4]) == LEGACY_MAGIC:  # another legacy stream follows
            pos += 4
            continue
        if size == 0 or pos + 4 + size > len(view):
            break
        out += decode_block(view[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return bytes(out)
