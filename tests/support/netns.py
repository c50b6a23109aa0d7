"""A throwaway network namespace with a TAP in it, for the net tests.

Everything stays inside the namespace: its TAP has a link-local address, nothing is routed
anywhere else. `entered()` moves the *calling thread* into the namespace (setns), so that a
TAP opened or a socket created there belongs to it; the thread moves back afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and os.path.exists("/dev/net/tun")


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class NetNs:
    def __init__(self, name: str) -> None:
        self.name = name
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.ip("link", "set", "lo", "up")
        # No IPv6: its router solicitations and MLD reports would be unasked-for frames on the TAP.
        for scope in ("all", "default"):
            self.run("sysctl", "-qw", f"net.ipv6.conf.{scope}.disable_ipv6=1")

    def ip(self, *args: str) -> str:
        return subprocess.run(["ip", "-n", self.name, *args], check=True, capture_output=True, text=True).stdout

    def run(self, *cmd: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.name, *cmd], capture_output=True, text=True, timeout=timeout)

    def add_tap(self, name: str, address: str) -> None:
        """A persistent TAP `name` with `address` (CIDR), up."""
        self.ip("tuntap", "add", "dev", name, "mode", "tap")
        self.ip("addr", "add", address, "dev", name)
        self.ip("link", "set", name, "up")

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        here = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        there = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(there)
            try:
                yield
            finally:
                _setns(here)
        finally:
            os.close(here)
            os.close(there)

    def open_tap(self, name: str) -> int:
        from devices.net.tap import open_tap

        with self.entered():
            return open_tap(name)

    def socket(self, family: int, kind: int, proto: int = 0) -> socket.socket:
        with self.entered():
            return socket.socket(family, kind, proto)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], check=False, capture_output=True)


@contextlib.contextmanager
def private() -> Iterator[None]:
    """Move the calling thread into a new, unnamed network namespace until the block ends.

    Threads it starts meanwhile (an in-process API server's) inherit the namespace, so a TAP
    the control plane attaches by name (and, as root, creates) never touches the host's.
    Without root the thread stays where it is: TUNSETIFF then fails as it would for
    an unprivileged embervm.
    """
    if os.geteuid() != 0:
        yield
        return
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare: {os.strerror(err)}")
        try:
            yield
        finally:
            _setns(here)
    finally:
        os.close(here)
