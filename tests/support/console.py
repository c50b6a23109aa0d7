"""A console sink for tests: collects guest serial output and waits for text in it."""

from __future__ import annotations

import threading


class ConsoleCapture:
    """A write-only binary stream (what MicroVm writes the console to) with `wait_for`."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._cond = threading.Condition()

    def write(self, data: bytes) -> int:
        with self._cond:
            self._buf.extend(data)
            self._cond.notify_all()
        return len(data)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        with self._cond:
            return self._buf.decode(errors="replace")

    def wait_for(self, needle: str, timeout: float = 10.0) -> str:
        """Block until `needle` has been printed; returns the whole output so far."""
        with self._cond:
            if not self._cond.wait_for(lambda: needle.encode() in self._buf, timeout=timeout):
                raise AssertionError(f"{needle!r} not seen on the console within {timeout} s; got:\n{self.text}")
            return self._buf.decode(errors="replace")
