"""The ways the benchmarks launch `embervm`, so that each prints them side by side.

- `cold()`: this tree's `embervm` with no fork server (`EMBERVM_FORK_SERVER=off`);
- `tree(label, path)`: the cold path of another checkout (e.g. `git worktree add /tmp/old
  1b7c1ca^`), run with this virtualenv: a baseline from the same run;
- `fork_server(tmp)`: this tree's `embervm` as a client of an `embervm-forkserver` that the
  benchmark starts (and stops) itself; `fork_server(tmp, label, path)`: the same for another
  checkout, its client and server run with this virtualenv (`baselines()` makes both of a
  `--baseline LABEL=PATH`).

CPU time: a cold launch's whole process tree is the benchmark's child, so RUSAGE_CHILDREN
counts it. A fork-server VMM is the server's grandchild; `ForkServer.cpu_s()` is the
server's own CPU plus what it has reaped (its reapers, which reaped the VMMs, which reaped
their zygotes and workers), read from /proc/<server>/stat.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.procstats import process_name
from controlplane.forkserver import REAPER_NAME

BIN = Path(sys.executable).parent
EMBERVM = str(BIN / "embervm")
FORKSERVER = str(BIN / "embervm-forkserver")
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Variant:
    label: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    server: ForkServer | None = None
    takes_args: bool = True  # False: a reference (QEMU) whose command is complete

    def environ(self) -> dict[str, str]:
        return {**os.environ, **self.env}


def cold() -> Variant:
    return Variant("embervm (cold)", [EMBERVM], {"EMBERVM_FORK_SERVER": "off"})


def _entry(path: str, entry: str) -> list[str]:
    """A command that runs `entry` ("module:function") of the checkout at `path` with this
    virtualenv's interpreter, as its console script would (`sys.argv[1:]` are its arguments)."""
    module, _, function = entry.partition(":")
    root = str(Path(path).resolve())
    code = f"import re, sys; sys.path.insert(0, {root!r}); from {module} import {function}; sys.exit({function}())"
    return [sys.executable, "-c", code]


def client_command(path: str) -> list[str]:
    """The `embervm` command of the checkout at `path` as its own scripts/setup installs it:
    the `-I -S` launcher where it has one (controlplane/client_launcher.py), else pip's wrapper."""
    root = Path(path).resolve()
    if not (root / "controlplane" / "client_launcher.py").exists():
        return _entry(path, "controlplane.forkclient:main")
    code = f"import sys; sys.path.insert(0, {str(root)!r}); from controlplane.forkclient import main; main()"
    return [sys.executable, "-I", "-S", "-c", code]


def tree(label: str, path: str) -> Variant:
    """The cold path of the checkout at `path` (its own code, this virtualenv)."""
    return Variant(label, _entry(path, "controlplane.cli:main"), {"EMBERVM_FORK_SERVER": "off"})


def split_baseline(text: str) -> tuple[str, str]:
    label, sep, path = text.partition("=")
    if not sep:
        raise SystemExit(f"--baseline {text!r}: expected LABEL=PATH")
    return label, path


def parse_tree(text: str) -> Variant:
    return tree(*split_baseline(text))


def baselines(
    texts: list[str], directory: str, stack: contextlib.ExitStack, server: bool = True, cold: bool = True
) -> list[Variant]:
    """For each `--baseline LABEL=PATH`: that checkout cold (`cold`) and (`server`) through a
    fork server of its own code, started on the `stack`."""
    found = []
    for text in texts:
        label, path = split_baseline(text)
        if cold:
            found.append(tree(f"{label} (cold)", path))
        if server:
            found.append(stack.enter_context(fork_server(directory, f"{label} (fork server)", path)).variant())
    return found


class ForkServer:
    """An `embervm-forkserver` for the duration of a benchmark."""

    def __init__(
        self,
        directory: str,
        label: str = "embervm (fork server)",
        tree_path: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.label = label
        self.path = f"{directory}/forkserver-{abs(hash(label))}.sock"
        server = [FORKSERVER] if tree_path is None else _entry(tree_path, "controlplane.forkserver:main")
        self.client = [EMBERVM] if tree_path is None else client_command(tree_path)
        self.proc = subprocess.Popen(
            [*server, "--socket", self.path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )
        deadline = time.monotonic() + 120
        while not self._accepting():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"embervm-forkserver did not start (status {self.proc.poll()})")
            time.sleep(0.02)
        self.preload_cpu_s = self.cpu_s()

    def _accepting(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(self.path)
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def variant(self) -> Variant:
        return Variant(self.label, self.client, {"EMBERVM_FORK_SERVER": self.path}, self)

    def cpu_s(self) -> float:
        """The server's CPU seconds plus those of every descendant it has reaped."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        return (utime + stime + cutime + cstime) / CLK_TCK

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until the server has reaped every reaper (their CPU is then counted)."""
        deadline = time.monotonic() + timeout
        while self.reapers() and time.monotonic() < deadline:
            time.sleep(0.005)

    def reapers(self) -> list[int]:
        """The server's children that serve a microVM (not the spare that waits for the next)."""
        tasks = Path(f"/proc/{self.proc.pid}/task").glob("*/children")
        reapers = []
        for pid in (int(pid) for task in tasks for pid in task.read_text().split()):
            with contextlib.suppress(OSError):  # a child that ended meanwhile
                if process_name(pid) == REAPER_NAME:
                    reapers.append(pid)
        return reapers

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


@contextlib.contextmanager
def fork_server(
    directory: str,
    label: str = "embervm (fork server)",
    tree_path: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[ForkServer]:
    server = ForkServer(directory, label, tree_path, env)
    try:
        yield server
    finally:
        server.close()


def children_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def stale_bytecode(root: Path) -> tuple[int, int]:
    """(embervm modules without an up-to-date .pyc, all embervm modules): what each launch
    compiles from source when Python may not write bytecode (PYTHONDONTWRITEBYTECODE)."""
    import importlib.util

    stale = total = 0
    for package in ("controlplane", "shared", "devices", "vcpu_worker"):
        for source in (root / package).rglob("*.py"):
            total += 1
            cached = Path(importlib.util.cache_from_source(str(source)))
            if not cached.exists() or cached.stat().st_mtime < source.stat().st_mtime:
                stale += 1
    return stale, total
