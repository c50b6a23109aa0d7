"""COMMON loaded into a fresh interpreter: what it lets Python do and what kills it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.seccomp import SeccompKillLog
from tests.security.conftest import REPO, SIGSYS_RC, proc_status, run_confined, threads_of


def test_threads_start_and_join_under_the_filter() -> None:
    result = run_confined(
        """
        import threading
        out = []
        threads = [threading.Thread(target=out.append, args=(i,)) for i in range(12)]
        for t in threads: t.start()
        for t in threads: t.join()
        print(sorted(out) == list(range(12)))
        """,
        setup="import threading",
    )

    assert (result.returncode, result.stdout) == (0, "confined\nTrue\n")


def test_traceback_is_formatted_with_source_lines_and_without_opening_files() -> None:
    result = run_confined(
        """
        import traceback
        texts = []
        for fail in (lambda: sock.recv(zmq.NOBLOCK), lambda: json.loads("{")):
            try:
                fail()
            except Exception:
                texts.append(traceback.format_exc())
        print("zmq.error.Again" in texts[0], "obj, end = self.scan_once(s, idx)" in texts[1])
        """,
        setup="import json, traceback, zmq; ctx = zmq.Context(); sock = ctx.socket(zmq.PULL)",
    )

    assert (result.returncode, result.stdout) == (0, "confined\nTrue True\n")


def test_zeromq_connected_before_the_filter_talks_under_it_without_new_sockets(tmp_path: Path) -> None:
    result = run_confined(
        """
        dealer.send(b"ping")
        print(router.recv_multipart()[1], flush=True)
        """,
        setup=f"""
        import zmq
        from shared.devworker import connect_control, wait_for_zmq_threads
        ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        router.bind("ipc://{tmp_path}/ep")
        dealer = connect_control(ctx, "ipc://{tmp_path}/ep", "w")
        wait_for_zmq_threads(ctx)
        """,
    )

    assert (result.returncode, result.stdout) == (0, "confined\nb'ping'\n"), result.stderr


def test_fcntl_may_set_o_nonblock_as_libzmq_does() -> None:
    result = run_confined(
        "fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_NONBLOCK); print(os.get_blocking(r))",
        setup="import fcntl; r, w = os.pipe2(os.O_CLOEXEC)",
    )

    assert (result.returncode, result.stdout) == (0, "confined\nFalse\n")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param("open('/etc/hostname')", id="openat"),
        pytest.param("import socket; socket.socket(socket.AF_INET)", id="socket-af-inet"),
        pytest.param("import socket; socket.socket(socket.AF_UNIX)", id="socket-af-unix"),
        pytest.param("fcntl.fcntl(r, 8, os.getppid())", id="fcntl-F_SETOWN"),
        pytest.param("fcntl.fcntl(r, 10, 9)", id="fcntl-F_SETSIG-SIGKILL"),
        pytest.param("fcntl.fcntl(r, 15, b'\\0' * 8)", id="fcntl-F_SETOWN_EX"),
        pytest.param("fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC | os.O_NONBLOCK)", id="fcntl-F_SETFL-O_ASYNC"),
        pytest.param("fcntl.fcntl(r, 1024, fcntl.F_RDLCK)", id="fcntl-F_SETLEASE"),
        pytest.param("fcntl.fcntl(r, 1026, 0)", id="fcntl-F_NOTIFY"),
        pytest.param("fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, 0)", id="fcntl-F_DUPFD_CLOEXEC"),
        pytest.param("os.isatty(r)", id="ioctl-TCGETS"),
        pytest.param("os.execv('/bin/true', ['true'])", id="execve"),
        pytest.param("os.fork()", id="fork"),
        pytest.param("import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)", id="mmap-exec"),
        pytest.param("os.kill(os.getppid(), 0)", id="kill-another-process"),
        pytest.param("import ctypes; ctypes.CDLL(None).syscall(0x40000000 | 39)", id="x32-abi"),
    ],
)
def test_forbidden_syscall_stops_the_process_with_sigsys(body: str) -> None:
    result = run_confined(body, setup="import mmap, socket, ctypes, fcntl; r, w = os.pipe2(os.O_CLOEXEC)", quiet=True)

    assert result.stdout == "confined\n"
    assert result.returncode == SIGSYS_RC


def test_stat_of_a_path_is_refused_with_eacces_not_looked_up() -> None:
    # COMMON refuses newfstatat without AT_EMPTY_PATH with EACCES (a traceback's linecache
    # lookup must not kill a worker): the path is never looked up, whatever it is.
    body = """
        try:
            os.stat('/etc/hostname', dir_fd=r)
            print('REACHED', flush=True)
        except PermissionError:
            print('EACCES', flush=True)
        """
    result = run_confined(body, setup="r, w = os.pipe2(os.O_CLOEXEC)", quiet=True)

    assert (result.returncode, result.stdout) == (0, "confined\nEACCES\n"), result.stderr


def test_kill_log_names_the_syscall_of_a_killed_process() -> None:
    kills = SeccompKillLog.open()
    if kills.unavailable:
        pytest.skip(kills.unavailable)
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from shared.confine import SeccompSettings, install_filter; from shared.seccomp import COMMON;"
                "import os; install_filter(SeccompSettings(), COMMON); os.getppid()",
            ],
            cwd=REPO,
        )
        assert proc.wait(timeout=30) == SIGSYS_RC

        assert kills.describe(proc.pid) == "syscall 110, getppid"
    finally:
        kills.close()


def test_kill_log_without_a_kernel_log_says_why(tmp_path: Path) -> None:
    kills = SeccompKillLog.open(str(tmp_path / "no-kmsg"))

    assert kills.describe(os.getpid()).startswith("syscall unknown: cannot read the kernel log")


def test_drop_privileges_empties_every_capability_set_and_sets_no_new_privs() -> None:
    script = (
        "import os, time; from shared.confine import drop_privileges; drop_privileges();"
        "print(open('/proc/self/status').read(), flush=True)"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=30)
    status = dict(line.split(":\t", 1) for line in result.stdout.splitlines() if ":\t" in line)
    if os.geteuid() != 0:
        pytest.skip("needs root to have capabilities to drop")

    assert result.returncode == 0, result.stderr
    assert {k: int(status[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")} == dict.fromkeys(
        ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"), 0
    )
    assert status["NoNewPrivs"].strip() == "1"


def test_drop_privileges_refuses_once_a_thread_runs() -> None:
    script = (
        "import threading, time; from shared.confine import drop_privileges;"
        "threading.Thread(target=time.sleep, args=(5,), daemon=True).start(); drop_privileges()"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=30)

    assert result.returncode == 1
    assert "must run before the worker starts any thread" in result.stderr


def test_filter_covers_threads_started_before_it_was_loaded() -> None:
    script = (
        "import sys, threading; from shared.confine import SeccompSettings, install_filter;"
        "from shared.seccomp import COMMON; import os; gate = threading.Event();"
        "threading.Thread(target=gate.wait, daemon=True).start();"
        "install_filter(SeccompSettings(), COMMON); sys.stdout.write('confined\\n'); sys.stdout.flush();"
        "sys.stdin.buffer.read(1); gate.set(); os._exit(0)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"confined\n"
        modes = {tid: proc_status(proc.pid, tid)["Seccomp"] for tid in threads_of(proc.pid)}
    finally:
        proc.communicate(timeout=30)  # closes stdin: the child reads EOF and exits

    assert len(modes) >= 2
    assert set(modes.values()) == {"2"}
    assert proc.returncode == 0
