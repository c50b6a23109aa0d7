"""embervm's stdin as serial input: one thread forwards it, a terminal is raw only while a guest runs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from controlplane.cli import parse_args, run
from controlplane.console_input import CHUNK, ConsoleInput, ForwardingLauncher
from controlplane.logger import FcLogger
from controlplane.metrics import Metrics
from tests.unit.controlplane.fakes import SPEC_TYPES, FakeLauncher

REPO = Path(__file__).resolve().parents[3]


def wait_for(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


class Target:
    """A running microVM as the forwarder sees it."""

    def __init__(self, block: threading.Event | None = None) -> None:
        self.state = "Running"
        self.received = bytearray()
        self.chunks: list[int] = []
        self.block = block
        self.entered = threading.Event()

    def send_console_input(self, data: bytes) -> None:
        self.entered.set()
        if self.block is not None:
            self.block.wait()
        self.received += data
        self.chunks.append(len(data))


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):  # a test may have closed it
            os.close(fd)


@pytest.fixture
def pty_pair() -> Iterator[tuple[int, int]]:
    master, slave = os.openpty()
    yield master, slave
    os.close(master)
    os.close(slave)


def test_bytes_on_a_pipe_reach_the_target_in_bounded_chunks(pipe):
    r, w = pipe
    console, target = ConsoleInput(r), Target()
    try:
        console.forward_to(target)
        data = bytes(range(256)) * 64  # 16 KiB
        os.write(w, data)

        wait_for(lambda: len(target.received) == len(data))
        assert target.received == data
        assert max(target.chunks) <= CHUNK
    finally:
        console.close()


def test_end_of_file_ends_forwarding_and_touches_nothing_else(pipe):
    r, w = pipe
    console, target = ConsoleInput(r), Target()
    try:
        console.forward_to(target)
        os.write(w, b"last words\n")
        os.close(w)

        wait_for(lambda: console._thread is not None and not console._thread.is_alive())
        assert target.received == b"last words\n"
        assert target.state == "Running"
    finally:
        console.close()


def test_a_target_that_exited_gets_nothing_more(pipe):
    r, w = pipe
    console, target = ConsoleInput(r), Target()
    try:
        console.forward_to(target)
        target.state = "Exited"
        os.write(w, b"too late")

        wait_for(lambda: console._thread is not None and not console._thread.is_alive())
        assert target.received == b""
    finally:
        console.close()


def test_nothing_is_read_before_a_microvm_runs_and_close_stops_an_idle_reader(pipe):
    r, w = pipe
    console, target = ConsoleInput(r), Target()
    os.write(w, b"typed early")
    assert os.read(r, 100) == b"typed early", "still in the pipe: nobody reads before boot"

    console.forward_to(target)
    console.forward_to(Target())  # one microVM per process: a second call changes nothing
    thread = console._thread
    assert thread is not None and thread.is_alive()
    console.close()

    assert not thread.is_alive()
    console.close()  # idempotent


def test_a_slow_target_holds_the_reader_back(pipe):
    r, w = pipe
    release = threading.Event()
    console, target = ConsoleInput(r), Target(block=release)
    try:
        console.forward_to(target)
        os.write(w, b"a" * 10)
        assert target.entered.wait(10)
        os.write(w, b"b" * 10)
        time.sleep(0.1)  # time enough for a reader that does not wait to take them
        os.set_blocking(r, False)
        assert os.read(r, 100) == b"b" * 10, "the reader took one chunk and waits for the target"
    finally:
        release.set()
        console.close()


def test_a_terminal_is_raw_only_while_a_microvm_runs(pty_pair):
    master, slave = pty_pair
    before = termios.tcgetattr(slave)
    console, target = ConsoleInput(slave), Target()
    try:
        assert termios.tcgetattr(slave) == before, "not raw before boot"
        console.forward_to(target)

        raw = termios.tcgetattr(slave)
        assert raw[3] & (termios.ICANON | termios.ECHO | termios.ISIG) == 0
        assert raw[3] | termios.ICANON | termios.ECHO | termios.ISIG == before[3], "only those flags change"
        assert raw[0:3] == before[0:3], "input, output and control modes are kept (as Firecracker)"
        os.write(master, b"\x03ls\r")  # Ctrl-C is a byte for the guest, no line buffering
        wait_for(lambda: target.received == b"\x03ls\n")
    finally:
        console.close()
    assert termios.tcgetattr(slave) == before


def test_forwarding_launcher_hands_each_started_vm_to_the_console(pipe):
    r, w = pipe
    console = ConsoleInput(r)
    launcher = FakeLauncher()
    try:
        vm = ForwardingLauncher(launcher, console).start_vm(object(), sys.stdout.buffer, lambda c, r: None)
        assert vm is launcher.vms[0]
        os.write(w, b"to the fake")
        wait_for(lambda: launcher.vms[0].console_input == b"to the fake")
    finally:
        console.close()


def test_run_forwards_console_in_to_the_booted_vm(tmp_path: Path, files, pipe):
    r, w = pipe
    config = tmp_path / "vm.json"
    config.write_text(json.dumps({"boot-source": {"kernel_image_path": files["vmlinux"]}}))
    launcher, logger = FakeLauncher(), FcLogger()
    result: list[int] = []
    args = parse_args(["--no-api", "--config-file", str(config)])
    thread = threading.Thread(
        target=lambda: result.append(
            run(args, launcher, spec_types=SPEC_TYPES, metrics=Metrics(), logger=logger, console_in=r)
        ),
        daemon=True,
    )
    thread.start()
    wait_for(lambda: launcher.vms)
    os.write(w, b"hello guest\n")
    wait_for(lambda: launcher.vms[0].console_input == b"hello guest\n")
    launcher.vms[0].finish(0, "guest reset")
    thread.join(20)
    logger.close()
    assert result == [0]


RAW_THEN_SIGNAL = """
import os, signal, sys, termios
from controlplane.console_input import ConsoleInput
class Target:
    state = "Running"
    def send_console_input(self, data): pass
console = ConsoleInput(int(sys.argv[1]))
console.forward_to(Target())
assert termios.tcgetattr(console.fd)[3] & termios.ICANON == 0
os.kill(os.getpid(), signal.SIGTERM)
print("survived SIGTERM", flush=True)
"""


def test_sigterm_outside_the_cli_handlers_restores_the_terminal_and_still_kills(pty_pair):
    _master, slave = pty_pair
    before = termios.tcgetattr(slave)

    proc = subprocess.run(
        [sys.executable, "-c", RAW_THEN_SIGNAL, str(slave)],
        cwd=REPO,
        pass_fds=(slave,),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert "survived" not in proc.stdout
    assert termios.tcgetattr(slave) == before


RAW_THEN_EXCEPTION = """
import sys, termios
from controlplane.console_input import ConsoleInput
class Target:
    state = "Running"
    def send_console_input(self, data): pass
console = ConsoleInput(int(sys.argv[1]))
console.forward_to(Target())
assert termios.tcgetattr(console.fd)[3] & termios.ICANON == 0
raise RuntimeError("an error nobody caught")
"""


def test_an_uncaught_exception_restores_the_terminal_at_exit(pty_pair):
    _master, slave = pty_pair
    before = termios.tcgetattr(slave)

    proc = subprocess.run(
        [sys.executable, "-c", RAW_THEN_EXCEPTION, str(slave)],
        cwd=REPO,
        pass_fds=(slave,),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert proc.returncode == 1 and "an error nobody caught" in proc.stderr
    assert termios.tcgetattr(slave) == before


def test_close_puts_back_the_signal_handlers_it_replaced(pty_pair):
    _master, slave = pty_pair
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    console = ConsoleInput(slave)
    assert signal.getsignal(signal.SIGTERM) == console._restore_and_die
    console.close()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


TAKE_STDIN = """
import fcntl, os, sys
from controlplane.cli import _take_stdin
fd = _take_stdin()
if fd is None:
    print("none", os.readlink("/proc/self/fd/0"))
else:
    cloexec = bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
    print(os.readlink("/proc/self/fd/0"), cloexec, os.read(fd, 100).decode())
"""


def test_the_cli_moves_stdin_off_fd_0_which_the_workers_keep():
    proc = subprocess.run(
        [sys.executable, "-c", TAKE_STDIN], cwd=REPO, input="from the pipe", capture_output=True, text=True, check=True
    )
    assert proc.stdout.split(maxsplit=2) == ["/dev/null", "True", "from the pipe\n"]


def test_without_a_stdin_fd_0_is_dev_null_all_the_same():
    proc = subprocess.run(
        [sys.executable, "-c", f"import os; os.close(0)\n{TAKE_STDIN}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.split() == ["none", "/dev/null"]
