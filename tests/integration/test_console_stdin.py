"""`embervm` as a process: its stdin is the guest's serial input (a pipe, /dev/null or a
terminal), and a terminal gets its attributes back however embervm ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from guest.build import GuestImages
from shared import exitcodes
from tests.integration.test_api_boot import MEM_MIB, REPO, Embervm, wait_connectable
from tests.support.api_client import ApiClient, assert_no_content

RAW_OFF = termios.ICANON | termios.ECHO | termios.ISIG


def config(tmp_path: Path, kernel: Path, boot_args: str) -> str:
    path = tmp_path / "vm.json"
    path.write_text(
        json.dumps(
            {
                "boot-source": {"kernel_image_path": str(kernel), "boot_args": boot_args},
                "machine-config": {"vcpu_count": 1, "mem_size_mib": MEM_MIB},
            }
        )
    )
    return str(path)


def wait_for(condition: Callable[[], object], proc: Embervm, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.proc.poll() is None, f"embervm exited early:\n{proc.stderr.text}"
        assert time.monotonic() < deadline, f"condition not met in time; stderr:\n{proc.stderr.text}"
        time.sleep(0.01)


def is_raw(fd: int) -> bool:
    return termios.tcgetattr(fd)[3] & RAW_OFF == 0


@pytest.fixture
def pty_pair() -> Iterator[tuple[int, int]]:
    master, slave = os.openpty()
    yield master, slave
    os.close(master)
    os.close(slave)


def test_a_pipe_on_stdin_is_the_guests_serial_input(guest_images: GuestImages, tmp_path: Path):
    r, w = os.pipe()
    proc = Embervm("--no-api", "--config-file", config(tmp_path, guest_images.elf, "test=echo"), stdin=r)
    os.close(r)
    try:
        proc.console.wait_for("echo ready", timeout=30)
        os.write(w, b"hello through a pipe\n")
        proc.console.wait_for("echo: hello through a pipe\n", timeout=30)
        flood = [f"flood {i:03d} " + "z" * 30 for i in range(100)]  # far more than the UART's FIFO
        os.write(w, "".join(line + "\r\n" for line in flood).encode() + b"quit\n")
        os.close(w)

        assert proc.wait() == exitcodes.OK
    finally:
        proc.close()
    echoed = [line.removeprefix("echo: ") for line in proc.console.text.splitlines() if line.startswith("echo: ")]
    assert echoed == ["hello through a pipe", *flood]


def test_stdin_at_end_of_file_does_not_end_the_guest(guest_images: GuestImages, tmp_path: Path):
    proc = Embervm("--no-api", "--config-file", config(tmp_path, guest_images.elf, "test=loop ticks_every=20000"))
    try:  # stdin is /dev/null: end of file at once
        proc.console.wait_for("tick 3", timeout=30)
        assert proc.proc.poll() is None

        proc.proc.send_signal(signal.SIGTERM)
        assert proc.wait() == 128 + signal.SIGTERM
    finally:
        proc.close()


def test_a_terminal_is_raw_while_the_guest_runs_and_restored_when_it_resets(
    guest_images: GuestImages, tmp_path: Path, pty_pair
):
    master, slave = pty_pair
    before = termios.tcgetattr(slave)
    proc = Embervm("--no-api", "--config-file", config(tmp_path, guest_images.elf, "test=echo"), stdin=slave)
    try:
        proc.console.wait_for("echo ready", timeout=30)
        wait_for(lambda: is_raw(slave), proc)
        os.write(master, b"typed at a terminal\r")  # Enter sends \r; no line discipline in between
        proc.console.wait_for("echo: typed at a terminal\n", timeout=30)
        os.write(master, b"quit\r")

        assert proc.wait() == exitcodes.OK
    finally:
        proc.close()
    assert termios.tcgetattr(slave) == before


def test_a_terminal_is_restored_when_embervm_is_stopped_by_a_signal_in_api_mode(
    guest_images: GuestImages, tmp_path: Path, pty_pair
):
    _master, slave = pty_pair
    before = termios.tcgetattr(slave)
    sock = str(tmp_path / "fc.sock")
    proc = Embervm("--api-sock", sock, stdin=slave)
    try:
        wait_connectable(sock, proc)
        with ApiClient(sock) as client:
            boot = {"kernel_image_path": str(guest_images.elf), "boot_args": "test=loop ticks_every=20000"}
            assert_no_content(client.put("/boot-source", json=boot))
            assert termios.tcgetattr(slave) == before, "the terminal is left alone until the guest runs"
            assert_no_content(client.put("/actions", json={"action_type": "InstanceStart"}))
            proc.console.wait_for("tick 1", timeout=30)
            wait_for(lambda: is_raw(slave), proc)
            workers = [int(worker["pid"]) for worker in client.get("/embervm").json()["workers"]]
        tty = os.ttyname(slave)
        for pid in workers:
            held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            assert tty not in held, "no worker holds the host's terminal"
            assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"

        proc.proc.send_signal(signal.SIGTERM)
        assert proc.wait() == 128 + signal.SIGTERM
    finally:
        proc.close()
    assert termios.tcgetattr(slave) == before


def test_a_terminal_is_restored_when_the_no_api_guest_is_interrupted(
    guest_images: GuestImages, tmp_path: Path, pty_pair
):
    _master, slave = pty_pair
    before = termios.tcgetattr(slave)
    proc = Embervm(
        "--no-api", "--config-file", config(tmp_path, guest_images.elf, "test=loop ticks_every=20000"), stdin=slave
    )
    try:
        proc.console.wait_for("tick 1", timeout=30)
        wait_for(lambda: is_raw(slave), proc)

        proc.proc.send_signal(signal.SIGINT)
        assert proc.wait() == 128 + signal.SIGINT
    finally:
        proc.close()
    assert termios.tcgetattr(slave) == before


# A session leader makes the pty its controlling terminal (its process group has the
# foreground), then runs embervm in a process group of its own: `embervm ... &` from a shell.
IN_THE_BACKGROUND = """
import fcntl, os, signal, sys, termios
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
child = os.fork()
if child == 0:
    os.setpgid(0, 0)
    from controlplane.cli import main
    main(sys.argv[1:])
_, status = os.waitpid(child, os.WUNTRACED)
if os.WIFSTOPPED(status):
    os.kill(child, 9)
    sys.exit("embervm was stopped by " + signal.strsignal(os.WSTOPSIG(status)))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_terminal_whose_foreground_is_another_process_group_is_neither_read_nor_changed(
    guest_images: GuestImages, tmp_path: Path, pty_pair
):
    """Reading it or changing its attributes would stop embervm (SIGTTIN, SIGTTOU)."""
    master, slave = pty_pair
    before = termios.tcgetattr(slave)
    os.write(master, b"not for the guest\r")
    args = ["--no-api", "--config-file", config(tmp_path, guest_images.elf, "test=boot")]

    result = subprocess.run(
        [sys.executable, "-c", IN_THE_BACKGROUND, *args],
        cwd=REPO,
        stdin=slave,
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,
        check=False,
    )

    assert result.returncode == exitcodes.OK, result.stderr
    assert "embervm-guest: ok" in result.stdout
    assert "another foreground process group" in result.stderr
    assert termios.tcgetattr(slave) == before
