"""The target of the red-team suite: one real `embervm` with every device kind, and the host
around it (a secret file, sockets, victims) that a compromised worker must not reach.

`RedTeamVmm` runs tests/security/redteam_embervm.py (the real `embervm` with the test hook
armed) in a throwaway network namespace holding its TAP, booted from a config file with a
block, a net and a vsock device, and with its API socket up. `attack(worker, name, arg)`
sends one attack of `shared.redteam` to one worker and returns its outcome: the worker's
own report, or "blocked: killed by seccomp (...)" when its filter killed it. A device
worker is replaced by the supervisor (the restart policy allows it at once); a dead vCPU
worker ends the microVM, so the next attack starts a new `embervm` (`ensure`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from tests.security.redteam_embervm import RELAY_FD_ENV
from tests.support import netns
from tests.support.api_client import ApiClient
from tests.support.console import ConsoleCapture

REPO = Path(__file__).resolve().parents[2]
TAP = "embrtap0"
GUEST_READY = "kbd: waiting"  # the guest idles (hlt) until the kbd test's deadline
WORKERS = {"vcpu": "vcpu", "block": "block_rootfs", "net": "net_eth0", "vsock": "vsock"}
ANSWER_TIMEOUT_S = 15.0
START_TIMEOUT_S = 60.0
SECTORS = 64


class Host:
    """What exists on the host beside embervm: the attackers' targets (all made by the test)."""

    def __init__(self, ns: netns.NetNs) -> None:
        self.dir = tempfile.mkdtemp(prefix="embervm-redteam-", dir="/tmp")
        os.chmod(self.dir, 0o755)  # traversable: only the worker's own confinement may hide what is inside
        self.secret = f"{self.dir}/secret"
        Path(self.secret).write_text("host secret\n")
        os.chmod(self.secret, 0o600)
        self.not_executable = f"{self.dir}/not-executable"
        Path(self.not_executable).write_text("#!/bin/sh\nexit 0\n")
        os.chmod(self.not_executable, 0o644)
        self.disk = f"{self.dir}/rootfs.img"
        Path(self.disk).write_bytes(bytes(SECTORS * 512))
        self.root_socket = f"{self.dir}/root-only.sock"
        self.abstract_name = f"embervm-redteam-{os.getpid()}"
        root_only = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        root_only.bind(self.root_socket)
        os.chmod(self.root_socket, 0o600)
        with ns.entered():  # abstract names live in a network namespace: embervm's
            abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        abstract.bind("\0" + self.abstract_name)
        self.listeners = [root_only, abstract]
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, name="redteam-host-sockets", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        """Answer every connection with a banner (a connect that got through is then obvious)."""
        with selectors.DefaultSelector() as sel:
            for listener in self.listeners:
                listener.listen(16)
                sel.register(listener, selectors.EVENT_READ)
            sel.register(self._stop_r, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    if key.fileobj == self._stop_r:
                        return
                    conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
                    with conn, contextlib.suppress(OSError):
                        conn.sendall(b"host-only service")

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(5)
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        for listener in self.listeners:
            listener.close()
        subprocess.run(["rm", "-rf", self.dir], check=False)


class _Pump(threading.Thread):
    def __init__(self, stream: IO[bytes], sink: ConsoleCapture) -> None:
        super().__init__(daemon=True)
        self.stream, self.sink = stream, sink

    def run(self) -> None:
        with self.stream:
            for chunk in iter(lambda: self.stream.read1(4096), b""):  # type: ignore[attr-defined]
                self.sink.write(chunk)


class RedTeamVmm:
    """One `embervm` at a time (a new one after the vCPU worker dies); see the module doc."""

    def __init__(self, host: Host, ns: netns.NetNs, kernel: Path) -> None:
        self.host, self.ns, self.kernel = host, ns, kernel
        self.launches = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: ApiClient | None = None
        self.broken = False  # it stopped answering: start a new one before the next attack
        self.hook_dead = False  # a fresh embervm never answered: the test hook itself is broken
        self._answered = 0  # attacks answered by this embervm
        self._seq = itertools.count(1)
        self._relay_w = -1

    # --- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        self.launches += 1
        n = self.launches
        self.api_sock = f"{self.host.dir}/fc{n}.sock"
        self.log_path = Path(f"{self.host.dir}/embervm{n}.log")
        config = {
            "boot-source": {
                "kernel_image_path": str(self.kernel),
                "boot_args": "console=ttyS0 test=kbd kbd.timeout_ms=3600000",
            },
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
            "drives": [
                {"drive_id": "rootfs", "path_on_host": self.host.disk, "is_root_device": True, "is_read_only": False}
            ],
            "network-interfaces": [{"iface_id": "eth0", "host_dev_name": TAP, "guest_mac": "06:00:00:00:0b:01"}],
            "vsock": {"guest_cid": 3, "uds_path": f"{self.host.dir}/v{n}.sock"},
            # Every attack the filter stops kills its worker: replace device workers at once, always.
            "restart-policy": {"max_restarts": 1000, "window_s": 1, "backoff_initial_s": 0, "backoff_max_s": 0},
        }
        config_path = Path(f"{self.host.dir}/vm{n}.json")
        config_path.write_text(json.dumps(config))
        relay_r, self._relay_w = os.pipe()
        command = [sys.executable, "-m", "tests.security.redteam_embervm", "--api-sock", self.api_sock]
        command += ["--config-file", str(config_path), "--log-path", str(self.log_path)]
        with self.ns.entered():  # embervm (its supervisor, and so its workers) lives in the namespace
            self.proc = subprocess.Popen(
                command,
                cwd=REPO,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(relay_r,),
                env={**os.environ, RELAY_FD_ENV: str(relay_r)},
            )
        os.close(relay_r)
        self.console, self.stderr = ConsoleCapture(), ConsoleCapture()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._pumps = [_Pump(self.proc.stdout, self.console), _Pump(self.proc.stderr, self.stderr)]
        for pump in self._pumps:
            pump.start()
        self.broken = False
        self._answered = 0
        self._log = b""
        self._wait_started()

    def _wait_started(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not os.path.exists(self.api_sock):
            assert self.proc is not None and self.proc.poll() is None, f"embervm exited:\n{self.stderr.text}"
            assert time.monotonic() < deadline, f"no API socket:\n{self.stderr.text}"
            time.sleep(0.05)
        self.client = ApiClient(self.api_sock)
        self.console.wait_for(GUEST_READY, timeout=max(1.0, deadline - time.monotonic()))

    def stop(self) -> None:
        if self.proc is None:
            return
        pids = [int(w["pid"]) for w in self._workers_or_empty()]
        if self.client is not None:
            self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pump in self._pumps:
            pump.join(5)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        os.close(self._relay_w)
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{pid}") for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.02)  # the workers die with the zygote; the TAP is free once they have
        self.proc = None

    def ensure(self) -> None:
        """A running microVM whose vCPU worker lives and whose supervisor answers."""
        if self.proc is not None and not self.broken and self.proc.poll() is None and self.vcpu_alive():
            return
        self.stop()
        self.start()

    # --- what the supervisor says -----------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        assert self.client is not None
        return self.client.get("/embervm").json()  # type: ignore[no-any-return]

    def _workers_or_empty(self) -> list[dict[str, Any]]:
        with contextlib.suppress(Exception):
            return list(self.info()["workers"])
        return []

    def worker(self, name: str) -> dict[str, Any]:
        (found,) = [w for w in self.info()["workers"] if w["name"] == name]
        return found  # type: ignore[no-any-return]

    def pid(self, name: str) -> int:
        return int(self.worker(name)["pid"])

    @property
    def supervisor_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def vcpu_alive(self) -> bool:
        try:
            info = self.info()
        except Exception:
            return False
        return bool(self.worker("vcpu")["alive"]) and "exit_code" not in info

    def log_text(self) -> str:
        """embervm's log so far (read on from where the last call stopped)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(len(self._log))
                self._log += f.read()
        except FileNotFoundError:
            pass
        return self._log.decode(errors="replace")

    # --- attacks ------------------------------------------------------------------------------
    def attack(self, worker: str, name: str, arg: object = "", timeout: float = ANSWER_TIMEOUT_S) -> str:
        """Run attack `name` in `worker`; its outcome (see shared.redteam)."""
        assert not self.hook_dead, "the red-team hook does not answer (see the first failure)"
        self.ensure()
        before = self.worker(worker)
        seq = next(self._seq)
        os.write(self._relay_w, f"{worker} {seq} {name} {arg}\n".encode())
        tag = re.compile(rf"redteam#{seq} {re.escape(name)}: (.*)$", re.MULTILINE)
        deadline = time.monotonic() + timeout
        polls = 0
        while time.monotonic() < deadline:
            found = tag.search(self.log_text(), max(0, len(self._log) - (1 << 20)))
            if found:
                self._answered += 1
                return found.group(1)
            polls += 1
            if polls % 4 == 0:  # GET / is slower than reading the log: look for a death less often
                death = self._death(worker, before)
                if death is not None:
                    self._answered += 1
                    return death
            time.sleep(0.03)
        if not self._answered:  # not an attack's effect: nothing ever came back from this embervm
            self.hook_dead = True
            raise AssertionError(f"no worker answers the red-team hook; embervm's stderr:\n{self.stderr.text[-3000:]}")
        self.broken = True
        return f"no answer within {timeout:g} s (the supervisor no longer relays worker messages?)"

    def _death(self, worker: str, before: dict[str, Any]) -> str | None:
        """How `worker` died since `before`, once its replacement runs (None: it did not)."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            return f"died: embervm exited ({self.proc.returncode})"
        info = self.info()
        now = self.worker(worker)
        if worker == "vcpu":
            if now["alive"] and "exit_code" not in info:
                return None
            reason = info.get("exit_reason") or now.get("exit_reason")
            if reason is None:
                return None  # dead, its end not yet recorded
        else:
            if now["pid"] == before["pid"] or not now["alive"]:
                return None  # alive, or dead but not yet replaced
            reason = str(now.get("last_restart_cause"))
        reason = str(reason)
        if "seccomp" in reason or "SIGSYS" in reason:
            return f"blocked: {reason}"
        return f"died: {reason}"

    def wait_replaced(self, worker: str, old_pid: int, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.worker(worker)
            if now["pid"] != old_pid and now["alive"]:
                return now
            time.sleep(0.05)
        raise AssertionError(f"the {worker} worker (pid {old_pid}) was not replaced within {timeout:g} s")


@contextlib.contextmanager
def victim(uid: int = 0) -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process (a `sleep` of `uid`) that no worker may signal or trace."""
    proc = subprocess.Popen(["sleep", "600"], user=uid if uid else None)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
