"""scripts/linux_demo.py's clean exits, on this host's KVM with the tiny test guest.

The demo boots Debian's Linux (tests/e2e/test_demo.py runs that, one level down); what it
makes on the host and must take away again -- the TAP, embervm and its workers, the API
socket and the work folder -- does not depend on the guest. Here the guest is the test
guest in `test=echo` mode, a stand-in for the shell, and the demo runs in a network
namespace of its own so that its TAP can be looked for afterwards.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest.build import GuestImages
from scripts.linux_demo import TAP_NAME
from tests.support import netns

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not netns.available(), reason="needs root, ip and /dev/net/tun")


@pytest.fixture
def space() -> Iterator[netns.NetNs]:
    ns = netns.NetNs(f"embdemo{os.getpid()}")
    try:
        yield ns
    finally:
        ns.delete()


def start_demo(space: netns.NetNs, guest_images: GuestImages, tmp_path: Path) -> subprocess.Popen[bytes]:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    command = [
        "ip", "netns", "exec", space.name, sys.executable, "-m", "scripts.linux_demo",
        "--kernel", str(guest_images.elf), "--rootfs", str(disk),
        "--boot-args", "console=ttyS0 reboot=k panic=1 test=echo",
    ]  # fmt: skip
    return subprocess.Popen(command, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(proc: subprocess.Popen[bytes], needle: bytes, timeout: float = 60) -> bytes:
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        assert time.monotonic() < deadline, f"{needle!r} not seen; got {seen!r}"
        seen += proc.stdout.read() or b""
        time.sleep(0.05)
    return seen


def assert_nothing_left(space: netns.NetNs, stderr: str) -> None:
    found = re.search(r"demo: work folder (\S+)", stderr)
    assert found, stderr
    work = found.group(1)
    assert not Path(work).exists(), stderr
    assert TAP_NAME not in space.ip("-o", "link", "show"), stderr
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert work.encode() not in cmdline.read_bytes(), f"process {cmdline.parent.name} left\n{stderr}"
        except OSError:
            continue


def test_sigint_stops_embervm_and_removes_the_tap_socket_and_folder(
    space: netns.NetNs, guest_images: GuestImages, tmp_path: Path
) -> None:
    proc = start_demo(space, guest_images, tmp_path)
    wait_for(proc, b"echo ready")
    assert TAP_NAME in space.ip("-o", "link", "show")

    proc.send_signal(signal.SIGINT)  # Ctrl-C where the terminal is not in the guest's raw mode
    _, err = proc.communicate(timeout=30)

    assert "demo: embervm exited" in err.decode(), err.decode()
    assert_nothing_left(space, err.decode())


def test_the_guest_ending_itself_ends_the_demo_cleanly(
    space: netns.NetNs, guest_images: GuestImages, tmp_path: Path
) -> None:
    proc = start_demo(space, guest_images, tmp_path)
    wait_for(proc, b"echo ready")
    assert proc.stdin is not None

    proc.stdin.write(b"quit\n")  # the stand-in for `reboot`: the guest powers off through the i8042
    proc.stdin.flush()
    _, err = proc.communicate(timeout=30)

    assert proc.returncode == 0, err.decode()
    assert "demo: embervm exited with status 0" in err.decode(), err.decode()
    assert_nothing_left(space, err.decode())
