"""Start an `embervm` API process on a fresh socket and wait until it accepts."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

EMBERVM = str(Path(sys.executable).parent / "embervm")


def wait_accepting(path: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> float:
    """Seconds until `path` accepts a connection (the process must stay alive)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"embervm exited with status {proc.returncode} before accepting")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            return time.perf_counter() - start
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.001)
        finally:
            probe.close()
    raise RuntimeError(f"{path} did not accept within {timeout} s")


def launch(
    sock: str, vm_id: str = "bench", command: list[str] | None = None, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], float]:
    """(process, seconds from launch to the API socket accepting); `command` and `env`: a
    variant of bench/variants.py (default: this tree's `embervm` as it finds itself)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [*(command or [EMBERVM]), "--api-sock", sock, "--id", vm_id],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    wait_accepting(sock, proc)
    return proc, time.perf_counter() - start
