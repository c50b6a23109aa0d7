"""Creation-rate benchmark: microVMs configured, started and reaped through the API.

    .venv/bin/python bench/churn.py [--vms 50] [--parallel N] [--baseline LABEL=PATH ...]
    .venv/bin/python bench/churn.py --duration 60        # leak mode

Each microVM is its own `embervm` process driven over its API socket: PUT /boot-source
(the test guest, which powers off at once), PUT /machine-config, PUT /actions
InstanceStart, then the process is reaped when the guest resets. Cold and through a fork
server (bench/variants.py); prints microVMs per second per host core and the CPU time per
microVM of every process involved (client, server, reaper, VMM, zygote, workers), next to
the goals (issue 17: ≥ 5 per core per second, ≤ 200 ms CPU) and Firecracker's figure.

Leak mode (`--duration S`): creates, boots and destroys microVMs through the fork server in
a loop for S seconds, then reports what is left compared with before: the server's fds and
children, embervm processes on the host, run-directory files (/tmp/embervm-*) and the
server's memory, and the VMMs' run directories (a TMPDIR of their own). Processes must be
zero, the rest flat.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import variants as v  # noqa: E402
from bench.apiproc import launch  # noqa: E402
from bench.procstats import descendants, memory_kib  # noqa: E402
from guest.build import build_guest  # noqa: E402
from tests.support.api_client import ApiClient  # noqa: E402

FIRECRACKER_VMS_PER_CORE_PER_S = 5.0
GOAL_CPU_MS = 200.0


def one_microvm(variant: v.Variant, sock: str, kernel: str, index: int) -> None:
    proc, _ = launch(sock, f"churn{index}", command=variant.command, env=variant.environ())
    try:
        with ApiClient(sock) as api:
            for path, body in (
                ("/boot-source", {"kernel_image_path": kernel, "boot_args": "console=ttyS0 test=boot"}),
                ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}),
                ("/actions", {"action_type": "InstanceStart"}),
            ):
                response = api.put(path, json=body)
                if response.status_code != 204:
                    raise RuntimeError(f"PUT {path} answered {response.status_code}: {response.text}")
        if proc.wait(timeout=60) != 0:
            raise RuntimeError(f"microVM {index} exited with status {proc.returncode}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def churn(variant: v.Variant, kernel: str, vms: int, parallel: int, tmp: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of every process involved) for `vms` microVMs."""
    cpu_before = v.children_cpu_s() + (variant.server.cpu_s() if variant.server else 0.0)
    start = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(lambda i: one_microvm(variant, f"{tmp}/vm{i}.sock", kernel, i), range(vms)))
    wall = time.perf_counter() - start
    if variant.server:
        variant.server.settle()
    cpu_after = v.children_cpu_s() + (variant.server.cpu_s() if variant.server else 0.0)
    return wall, cpu_after - cpu_before


def snapshot(server: v.ForkServer, run_dir: Path) -> dict[str, int]:
    pid = server.proc.pid
    memory = memory_kib(pid)
    return {
        "server fds": len(os.listdir(f"/proc/{pid}/fd")),
        "reapers and their processes": sum(len(descendants(reaper)) for reaper in server.reapers()),
        "clients left": len(descendants(os.getpid())) - 1 - len(descendants(pid)),  # not this one, not the server's
        "run-directory files": sum(1 for _ in run_dir.rglob("*")),
        "server PSS KiB": memory["pss"],
        "server RSS KiB": memory["rss"],
    }


def leak_mode(kernel: str, duration: float, tmp: str) -> None:
    """Create, boot and destroy microVMs through a fork server for `duration` s; then compare
    what is left with before. The VMMs' run directories go to a TMPDIR of their own."""
    run_dir = Path(tmp) / "run"
    run_dir.mkdir()
    with v.fork_server(tmp) as server:
        variant = server.variant()
        variant.env["TMPDIR"] = str(run_dir)
        one_microvm(variant, f"{tmp}/warm.sock", kernel, 0)  # first-use allocations are not leaks
        server.settle()
        before = snapshot(server, run_dir)
        count, start = 0, time.monotonic()
        while time.monotonic() - start < duration:
            one_microvm(variant, f"{tmp}/leak{count}.sock", kernel, count)
            count += 1
        server.settle()
        after = snapshot(server, run_dir)
    print(f"leak mode: {count} microVMs created, booted and destroyed in {duration:.0f} s (fork server)")
    for key, was in before.items():
        now = after[key]
        flat = now <= was if "KiB" not in key else now - was <= max(256, was // 100)  # page-sized noise
        print(f"  {key:28} before {was:8d}   after {now:8d}   {'ok' if flat else 'LEAK'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, default=50)
    parser.add_argument("--parallel", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--baseline", action="append", default=[], metavar="LABEL=PATH")
    parser.add_argument("--no-cold", action="store_true", help="only the fork server")
    parser.add_argument("--duration", type=float, help="leak mode: loop for this many seconds")
    opts = parser.parse_args()
    kernel = str(build_guest().elf)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        if opts.duration:
            leak_mode(kernel, opts.duration, tmp)
            return
        variants = v.baselines(opts.baseline, tmp, stack) + ([] if opts.no_cold else [v.cold()])
        variants.append(stack.enter_context(v.fork_server(tmp)).variant())
        print(f"{opts.vms} microVMs per variant, {opts.parallel} at a time, on {cores} cores:")
        for variant in variants:
            wall, cpu = churn(variant, kernel, opts.vms, opts.parallel, tmp)
            rate = opts.vms / wall / cores
            cpu_ms = cpu / opts.vms * 1e3
            print(f"  {variant.label:28} {rate:5.2f} microVMs / s / core, CPU {cpu_ms:5.0f} ms per microVM "
                  f"({wall:.1f} s wall; goals ≥ {FIRECRACKER_VMS_PER_CORE_PER_S:.0f} / s / core, "
                  f"≤ {GOAL_CPU_MS:.0f} ms)")  # fmt: skip
        print(f"  {'firecracker (published)':28} {FIRECRACKER_VMS_PER_CORE_PER_S:5.2f} microVMs / s / core")


if __name__ == "__main__":
    main()
