"""`embervm` as a process: --version, --help, argument errors, a socket already in use."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

from shared import exitcodes
from tests.integration.test_api_boot import Embervm, wait_connectable
from tests.support.api_client import ApiClient

REPO = Path(__file__).resolve().parents[2]
ENTRY = "import sys; from controlplane.cli import main; main(sys.argv[1:])"


def embervm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", ENTRY, *args], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )


def test_version_and_help():
    version = embervm("--version")
    assert version.returncode == 0
    assert version.stdout.splitlines()[0].startswith("Firecracker v1.")
    helped = embervm("--help")
    assert helped.returncode == 0
    for flag in (
        "--api-sock",
        "--config-file",
        "--no-api",
        "--id",
        "--log-path",
        "--level",
        "--show-level",
        "--show-log-origin",
        "--metrics-path",
        "--boot-timer",
        "--http-api-max-payload-size",
        "--mmds-size-limit",
        "--metadata",
        "--no-seccomp",
        "--seccomp-filter",
        "--enable-fault-injection",
    ):
        assert flag in helped.stdout, flag


def test_no_api_requires_a_config_file():
    result = embervm("--no-api")
    assert result.returncode == exitcodes.ARG_PARSING
    assert "--no-api requires --config-file" in result.stderr


def test_missing_config_file_is_a_generic_error_as_in_firecracker(tmp_path: Path):
    result = embervm("--no-api", "--config-file", str(tmp_path / "absent.json"))
    assert result.returncode == exitcodes.GENERIC_ERROR
    assert "Cannot read the configuration" in result.stderr


def test_second_vmm_on_the_same_socket_is_refused(tmp_path: Path):
    sock = str(tmp_path / "fc.sock")
    first = Embervm("--api-sock", sock)
    try:
        wait_connectable(sock, first)
        second = embervm("--api-sock", sock)
        assert second.returncode == exitcodes.GENERIC_ERROR
        assert "already in use by another process" in second.stderr
        with ApiClient(sock) as client:
            assert client.get("/").json()["state"] == "Not started", "the first VMM still serves"
        first.proc.send_signal(signal.SIGINT)
        assert first.wait() == 128 + signal.SIGINT
        assert not Path(sock).exists()
    finally:
        first.close()


def test_the_socket_accepts_connections_as_soon_as_it_exists(tmp_path: Path):
    sock = str(tmp_path / "fc.sock")
    proc = Embervm("--api-sock", sock)
    try:
        wait_connectable(sock, proc)
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(sock)
        probe.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
        assert probe.recv(4096).startswith(b"HTTP/1.1 200")
        probe.close()
    finally:
        proc.proc.send_signal(signal.SIGTERM)
        proc.wait()
        proc.close()
