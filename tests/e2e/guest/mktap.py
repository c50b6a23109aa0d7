"""Create a persistent TAP interface (runs in the outer VM; busybox `ip` has no `tuntap`).

    python mktap.py tap0 [172.16.0.1/30]     # create tap0, give it the address, bring it up

embervm, like Firecracker, opens an existing TAP by name and never creates one.
"""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


def make_tap(name: str) -> None:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    finally:
        os.close(fd)


if __name__ == "__main__":
    make_tap(sys.argv[1])
    if len(sys.argv) > 2:
        subprocess.run(["ip", "addr", "add", sys.argv[2], "dev", sys.argv[1]], check=True)
    subprocess.run(["ip", "link", "set", sys.argv[1], "up"], check=True)
