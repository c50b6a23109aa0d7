"""Snapshot benchmark: load request → vCPUs running, lazy (the page server) against the eager
copy it replaces, at two memory sizes, beside a cold boot of the same guest.

.venv/bin/python bench/snapshot.py [--sizes 256,2048] [--runs 5] [--baseline LABEL=PATH ...] [--profile]

For each size the test guest (test=snap: it counts in memory and does block I/O) is booted,
paused and snapshotted (Full). The memory file is then made dense: every page the guest has
not used (above 32 MiB) is filled with data, as a guest that has touched all its memory
would leave it; the guest does not read those pages, so it restores and runs the same. Then:

- "load → vCPUs running": PUT /snapshot/load with resume_vm=true, timed at the client (the
  call returns once the vCPU worker runs its vCPUs), in a fresh embervm each run, once it
  serves: its answer to GET /machine-config came, as firecracker-go-sdk's `waitForSocket`
  waits for that answer before it configures a VMM. A VMM of the fork server accepts on its
  socket before it serves (controlplane.cli.BIND_EARLY), so a request sent at once waits for
  the rest of its start; that is the launch's cost (bench/api.py: launch → GET / answered),
  not the load's;
- "launch → vCPUs running": the whole restore from nothing: the launch, the wait until it
  serves, and the load;
- "eager copy": what loading the same memory file into a memfd before the guest runs costs
  (shared.snapshot_memory.load_memory, the path the page server replaced);
- "cold boot": PUT /actions InstanceStart of the same configuration, to the guest's first
  count line.

Firecracker's published figure is printed beside them for reference (not measured here).
With `--profile`, after the timed runs of each size, `--runs` more loads through each fork
server (this tree's and each baseline's) are traced (`shared.startup_trace`) and the median
timeline of a load is printed per variant (ms since the client sent PUT /snapshot/load; a
baseline prints only the marks its code has).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import variants as v  # noqa: E402
from bench.apiproc import EMBERVM, wait_accepting  # noqa: E402
from bench.startup_profile import Profile  # noqa: E402
from guest.build import build_guest  # noqa: E402
from shared.snapshot_memory import load_memory  # noqa: E402
from tests.support.api_client import ApiClient  # noqa: E402

COUNT = re.compile(rb"snap: count (\d+) ok")
DENSE_FROM = 32 << 20
FIRECRACKER_NOTE = (
    "Firecracker's published restore figures (tests/integration_tests/performance/test_snapshot_perf.py at\n"
    "462187503c89, LOAD_LATENCY_BASELINES: its `latencies_us.load_snapshot` metric, measured inside the VMM around\n"
    "its restore, 2 vCPUs, 256 and 512 MiB): x86_64 9 ms (+30 ms on host kernels >= 5.4,\n"
    "firecracker#2129; +115 ms with an io_uring drive), aarch64 3 ms; its comment: 'Target is < 5ms'.\n"
    "It maps the memory file MAP_PRIVATE, so its load copies no memory either. Not run on this host; the\n"
    "figures above are at the client, so they also hold the HTTP round trip (--profile: 'load: request taken'\n"
    "to 'load: microVM restored' is embervm's own load_snapshot metric)."
)


class Proc:
    def __init__(
        self, sock: str, console: Path, variant: v.Variant | None = None, trace: dict[str, str] | None = None
    ) -> None:
        import subprocess

        self.console_path = console
        self._out = open(console, "wb")  # noqa: SIM115 - closed in stop()
        command, env = (variant.command, variant.environ()) if variant else ([EMBERVM], None)
        if trace:
            env = {**(env or os.environ), **trace}
        self.launched = time.perf_counter()
        self.proc = subprocess.Popen(
            [*command, "--api-sock", sock],
            stdout=self._out,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        wait_accepting(sock, self.proc)
        self.api = ApiClient(sock, timeout=120)

    def wait_serving(self) -> None:
        """Until the VMM answers GET /machine-config (see the module's docstring)."""
        response = self.api.get("/machine-config")
        if response.status_code != 200:
            raise RuntimeError(f"GET /machine-config: {response.status_code} {response.text}")

    def load(self, body: dict[str, object]) -> tuple[int, float, float]:
        """PUT /snapshot/load once the VMM serves: (monotonic_ns and perf_counter when the
        request went, perf_counter when its answer came)."""
        self.wait_serving()
        start_ns, start = time.monotonic_ns(), time.perf_counter()
        expect(self.api.put("/snapshot/load", json=body), "load")
        return start_ns, start, time.perf_counter()

    def counts(self) -> list[int]:
        return [int(m) for m in COUNT.findall(self.console_path.read_bytes())]

    def wait_count(self, above: int = -1, timeout: float = 60) -> float:
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if any(c > above for c in self.counts()):
                return time.perf_counter()
            time.sleep(0.002)
        raise RuntimeError(f"no count above {above}: {self.console_path.read_bytes()[-300:]!r}")

    def stop(self) -> None:
        self.api.close()
        self.proc.kill()
        self.proc.wait()
        self._out.close()


def expect(response, what: str) -> None:  # type: ignore[no-untyped-def]
    if response.status_code != 204:
        raise RuntimeError(f"{what}: {response.status_code} {response.text}")


def configure(api: ApiClient, kernel: Path, disk: Path, mib: int) -> None:
    expect(api.put("/machine-config", json={"vcpu_count": 1, "mem_size_mib": mib}), "machine-config")
    boot = {"kernel_image_path": str(kernel), "boot_args": "test=snap snap.delay=20000"}
    expect(api.put("/boot-source", json=boot), "boot-source")
    drive = {"drive_id": "disk", "path_on_host": str(disk), "is_root_device": False}
    expect(api.put("/drives/disk", json=drive), "drive")


def load_body(state: Path, mem: Path) -> dict[str, object]:
    """PUT /snapshot/load of the bench's snapshot, resumed at once."""
    backend = {"backend_type": "File", "backend_path": str(mem)}
    return {"snapshot_path": str(state), "mem_backend": backend, "resume_vm": True}


def make_dense(mem: Path, size: int) -> None:
    chunk = os.urandom(1 << 20)
    with open(mem, "r+b") as f:
        for offset in range(DENSE_FROM, size, len(chunk)):
            f.seek(offset)
            f.write(chunk)


def bench_size(
    tmp: Path, kernel: Path, mib: int, runs: int, variants: list[v.Variant], profile: bool = False
) -> dict[str, dict[str, float]]:
    """Per variant: medians of the load, the next count, the eager copy and a cold boot; the
    variants' runs interleaved, every load of the one snapshot this tree made. `profile`:
    then trace `runs` more loads through each fork-server variant, interleaved, and print
    their timelines."""
    disk = tmp / "disk.img"
    disk.write_bytes(bytes(256 * 512))
    cold: dict[str, list[float]] = {x.label: [] for x in variants}
    for i in range(runs):
        for n, variant in enumerate(variants):
            vm = Proc(str(tmp / f"cold{i}-{n}.sock"), tmp / f"cold{i}-{n}.out", variant)
            try:
                configure(vm.api, kernel, disk, mib)
                start = time.perf_counter()
                expect(vm.api.put("/actions", json={"action_type": "InstanceStart"}), "start")
                cold[variant.label].append(vm.wait_count() - start)
            finally:
                vm.stop()
    source = Proc(str(tmp / "source.sock"), tmp / "source.out")
    state, mem = tmp / "vm.state", tmp / "vm.mem"
    try:
        configure(source.api, kernel, disk, mib)
        expect(source.api.put("/actions", json={"action_type": "InstanceStart"}), "start")
        source.wait_count(2)
        expect(source.api.patch("/vm", json={"state": "Paused"}), "pause")
        body = {"snapshot_type": "Full", "snapshot_path": str(state), "mem_file_path": str(mem)}
        expect(source.api.put("/snapshot/create", json=body), "create")
        last = max(source.counts())
    finally:
        source.stop()
    make_dense(mem, mib << 20)
    loads: dict[str, list[float]] = {x.label: [] for x in variants}
    restores: dict[str, list[float]] = {x.label: [] for x in variants}
    first_counts: dict[str, list[float]] = {x.label: [] for x in variants}
    eager = []
    for i in range(runs):
        for n, variant in enumerate(variants):
            vm = Proc(str(tmp / f"load{i}-{n}.sock"), tmp / f"load{i}-{n}.out", variant)
            try:
                _, start, answered = vm.load(load_body(state, mem))
                loads[variant.label].append(answered - start)
                restores[variant.label].append(answered - vm.launched)
                first_counts[variant.label].append(vm.wait_count(last) - start)
            finally:
                vm.stop()
        fd = os.open(mem, os.O_RDONLY)
        try:
            start = time.perf_counter()
            os.close(load_memory(fd, mib << 20, "bench"))
            eager.append(time.perf_counter() - start)
        finally:
            os.close(fd)
    traced = [x for x in variants if x.server is not None] if profile else []
    marks = {x.label: Profile(f"{tmp}/trace-{n}") for n, x in enumerate(traced)}
    answered: dict[str, list[float]] = {x.label: [] for x in traced}
    counted: dict[str, list[float]] = {x.label: [] for x in traced}
    for i in range(runs if traced else 0):
        for n, variant in enumerate(traced):
            trace = marks[variant.label]
            vm = Proc(str(tmp / f"trace{i}-{n}.sock"), tmp / f"trace{i}-{n}.out", variant, trace.env())
            try:
                start_ns, start, answer = vm.load(load_body(state, mem))
                answered[variant.label].append((answer - start) * 1e3)
                counted[variant.label].append((vm.wait_count(last) - start) * 1e3)
                trace.take(start_ns)
            finally:
                vm.stop()
    for variant in traced:
        until = {
            "bench: load answered": statistics.median(answered[variant.label]),
            "bench: next count": statistics.median(counted[variant.label]),
        }
        marks[variant.label].print(f"where a load's time goes at {mib} MiB, {variant.label}", until)
    return {
        x.label: {
            "load": statistics.median(loads[x.label]) * 1e3,
            "restore": statistics.median(restores[x.label]) * 1e3,
            "first_count": statistics.median(first_counts[x.label]) * 1e3,
            "eager": statistics.median(eager) * 1e3,
            "cold": statistics.median(cold[x.label]) * 1e3,
        }
        for x in variants
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,2048", help="guest memory sizes in MiB")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline", action="append", default=[], metavar="LABEL=PATH", help="another checkout")
    parser.add_argument("--profile", action="store_true", help="then trace loads through the fork servers")
    opts = parser.parse_args()
    kernel = build_guest().elf
    results = {}
    for mib in (int(s) for s in opts.sizes.split(",")):
        with (
            tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp,
            contextlib.ExitStack() as stack,
        ):
            variants = [*v.baselines(opts.baseline, tmp, stack), v.cold()]
            variants.append(stack.enter_context(v.fork_server(tmp)).variant())
            results[mib] = bench_size(Path(tmp), kernel, mib, opts.runs, variants, opts.profile)
    print(f"medians of {opts.runs} interleaved runs, test guest (test=snap), dense memory file, 1 vCPU")
    print(
        f"{'memory':>8} {'variant':28} {'load → vCPUs running':>22} {'→ next count':>14} "
        f"{'launch → vCPUs running':>24} {'eager copy (old)':>17} {'cold boot':>11}"
    )
    for mib, by_variant in results.items():
        for label, r in by_variant.items():
            print(
                f"{mib:>5} MiB {label:28} {r['load']:>19.1f} ms {r['first_count']:>11.1f} ms "
                f"{r['restore']:>21.1f} ms {r['eager']:>14.1f} ms {r['cold']:>8.1f} ms"
            )
    print("goal (issue 15): load → vCPUs running ≤ 50 ms at both sizes, on an embervm that serves")
    print(FIRECRACKER_NOTE)


if __name__ == "__main__":
    main()
