"""Reading a port device's saved registers back from a snapshot (serial, i8042).

The snapshot file is checksummed but not trusted: every register is cut to its width and
every buffer to its size, and a field of the wrong type takes its default.
"""

from __future__ import annotations

from typing import Any


class SavedPort:
    """One device's saved state, read field by field."""

    def __init__(self, state: Any, what: str) -> None:
        if not isinstance(state, dict):
            raise ValueError(f"the {what}'s state is not a map")
        self._state = state

    def byte(self, key: str, default: int) -> int:
        """An 8-bit register."""
        value = self._state.get(key, default)
        return value & 0xFF if isinstance(value, int) else default

    def buffer(self, key: str, size: int) -> bytes:
        """Bytes waiting in a FIFO, at most `size` of them."""
        value = self._state.get(key, b"")
        return bytes(value)[:size] if isinstance(value, bytes) else b""

    def flag(self, key: str) -> bool:
        return bool(self._state.get(key, False))
