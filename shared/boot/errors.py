"""The one error type of the boot code.

Everything under `shared.boot` raises `BootError` for bad input (a kernel image that
is not one, a command line that is too long, memory too small for what must go in it),
so the supervisor can report a failed boot with the message alone.
"""

from __future__ import annotations


class BootError(Exception):
    """The kernel, initrd, command line or memory size cannot be used to boot."""
