"""A minimal AML (ACPI Machine Language) encoder for the DSDT.

Only what embervm's DSDT needs: names, integers, strings, EisaId, packages, Scope,
Device, Name, Method/Return, and resource templates with Memory32Fixed, IO and
Extended Interrupt descriptors. Every function returns the encoded bytes of one term,
so a DSDT body is plain concatenation (ACPI 6.x spec, chapters 19.3 and 20; resource
descriptors in 6.4).
"""

from __future__ import annotations

import re
import struct

# Opcodes (ACPI spec 20.3).
ZERO_OP = 0x00
ONE_OP = 0x01
ONES_OP = 0xFF
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
RETURN_OP = 0xA4
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX

ROOT_CHAR = 0x5C  # '\'
PARENT_PREFIX = 0x5E  # '^'
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
NULL_NAME = 0x00

PKG_LENGTH_MAX = (1 << 28) - 1

_NAME_SEG = re.compile(r"[A-Z_][A-Z0-9_]{0,3}")


class AmlError(ValueError):
    """A value that AML cannot encode (bad name, integer out of range, too long)."""


def pkg_length(content_length: int) -> bytes:
    """PkgLength for a package whose contents after the PkgLength take `content_length` bytes.

    The encoded length counts the PkgLength bytes themselves, so the form (1 to 4 bytes)
    is the smallest one whose total still fits: 1 byte holds up to 63 (6 bits), the
    multi-byte forms hold 4 bits in the lead byte plus 8 per following byte.
    """
    if content_length < 0:
        raise AmlError(f"negative package length {content_length}")
    if content_length + 1 <= 0x3F:
        return bytes([content_length + 1])
    for extra in (1, 2, 3):
        total = content_length + 1 + extra
        if total < 1 << (4 + 8 * extra):
            lead = (extra << 6) | (total & 0x0F)
            return bytes([lead]) + (total >> 4).to_bytes(extra, "little")
    raise AmlError(f"package of {content_length} bytes is longer than AML allows ({PKG_LENGTH_MAX})")


def decode_pkg_length(data: bytes) -> tuple[int, int]:
    """(encoded total length, number of PkgLength bytes) at the start of `data`."""
    lead = data[0]
    extra = lead >> 6
    if extra == 0:
        return lead & 0x3F, 1
    return (lead & 0x0F) | int.from_bytes(data[1 : 1 + extra], "little") << 4, 1 + extra


def name_seg(name: str) -> bytes:
    """A 4-character NameSeg; shorter names are padded with '_' as ASL does."""
    if not _NAME_SEG.fullmatch(name):
        raise AmlError(f"bad AML name segment {name!r}: 1-4 chars of A-Z, 0-9, _, not starting with a digit")
    return name.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString: optional '\\' root or '^' parent prefixes, then '.'-separated segments."""
    prefix = b""
    rest = path
    if rest.startswith("\\"):
        prefix, rest = bytes([ROOT_CHAR]), rest[1:]
    else:
        while rest.startswith("^"):
            prefix, rest = prefix + bytes([PARENT_PREFIX]), rest[1:]
    if not rest:
        return prefix + bytes([NULL_NAME])
    segs = [name_seg(seg) for seg in rest.split(".")]
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > 255:
        raise AmlError(f"name path {path!r} has more than 255 segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def integer(value: int) -> bytes:
    """An integer constant in its shortest encoding (Zero, One, Ones, byte..qword)."""
    if value < 0 or value >= 1 << 64:
        raise AmlError(f"AML integers are unsigned 64-bit, got {value}")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value == (1 << 64) - 1:
        return bytes([ONES_OP])
    for prefix, fmt in ((BYTE_PREFIX, "<B"), (WORD_PREFIX, "<H"), (DWORD_PREFIX, "<I")):
        if value < 1 << (8 * struct.calcsize(fmt)):
            return bytes([prefix]) + struct.pack(fmt, value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def dword(value: int) -> bytes:
    """A DWordConst even when a shorter form would do (for fields that must be 32-bit)."""
    if not 0 <= value < 1 << 32:
        raise AmlError(f"{value} does not fit a DWord")
    return bytes([DWORD_PREFIX]) + struct.pack("<I", value)


def string(text: str) -> bytes:
    """A null-terminated ASCII String constant."""
    raw = text.encode("ascii")
    if b"\0" in raw:
        raise AmlError("AML strings cannot contain NUL")
    return bytes([STRING_PREFIX]) + raw + b"\0"


def eisa_id(pnp_id: str) -> bytes:
    """The compressed EISA id of "PNP0501"-style ids, as ASL's EisaId() emits it.

    Three letters take 5 bits each (A=1), then four hex digits; the result is stored
    big-endian, which read as an AML (little-endian) DWord gives the integer below.
    """
    if not re.fullmatch(r"[A-Z]{3}[0-9A-F]{4}", pnp_id):
        raise AmlError(f"bad EISA id {pnp_id!r}: expected 3 capital letters and 4 hex digits")
    letters = [ord(c) - 0x40 for c in pnp_id[:3]]
    packed = (letters[0] << 26) | (letters[1] << 21) | (letters[2] << 16) | int(pnp_id[3:], 16)
    return dword(int.from_bytes(packed.to_bytes(4, "big"), "little"))


def name(path: str, value: bytes) -> bytes:
    """Name(path, value): `value` is an encoded data object (integer, string, buffer...)."""
    return bytes([NAME_OP]) + name_string(path) + value


def _package_op(opcode: bytes, *body: bytes) -> bytes:
    content = b"".join(body)
    return opcode + pkg_length(len(content)) + content


def scope(path: str, *terms: bytes) -> bytes:
    """Scope(path) { terms }."""
    return _package_op(bytes([SCOPE_OP]), name_string(path), *terms)


def device(path: str, *terms: bytes) -> bytes:
    """Device(path) { terms }."""
    return _package_op(bytes([EXT_OP_PREFIX, DEVICE_OP]), name_string(path), *terms)


def method(path: str, arg_count: int, *terms: bytes, serialized: bool = False) -> bytes:
    """Method(path, arg_count, NotSerialized/Serialized) { terms }, sync level 0."""
    if not 0 <= arg_count <= 7:
        raise AmlError(f"methods take 0..7 arguments, got {arg_count}")
    flags = arg_count | (0x08 if serialized else 0)
    return _package_op(bytes([METHOD_OP]), name_string(path), bytes([flags]), *terms)


def return_(value: bytes) -> bytes:
    """Return(value)."""
    return bytes([RETURN_OP]) + value


def package(*elements: bytes) -> bytes:
    """Package() { elements }: a fixed list of encoded data objects."""
    if len(elements) > 255:
        raise AmlError("a Package holds at most 255 elements (VarPackage not supported)")
    return _package_op(bytes([PACKAGE_OP]), bytes([len(elements)]), *elements)


def buffer(data: bytes) -> bytes:
    """Buffer() { data }, with its size as an integer constant."""
    return _package_op(bytes([BUFFER_OP]), integer(len(data)), data)


# Resource descriptors (ACPI spec 6.4).

SMALL_IO = 0x47  # small item 0x08, length 7
SMALL_END_TAG = 0x79  # small item 0x0F, length 1
LARGE_MEMORY32_FIXED = 0x86
LARGE_EXTENDED_INTERRUPT = 0x89

IRQ_CONSUMER = 0x01
IRQ_EDGE = 0x02  # level when clear
IRQ_ACTIVE_LOW = 0x04  # active high when clear
IRQ_SHARED = 0x08  # exclusive when clear
IRQ_WAKE_CAPABLE = 0x10


def memory32_fixed(base: int, length: int, writable: bool = True) -> bytes:
    """Memory32Fixed(ReadWrite/ReadOnly, base, length): an MMIO range."""
    if not (0 <= base < 1 << 32 and 0 <= length < 1 << 32 and base + length <= 1 << 32):
        raise AmlError(f"Memory32Fixed range {base:#x}+{length:#x} does not fit 32 bits")
    return struct.pack("<BHBII", LARGE_MEMORY32_FIXED, 9, int(writable), base, length)


def io(base: int, length: int, alignment: int = 1) -> bytes:
    """IO(Decode16, base, base, alignment, length): a fixed I/O port range."""
    if not (0 <= base <= 0xFFFF and 0 <= length <= 0xFF and 0 <= alignment <= 0xFF):
        raise AmlError(f"IO range {base:#x}+{length:#x} (alignment {alignment}) out of range")
    return struct.pack("<BBHHBB", SMALL_IO, 1, base, base, alignment, length)


def extended_interrupt(*gsis: int, edge: bool = True, active_low: bool = False, shared: bool = False) -> bytes:
    """Interrupt(ResourceConsumer, Edge/Level, ActiveHigh/Low, Exclusive/Shared) { gsis }."""
    if not 1 <= len(gsis) <= 255:
        raise AmlError(f"an Interrupt descriptor lists 1..255 interrupts, got {len(gsis)}")
    if any(not 0 <= gsi < 1 << 32 for gsi in gsis):
        raise AmlError(f"interrupt numbers must be 32-bit: {gsis}")
    flags = IRQ_CONSUMER
    flags |= IRQ_EDGE if edge else 0
    flags |= IRQ_ACTIVE_LOW if active_low else 0
    flags |= IRQ_SHARED if shared else 0
    body = struct.pack("<BB", flags, len(gsis)) + struct.pack(f"<{len(gsis)}I", *gsis)
    return struct.pack("<BH", LARGE_EXTENDED_INTERRUPT, len(body)) + body


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate() { descriptors }: a Buffer ending in an End Tag.

    The End Tag's checksum byte makes the whole descriptor list sum to zero (0 would
    also be legal, meaning "not checksummed"; a real one costs nothing).
    """
    data = b"".join(descriptors) + bytes([SMALL_END_TAG])
    return buffer(data + bytes([-sum(data) & 0xFF]))
