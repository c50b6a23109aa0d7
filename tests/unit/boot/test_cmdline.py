from __future__ import annotations

import pytest

from shared.boot.cmdline import Cmdline, format_size
from shared.boot.errors import BootError
from shared.layout import CMDLINE_MAX_SIZE, GiB, KiB, MiB


def test_words_are_joined_with_single_spaces_and_nul_terminated() -> None:
    c = Cmdline()
    c.insert_str("  console=ttyS0 reboot=k  ")
    c.insert("panic", 1)
    c.insert_str("")
    assert str(c) == "console=ttyS0 reboot=k panic=1"
    assert c.as_bytes() == b"console=ttyS0 reboot=k panic=1\0"


def test_value_with_spaces_is_quoted() -> None:
    c = Cmdline()
    c.insert("dyndbg", "file a.c +p")
    assert str(c) == 'dyndbg="file a.c +p"'


@pytest.mark.parametrize("text", ["a\0b", "tab\there", "caf\u00e9", "new\nline"])
def test_non_printable_ascii_is_rejected(text: str) -> None:
    with pytest.raises(BootError, match="cannot carry"):
        Cmdline().insert_str(text)


@pytest.mark.parametrize("key", ["", "a b", "a=b", 'a"'])
def test_bad_keys_are_rejected(key: str) -> None:
    with pytest.raises(BootError, match="invalid command line key"):
        Cmdline().insert(key, "1")


def test_value_with_quote_is_rejected() -> None:
    with pytest.raises(BootError, match="cannot carry"):
        Cmdline().insert("init", 'say"hi')


def test_capacity_counts_the_nul() -> None:
    c = Cmdline(capacity=11)
    c.insert_str("0123456789")  # 10 bytes + NUL = 11: fits exactly
    assert len(c.as_bytes()) == 11
    with pytest.raises(BootError, match=r"^kernel command line is 12 bytes, longer than the maximum 10$"):
        c.insert_str("x")
    assert str(c) == "0123456789"  # the failed insert left it unchanged


def test_default_capacity_is_the_layout_buffer() -> None:
    c = Cmdline()
    c.insert_str("x" * (CMDLINE_MAX_SIZE - 1))
    with pytest.raises(BootError, match=f"longer than the maximum {CMDLINE_MAX_SIZE - 1}"):
        Cmdline.from_str("x" * CMDLINE_MAX_SIZE)


@pytest.mark.parametrize(
    ("size", "text"),
    [(4 * KiB, "4K"), (512 * KiB, "512K"), (MiB, "1M"), (3 * GiB, "3G"), (1536 * KiB, "1536K"), (100, "100")],
)
def test_format_size_uses_the_largest_exact_suffix(size: int, text: str) -> None:
    assert format_size(size) == text


def test_virtio_mmio_device_syntax() -> None:
    c = Cmdline.from_str("console=ttyS0")
    c.add_virtio_mmio_device(0x1000, 0xD0000000, 5)
    c.add_virtio_mmio_device(0x1000, 0xD0001000, 6)
    assert str(c) == "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
