"""Clone benchmark: the memory of N clones of one snapshot against N separate boots.

    .venv/bin/python bench/snapshot_clones.py [--clones 10] [--mib 256]

The test guest (test=echo: it answers each line on its serial port, idle in between) with a
drive, booted N times through the API, each embervm in a folder of its own; then one more is
booted, paused, snapshotted (Full) and killed, and the snapshot loaded into N fresh embervm
processes at once (resume_vm), each in a folder of its own (the drive path is relative: each
clone finds its own copy of the disk). Each of the 2N guests must answer its own line on its
console (it runs on its own). Once the clones' page servers are done, it reports for each set:
the PSS of every embervm process (supervisor, zygote, workers) summed, per microVM, and the
guest memory (the memfd's resident pages) per microVM; and the memory file's size, whose page
cache the clones read from (counted once, it is no process's PSS).

`--dense-mib M` fills M MiB of the memory file above 32 MiB with data before the clones load
(as a guest that had used that much memory would leave it; this guest never reads it), to
show what a clone holds of a snapshot's data: every clone fills its own memfd with all of it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.apiproc import EMBERVM, wait_accepting  # noqa: E402
from bench.procstats import descendants, memory_kib  # noqa: E402
from bench.snapshot import DENSE_FROM  # noqa: E402
from guest.build import build_guest  # noqa: E402
from tests.support.api_client import ApiClient  # noqa: E402

DISK_BYTES = 1 << 20


class Vm:
    """One embervm API process in its own folder; console to a file, stdin its serial input."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.console = workdir / "console.out"
        sock = str(workdir / "api.sock")
        with open(self.console, "wb") as out:
            self.proc = subprocess.Popen(
                [EMBERVM, "--api-sock", sock],
                cwd=workdir,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.DEVNULL,
            )
        wait_accepting(sock, self.proc)
        self.api = ApiClient(sock, timeout=120)

    def expect(self, response, what: str) -> None:  # type: ignore[no-untyped-def]
        if response.status_code != 204:
            raise RuntimeError(f"{self.workdir.name} {what}: {response.status_code} {response.text}")

    def boot(self, kernel: Path, mib: int) -> None:
        self.expect(self.api.put("/machine-config", json={"vcpu_count": 1, "mem_size_mib": mib}), "machine")
        boot = {"kernel_image_path": str(kernel), "boot_args": "console=ttyS0 test=echo"}
        self.expect(self.api.put("/boot-source", json=boot), "boot-source")
        drive = {"drive_id": "data", "path_on_host": "disk.img", "is_root_device": False}
        self.expect(self.api.put("/drives/data", json=drive), "drive")
        self.expect(self.api.put("/actions", json={"action_type": "InstanceStart"}), "start")

    def wait_for(self, text: bytes, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.console.read_bytes():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{self.workdir.name}: no {text!r} on the console")
            time.sleep(0.02)

    def answers_on_its_own(self) -> None:
        """Its guest answers a line only it was sent."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{self.workdir.name}\n".encode())
        self.proc.stdin.flush()
        self.wait_for(f"echo: {self.workdir.name}".encode())

    def pss_kib(self) -> int:
        total = 0
        for pid in descendants(self.proc.pid):
            with contextlib.suppress(OSError, KeyError):
                total += memory_kib(pid)["pss"]
        return total

    def guest_resident_kib(self) -> int:
        """The guest-memory memfd's allocated size, through the supervisor's fd of it."""
        for pid in descendants(self.proc.pid):
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    path = f"/proc/{pid}/fd/{fd}"
                    with contextlib.suppress(OSError):
                        if os.readlink(path).startswith("/memfd:embervm-") and "-mem" in os.readlink(path):
                            return os.stat(path).st_blocks // 2
        return 0

    def stop(self) -> None:
        self.api.close()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.kill()
        self.proc.wait()


def settle(vms: list[Vm], timeout: float = 60) -> None:
    """Until no guest memory grows (the clones' page servers have filled their memfds)."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        now = [vm.guest_resident_kib() for vm in vms]
        if now == last:
            return
        last = now
        time.sleep(1.0)


def measure(vms: list[Vm]) -> dict[str, float]:
    settle(vms)
    pss = [vm.pss_kib() for vm in vms]
    guest = [vm.guest_resident_kib() for vm in vms]
    return {"total": sum(pss) / 1024, "per_vm": sum(pss) / len(pss) / 1024, "guest": sum(guest) / len(guest) / 1024}


def new_disk(workdir: Path, source: Path | None = None) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    if source is None:
        (workdir / "disk.img").write_bytes(bytes(DISK_BYTES))
    else:
        shutil.copyfile(source, workdir / "disk.img")


def boots(tmp: Path, kernel: Path, n: int, mib: int) -> dict[str, float]:
    vms: list[Vm] = []
    try:
        for i in range(n):
            new_disk(tmp / f"boot{i}")
            vm = Vm(tmp / f"boot{i}")
            vms.append(vm)
            vm.boot(kernel, mib)
        for vm in vms:
            vm.wait_for(b"echo ready")
            vm.answers_on_its_own()
        return measure(vms)
    finally:
        for vm in vms:
            vm.stop()


def make_dense(mem: Path, mib: int) -> None:
    chunk = os.urandom(1 << 20)
    with open(mem, "r+b") as f:
        for offset in range(DENSE_FROM, DENSE_FROM + (mib << 20), len(chunk)):
            f.seek(offset)
            f.write(chunk)


def clones(tmp: Path, kernel: Path, n: int, mib: int, dense_mib: int) -> tuple[dict[str, float], float]:
    new_disk(tmp / "source")
    source = Vm(tmp / "source")
    try:
        source.boot(kernel, mib)
        source.wait_for(b"echo ready")
        source.expect(source.api.patch("/vm", json={"state": "Paused"}), "pause")
        body = {"snapshot_type": "Full", "snapshot_path": "../vm.state", "mem_file_path": "../vm.mem"}
        source.expect(source.api.put("/snapshot/create", json=body), "create")
    finally:
        source.stop()
    if dense_mib:
        make_dense(tmp / "vm.mem", dense_mib)
    mem_file_mib = os.stat(tmp / "vm.mem").st_blocks * 512 / (1 << 20)
    vms: list[Vm] = []
    try:
        for i in range(n):
            new_disk(tmp / f"clone{i}", tmp / "source" / "disk.img")
            vms.append(Vm(tmp / f"clone{i}"))
        load = {
            "snapshot_path": "../vm.state",
            "mem_backend": {"backend_type": "File", "backend_path": "../vm.mem"},
            "resume_vm": True,
        }
        for vm in vms:
            vm.expect(vm.api.put("/snapshot/load", json=load), "load")
        for vm in vms:
            vm.answers_on_its_own()
        return measure(vms), mem_file_mib
    finally:
        for vm in vms:
            vm.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clones", type=int, default=10, help="N: clones, and separate boots")
    parser.add_argument("--mib", type=int, default=256, help="guest memory")
    parser.add_argument("--dense-mib", type=int, default=0, help="data added to the memory file (see above)")
    opts = parser.parse_args()
    kernel = build_guest().elf
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        booted = boots(Path(tmp) / "boots", kernel, opts.clones, opts.mib)
        cloned, mem_file_mib = clones(Path(tmp) / "clones", kernel, opts.clones, opts.mib, opts.dense_mib)
    n = opts.clones
    dense = f", memory file +{opts.dense_mib} MiB of data" if opts.dense_mib else ""
    print(f"{n} microVMs, test guest (test=echo, idle), {opts.mib} MiB, 1 vCPU, a drive{dense}")
    print("PSS of every embervm process (supervisor, zygote, workers), and the guest-memory memfd")
    print(f"{'':>24} {'total PSS':>11} {'PSS per VM':>11} {'guest memory per VM':>20}")
    for label, r in ((f"{n} separate boots", booted), (f"{n} clones of 1 snapshot", cloned)):
        print(f"{label:>24} {r['total']:>7.1f} MiB {r['per_vm']:>7.1f} MiB {r['guest']:>16.1f} MiB")
    print(f"memory file: {mem_file_mib:.1f} MiB of data, in the page cache once for all clones (no process's PSS)")


if __name__ == "__main__":
    main()
