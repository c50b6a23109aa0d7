"""The fork-server client: what it imports before it knows whether a server answers, its JSON,
and the `-I -S` launcher that starts it (controlplane/forkclient.py, client_launcher.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane import client_launcher, forkclient
from shared.versions import FIRECRACKER_VERSION

REPO = Path(__file__).resolve().parents[3]
# Pure-Python modules that cost milliseconds each and that the client does without.
SLOW_MODULES = {"socket", "signal", "json", "typing", "enum", "re", "selectors", "hashlib", "pathlib"}


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
