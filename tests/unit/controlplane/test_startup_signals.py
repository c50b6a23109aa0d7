"""SIGINT/SIGTERM that arrive while embervm starts (after its API socket exists, before the
server or the --no-api wait has handlers) stop it once it serves (controlplane/startup_signals.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane import cli, startup_signals

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def restore_handlers() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in startup_signals.STOP_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    startup_signals._received.clear()


def test_a_signal_during_start_up_is_kept_and_handed_over() -> None:
    startup_signals.install()
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)  # the first one counts
    assert startup_signals.received() == signal.SIGTERM
    got: list[int] = []
    startup_signals.take_over(lambda signum, _frame: got.append(signum))
    assert got == [signal.SIGTERM]


def test_nothing_is_handed_over_without_a_signal() -> None:
    startup_signals.install()
    got: list[int] = []
    startup_signals.take_over(lambda signum, _frame: got.append(signum))
    assert got == [] and startup_signals.received() is None


def test_the_zygote_gets_the_default_actions_back() -> None:
    startup_signals.install()
    startup_signals.reset_in_child()
    assert all(signal.getsignal(sig) == signal.SIG_DFL for sig in startup_signals.STOP_SIGNALS)


def test_the_no_api_wait_ends_on_a_signal_kept_during_start_up() -> None:
    startup_signals.install()
    os.kill(os.getpid(), signal.SIGINT)
    assert cli._wait_no_api(threading.Event()) == signal.SIGINT


def test_the_api_server_stops_at_once_on_a_signal_kept_during_start_up(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    script = textwrap.dedent(
        f"""
        import os, signal
        from fastapi import FastAPI
        from controlplane import startup_signals
        from controlplane.server import ApiServer
        startup_signals.install()
        server = ApiServer(FastAPI(), {str(sock)!r})
        os.kill(os.getpid(), signal.SIGTERM)  # before serve(): uvicorn has no handler yet
        server.serve()
        print(server.stop_signal, os.path.exists({str(sock)!r}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(int(signal.SIGTERM)), "False"]
