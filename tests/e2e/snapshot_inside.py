"""Runs inside the outer VM: the nested snapshot scenario (tests/e2e/test_nested_snapshot.py).

    python -m tests.e2e.snapshot_inside '<json scenario>'

1. `source`: embervm, configured through the API from the scenario's case (root on vda,
   virtio-net with MMDS V2 on a TAP, vsock), boots Debian's Linux; its /init runs
   `check_snapshot` (guest/inner_init.sh): it holds a vsock connection to the host and counts
   on the serial console. Once it has counted a few times: PATCH /vm Paused, PUT
   /snapshot/create (Full), SIGKILL.
2. `restored`: a new embervm in the same folder, PUT /snapshot/load with resume_vm, PUT /mmds
   (the store is not part of a snapshot), then "E2E-GO <address>@<peer>" on its stdin, which
   is the guest's serial input: the guest checks what it can do after the restore and powers off.
3. `clone1`, `clone2`: the same snapshot loaded into two embervm processes at once, each in
   its own folder (the snapshot's drive and vsock paths are relative: each finds its own copy
   of the root image as it was at the snapshot, and its own socket) with its own TAP
   (`network_overrides`), its own MMDS identity and its own address.

Each embervm process is framed as a case, as tests.e2e.inside frames its cases
(`E2E-CASE-BEGIN <name>`, its API requests, console, embervm's log, `E2E-SECCOMP`, then the
driver's facts as `E2E-AFTER key=value` lines, `E2E-CASE-END`), so tests.e2e.nested parses it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.e2e.inside import api_requests, config_for, drive_api, embervm_command, sample_seccomp
from tests.support.api_client import ApiClient

BASE = Path("/tmp/e2e-snap")
GUEST = Path("/e2e/guest")
VSOCK_HOST = [sys.executable, str(Path(__file__).parent / "guest" / "vsock_host.py")]
MKTAP = [sys.executable, str(Path(__file__).parent / "guest" / "mktap.py")]
COUNTS_BEFORE = 3  # the guest's count the snapshot waits for


def out(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


class Embervm:
    """One embervm process with an API socket, in its folder; console and log go to files."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name, self.workdir = name, workdir
        self.sock = workdir / "api.sock"
        self.sock.unlink(missing_ok=True)
        self.console_path, self.log_path = workdir / f"{name}.console", workdir / f"{name}.log"
        self.start = time.monotonic()
        with open(self.console_path, "wb") as console, open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*embervm_command(), "--api-sock", str(self.sock), "--id", name],
                stdin=subprocess.PIPE,
                stdout=console,
                stderr=log,
                cwd=workdir,
            )
        self.facts: list[str] = []
        self.seccomp: dict[str, tuple[int, str]] = {}
        self.api: ApiClient | None = None
        self.progress(f"started pid={self.proc.pid}")

    def client(self, timeout: float = 60) -> ApiClient:
        deadline = time.monotonic() + timeout
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: the API socket never appeared")
            time.sleep(0.05)
        self.api = ApiClient(str(self.sock), timeout=120)
        return self.api

    def fact(self, key: str, value: object) -> None:
        """Kept for the case's frame, and shown at once: a run that times out shows how far it got."""
        self.facts.append(f"{key}={value}")
        self.progress(f"{key}={value}")

    def progress(self, what: str) -> None:
        out(f"E2E-PROGRESS {self.name} {what} t={time.monotonic() - self.start:.1f}")

    def console(self) -> str:
        return self.console_path.read_bytes().decode(errors="replace")

    def wait_console(self, predicate: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.console()):
                return True
            if self.proc.poll() is not None:
                return bool(predicate(self.console()))
            sample_seccomp(self.seccomp)
            time.sleep(0.3)
        return False

    def go(self, address: str) -> None:
        """Start the host's end of the guest's next vsock connection (port 5000), then type
        "E2E-GO <address>" on the guest's serial input (embervm's stdin)."""
        background([*VSOCK_HOST, "serve", "v.sock_5000"], self.workdir, "serve.log")
        # padded: a `read -t` whose deadline passed while the guest was stopped wakes with the
        # input and, past its deadline, returns after taking the line's first byte (busybox)
        self.type_line(f"........ E2E-GO {address}")

    def type_line(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def wait_exit(self, timeout: float) -> tuple[int, bool]:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            sample_seccomp(self.seccomp)
            time.sleep(0.3)
        timed_out = self.proc.poll() is None
        if timed_out:
            self.progress("timed out: killed")
            self.proc.kill()
        status = self.proc.wait()
        self.progress(f"exited status={status}")
        return status, timed_out

    def report(self, api_lines: list[str], status: int, timed_out: bool) -> None:
        """The case's frame (see the module docstring)."""
        if self.api is not None:
            self.api.close()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        text = [f"E2E-CASE-BEGIN {self.name}", *api_lines, self.console().rstrip("\n")]
        text += ["--- embervm log ---", self.log_path.read_bytes().decode(errors="replace").rstrip("\n")]
        text += [f"E2E-SECCOMP {p} mode={m} filters={f}" for p, (m, f) in sorted(self.seccomp.items())]
        text += [f"E2E-AFTER {fact}" for fact in self.facts]
        total = time.monotonic() - self.start
        end = f"status={status} timed_out={int(timed_out)} init_s=-1 total_s={total:.3f}"
        text.append(f"E2E-CASE-END {self.name} {end}")
        out("\n".join(text))


def run(*command: str, cwd: Path) -> str:
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60)
    return (proc.stdout + proc.stderr).strip().replace("\n", " | ")


def background(command: list[str], cwd: Path, log: str) -> subprocess.Popen[bytes]:
    with open(cwd / log, "wb") as f:
        return subprocess.Popen(command, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)


def last_count(console: str) -> int:
    counts = [int(line.split()[1]) for line in console.splitlines() if line.startswith("E2E-COUNT ")]
    return counts[-1] if counts else 0


def identity_on_disk(workdir: Path) -> str:
    """/e2e/identity in the folder's root image (debugfs prints its banner on stderr)."""
    proc = subprocess.run(
        ["debugfs", "-R", "cat /e2e/identity", "rootfs.ext4"], cwd=workdir, capture_output=True, text=True, timeout=60
    )
    return proc.stdout.strip() or f"(none: {proc.stderr.strip().splitlines()[-1:]})"


def embervm_processes() -> list[str]:
    names = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            name = comm.read_text().strip()
        except OSError:
            continue
        if name.startswith("embervm"):
            names.append(name)
    return names


def timed(vm: Embervm, key: str, call: Any) -> int:
    start = time.monotonic()
    response = call()
    vm.fact(f"{key}_status", response.status_code)
    vm.fact(f"{key}_s", f"{time.monotonic() - start:.2f}")
    if response.status_code != 204:
        vm.fact(f"{key}_error", response.text.replace("\n", " "))
    return int(response.status_code)


def source_phase(scenario: dict[str, Any], src: Path) -> int:
    """Boot, wait for the count, pause, snapshot, SIGKILL; the last count the console showed."""
    case = scenario["case"]
    config = json.loads(config_for(case, src).read_text())
    out(f"E2E-SNAPSHOT source tap={run(*MKTAP, 'snap0', '172.16.5.1/30', cwd=src)}")
    hold = background([*VSOCK_HOST, "hold", "v.sock_5002"], src, "hold.log")
    vm = Embervm("source", src)
    api_lines: list[str] = []
    real_stdout = sys.stdout
    try:
        from io import StringIO

        buffer = StringIO()
        sys.stdout = buffer  # drive_api prints its E2E-API lines: they belong in the frame
        try:
            configured = drive_api(vm.sock, vm.proc, api_requests(config, scenario["metadata"]))
        finally:
            sys.stdout = real_stdout
        api_lines = buffer.getvalue().splitlines()
        vm.client()
        looping = configured and vm.wait_console(
            lambda text: "E2E-SNAP looping" in text and last_count(text) >= COUNTS_BEFORE, scenario["boot_timeout"]
        )
        vm.fact("looping", int(looping))
        count = last_count(vm.console())
        if looping:
            assert vm.api is not None
            vm.fact("paused_at", f"{time.time():.2f}")
            timed(vm, "pause", lambda: vm.api.patch("/vm", json={"state": "Paused"}))  # type: ignore[union-attr]
            body = {"snapshot_type": "Full", "snapshot_path": "../vm.state", "mem_file_path": "../vm.mem"}
            timed(vm, "create", lambda: vm.api.put("/snapshot/create", json=body))  # type: ignore[union-attr]
            count = last_count(vm.console())
            mem = BASE / "vm.mem"
            if mem.exists():
                vm.fact("mem_file_mib", mem.stat().st_size >> 20)
                vm.fact("mem_file_allocated_mib", (mem.stat().st_blocks * 512) >> 20)
        vm.fact("last_count", count)
        os.kill(vm.proc.pid, signal.SIGKILL)
        status, _ = vm.wait_exit(30)
        time.sleep(1)
        vm.fact("left_behind", ",".join(embervm_processes()) or "none")
        try:
            hold.wait(10)
        except subprocess.TimeoutExpired:
            hold.kill()
        vm.fact("host_hold", (src / "hold.log").read_text().strip().replace("\n", " | "))
        vm.report(api_lines, status, False)
        return count
    except Exception as e:
        vm.fact("driver_error", repr(e))
        vm.proc.kill()
        vm.report(api_lines, vm.proc.wait(), False)
        return -1


def load_body(network_override: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "snapshot_path": "../vm.state",
        "mem_backend": {"backend_type": "File", "backend_path": "../vm.mem"},
        "resume_vm": True,
    }
    if network_override:
        body["network_overrides"] = [{"iface_id": "net0", "host_dev_name": network_override}]
    return body


def restore(vm: Embervm, override: str | None, identity: str) -> bool:
    """Load the snapshot into `vm`, give it its MMDS identity; True when it runs."""
    try:
        api = vm.client()
        if timed(vm, "load", lambda: api.put("/snapshot/load", json=load_body(override))) != 204:
            return False
        vm.fact("resumed_at", f"{time.time():.2f}")
        state = api.get("/").json().get("state")
        vm.fact("state_after_load", state)
        metadata = {"latest": {"meta-data": {"e2e": identity}}}
        timed(vm, "mmds", lambda: api.put("/mmds", json=metadata))
        return state == "Running"
    except Exception as e:
        vm.fact("driver_error", repr(e))
        return False


def finish(vm: Embervm, timeout: float) -> None:
    status, timed_out = vm.wait_exit(timeout)
    vm.fact("identity_on_disk", identity_on_disk(vm.workdir))
    serve = vm.workdir / "serve.log"
    vm.fact("host_serve", serve.read_text().strip().replace("\n", " | ") if serve.exists() else "not started")
    vm.report([], status, timed_out)


def restored_phase(scenario: dict[str, Any], src: Path) -> None:
    (src / "v.sock").unlink(missing_ok=True)  # the killed source's socket: a load binds it again
    vm = Embervm("restored", src)
    if restore(vm, None, "restored"):
        vm.go("172.16.5.2/30@172.16.5.1")
    finish(vm, scenario["run_timeout"])


def clones_phase(scenario: dict[str, Any], clone_dirs: list[Path]) -> None:
    vms = []
    for i, workdir in enumerate(clone_dirs, 1):
        vm = Embervm(f"clone{i}", workdir)
        vm.fact("tap", run(*MKTAP, f"snapc{i}", f"172.16.{5 + i}.1/30", cwd=workdir) or "ok")
        vms.append(vm)
    results: dict[str, bool] = {}
    threads = [
        threading.Thread(target=lambda vm=vm, i=i: results.__setitem__(vm.name, restore(vm, f"snapc{i}", vm.name)))
        for i, vm in enumerate(vms, 1)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    both = all(results.values()) and all(vm.proc.poll() is None for vm in vms)
    for i, vm in enumerate(vms, 1):
        vm.fact("both_running", int(both))
        if results.get(vm.name):
            vm.go(f"172.16.{5 + i}.2/30@172.16.{5 + i}.1")
    done = [threading.Thread(target=lambda vm=vm: vm.wait_exit(scenario["run_timeout"])) for vm in vms]
    for t in done:
        t.start()
    for t in done:
        t.join()
    for vm in vms:
        finish(vm, 1)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    scenario = json.loads(argv[0])
    shutil.rmtree(BASE, ignore_errors=True)
    src = BASE / "source"
    clone_dirs = [BASE / "clone1", BASE / "clone2"]
    for workdir in (src, *clone_dirs):
        workdir.mkdir(parents=True)
    shutil.copyfile(GUEST / "rootfs.ext4", src / "rootfs.ext4")
    count = source_phase(scenario, src)
    if count < 0 or not (BASE / "vm.state").exists():
        out("E2E-SNAPSHOT no snapshot: the restores are not tried")
        return 1
    for workdir in clone_dirs:  # the root image as the snapshot left it, before the restored guest writes
        shutil.copyfile(src / "rootfs.ext4", workdir / "rootfs.ext4")
    restored_phase(scenario, src)
    clones_phase(scenario, clone_dirs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
