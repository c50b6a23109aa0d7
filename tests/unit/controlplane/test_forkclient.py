"""The fork-server client: what it imports before it knows whether a server answers, its JSON,
and the `-I -S` launcher that starts it (controlplane/forkclient.py, client_launcher.py)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane import client_launcher, forkclient
from shared.versions import FIRECRACKER_VERSION

REPO = Path(__file__).resolve().parents[3]
# Pure-Python modules that cost milliseconds each and that the client does without.
SLOW_MODULES = {"os", "socket", "signal", "json", "typing", "enum", "re", "selectors", "hashlib", "pathlib"}


@pytest.mark.parametrize(
    "value",
    [
        {"op": "fork", "argv": ["--api-sock", "/tmp/a b", "é", 'q"\\\n'], "env": {"K": "v\x00w"}, "stdio": [0, 1, 2]},
        {"start_ns": 2**62, "cpu_us": 0, "neg": -5, "flags": [True, False, None], "nested": {"a": [[]]}},
    ],
)
def test_the_request_encoding_is_json(value: dict[str, object]) -> None:
    assert json.loads(forkclient.dumps(value)) == value


@pytest.mark.parametrize(
    "value",
    [{"op": "forked", "pid": 42}, {"op": "refused", "why": "uid 5 may not \u00e9 x"}, {"op": "exit", "status": 256}],
)
def test_the_servers_replies_parse_as_json_does(value: dict[str, object]) -> None:
    assert forkclient.loads(json.dumps(value).encode()) == value


@pytest.mark.parametrize("data", [b"", b"{", b'{"a": 1} x', b"nope", b'{"a": }'])
def test_malformed_replies_are_value_errors(data: bytes) -> None:
    with pytest.raises(ValueError):
        forkclient.loads(data)


def test_the_client_imports_none_of_the_slow_modules() -> None:
    code = (
        "import sys; before = set(sys.modules); "
        f"sys.path.insert(0, {str(REPO)!r}); import controlplane.forkclient as c; c.code_stamp(); "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    assert "controlplane.forkclient" in loaded
    assert not loaded & SLOW_MODULES, loaded & SLOW_MODULES


def test_the_code_stamp_changes_when_a_module_changes(tmp_path: Path) -> None:
    before = forkclient.code_stamp()
    assert before == forkclient.code_stamp()
    module = REPO / "shared" / "versions.py"
    st = module.stat()
    try:
        os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
        assert forkclient.code_stamp() != before
    finally:
        os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert forkclient.code_stamp() == before


def test_the_launcher_runs_without_site_packages_and_finds_this_tree(tmp_path: Path) -> None:
    path = tmp_path / "embervm"
    client_launcher.write_launcher(str(path))
    first, *rest = path.read_text().splitlines()
    assert first == f"#!{sys.executable} -IS"
    assert f"sys.path.insert(0, {str(REPO)!r})" in rest
    assert os.access(path, os.X_OK)


def test_the_launchers_cold_path_execs_a_normal_interpreter(tmp_path: Path) -> None:
    """No server: the launcher (no site-packages) execs Python as usual, same pid, and the
    cold path runs: `--version` needs the CLI, which needs the installed packages."""
    path = tmp_path / "embervm"
    client_launcher.write_launcher(str(path))
    env = {**os.environ, "EMBERVM_FORK_SERVER": "off"}
    out = subprocess.run([str(path), "--version"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"Firecracker v{FIRECRACKER_VERSION}" in out.stdout


def test_the_launchers_cold_path_does_not_import_from_the_working_directory(tmp_path: Path) -> None:
    path = tmp_path / "embervm"
    client_launcher.write_launcher(str(path))
    trap = tmp_path / "cwd" / "controlplane"
    trap.mkdir(parents=True)
    (trap / "__init__.py").write_text("raise SystemExit('imported from the working directory')\n")
    env = {**os.environ, "EMBERVM_FORK_SERVER": "off"}
    out = subprocess.run([str(path), "--version"], capture_output=True, text=True, env=env, cwd=trap.parent, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "working directory" not in out.stderr


@contextlib.contextmanager
def sigterm_during_the_fork(tmp_path: Path) -> Iterator[tuple[socket.socket, subprocess.Popen[bytes]]]:
    """A client of a fake fork server, SIGTERMed after it asked for a fork and before the
    server answers; (the server's end of the connection, the client)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(str(tmp_path / "fs.sock"))
        listener.listen(1)
        listener.settimeout(60)
        env = {**os.environ, "EMBERVM_FORK_SERVER": str(tmp_path / "fs.sock")}
        code = "from controlplane import forkclient; forkclient.main(['--id', 't'])"
        client = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stdin=subprocess.DEVNULL)
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(60)
                assert forkclient.receive(conn)["op"] == "fork"  # type: ignore[index]
                client.send_signal(signal.SIGTERM)  # before the answer
                time.sleep(0.3)
                yield conn, client
        finally:
            client.kill()
            client.wait()


def test_a_signal_that_comes_while_the_server_forks_is_forwarded_to_the_vmm(tmp_path: Path) -> None:
    """The VMM's API socket can exist before this process has read the server's answer: a
    SIGTERM sent then must reach the VMM, not be lost (as pid 1 of a PID namespace) nor kill
    the client alone."""
    with sigterm_during_the_fork(tmp_path) as (conn, client):
        assert client.poll() is None, "the client died of the signal meant for the VMM"
        forkclient.send(conn, {"op": "forked", "pid": 12345})
        assert forkclient.receive(conn) == {"op": "signal", "signal": signal.SIGTERM}
        forkclient.send(conn, {"op": "exit", "status": 7 << 8})
        assert client.wait(30) == 7


def test_a_signal_before_a_refused_fork_stops_the_client(tmp_path: Path) -> None:
    """Refused, the client would start cold: a SIGTERM that came meanwhile stops it instead."""
    with sigterm_during_the_fork(tmp_path) as (conn, client):
        forkclient.send(conn, {"op": "refused", "why": "test"})
        assert client.wait(30) == -signal.SIGTERM
