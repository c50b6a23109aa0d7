"""The kernel command line, built piece by piece and checked before it reaches the guest.

The kernel reads it as a NUL-terminated string of `key=value` words separated by
spaces. Only printable ASCII is accepted: a NUL would cut it short, and control
characters or non-ASCII bytes are never what a caller meant.
"""

from __future__ import annotations

from shared.boot.errors import BootError
from shared.layout import CMDLINE_MAX_SIZE, GiB, KiB, MiB


def _check_printable(text: str, what: str) -> None:
    for ch in text:
        if not " " <= ch <= "~":
            raise BootError(f"{what} has a character the kernel command line cannot carry: {ch!r}")


def format_size(size: int) -> str:
    """`size` in the form the kernel's memparse() reads: the largest exact K/M/G unit."""
    if size <= 0:
        raise BootError(f"size must be positive, got {size}")
    for unit, suffix in ((GiB, "G"), (MiB, "M"), (KiB, "K")):
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


class Cmdline:
    """A kernel command line of at most `capacity` bytes, terminating NUL included."""

    def __init__(self, capacity: int = CMDLINE_MAX_SIZE) -> None:
        if capacity < 1:
            raise BootError(f"command line capacity must be at least 1 (for the NUL), got {capacity}")
        self.capacity = capacity
        self._words: list[str] = []

    @classmethod
    def from_str(cls, text: str, capacity: int = CMDLINE_MAX_SIZE) -> Cmdline:
        cmdline = cls(capacity)
        cmdline.insert_str(text)
        return cmdline

    def _append(self, word: str) -> None:
        line = " ".join([*self._words, word])
        limit = self.capacity - 1
        if len(line) > limit:
            raise BootError(f"kernel command line is {len(line)} bytes, longer than the maximum {limit}")
        self._words.append(word)

    def insert_str(self, text: str) -> None:
        """Append free-form parameters; surrounding whitespace is dropped, inner runs kept."""
        _check_printable(text, "command line text")
        text = text.strip(" ")
        if text:
            self._append(text)

    def insert(self, key: str, value: str | int) -> None:
        """Append `key=value`; a value with spaces is quoted, as the kernel's parser allows."""
        _check_printable(key, "command line key")
        if not key or any(c in key for c in ' ="'):
            raise BootError(f"invalid command line key {key!r}: empty, or has a space, '=' or '\"'")
        value = str(value)
        _check_printable(value, f"value of {key}")
        if '"' in value:
            raise BootError(f"value of {key} has a '\"', which the kernel's parser cannot carry")
        if not value or " " in value:
            value = f'"{value}"'
        self._append(f"{key}={value}")

    def add_virtio_mmio_device(self, size: int, base: int, irq: int) -> None:
        """Append `virtio_mmio.device=<size>@<base>:<irq>` (virtio_mmio's cmdline syntax)."""
        if base < 0 or irq < 0:
            raise BootError(f"invalid virtio-mmio device at {base:#x} irq {irq}")
        self.insert("virtio_mmio.device", f"{format_size(size)}@{base:#x}:{irq}")

    def __str__(self) -> str:
        return " ".join(self._words)

    def __len__(self) -> int:
        return len(str(self))

    def as_bytes(self) -> bytes:
        """The command line as the guest reads it: ASCII, NUL-terminated."""
        return str(self).encode("ascii") + b"\0"
