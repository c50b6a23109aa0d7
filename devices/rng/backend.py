"""Where the entropy device's bytes come from: the host kernel's CSPRNG, or a fake for tests.

`GetrandomSource` is getrandom(2) with no flags (the host's pool is initialised long before
a microVM starts, so it never blocks); the worker's seccomp policy allows exactly that.
A `SourceError` is the host's failure, never the guest's: the request completes with no
bytes and `host_rng_fails` counts it (Firecracker's metric).
"""

from __future__ import annotations

import os
from typing import Protocol


class SourceError(Exception):
    """The host could not produce random bytes."""


class EntropySource(Protocol):
    def fill(self, view: memoryview) -> None:
        """Fill all of `view` with random bytes, or raise SourceError."""


class GetrandomSource:
    """getrandom(2), flags 0."""

    def fill(self, view: memoryview) -> None:
        try:
            view[:] = os.getrandom(len(view), 0)
        except OSError as e:
            raise SourceError(f"getrandom failed: {e.strerror}") from e


class FakeSource:
    """A counter pattern (byte i of the stream is i % 251), or failures with `fail`."""

    def __init__(self) -> None:
        self.position = 0
        self.fail = False

    def fill(self, view: memoryview) -> None:
        if self.fail:
            raise SourceError("injected failure")
        view[:] = bytes((self.position + i) % 251 for i in range(len(view)))
        self.position += len(view)
