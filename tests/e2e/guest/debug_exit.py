"""End QEMU with a status through its isa-debug-exit device (runs inside the outer VM).

    python debug_exit.py STATUS        # QEMU then exits with (STATUS << 1) | 1

The device sits at I/O port 0xf4 (`-device isa-debug-exit,iobase=0xf4,iosize=0x04`).
Debian's kernel has no /dev/port, so this takes the port with ioperm(2) and runs a
four-byte `out dx, eax` from an executable page through ctypes.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

PORT = 0xF4
# mov eax, edi; mov edx, PORT; out dx, eax; ret
CODE = bytes([0x89, 0xF8, 0xBA, PORT, 0, 0, 0, 0xEF, 0xC3])


def debug_exit(status: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ioperm(PORT, 4, 1) != 0:
        raise OSError(ctypes.get_errno(), "ioperm(0xf4) failed")
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(CODE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    ctypes.CFUNCTYPE(None, ctypes.c_uint32)(address)(status)


if __name__ == "__main__":
    debug_exit(min(int(sys.argv[1]), 0x7F))
    sys.exit("isa-debug-exit did not stop QEMU (is the device configured?)")
