"""Creation-rate benchmark: microVMs configured, started and reaped through the API.

    .venv/bin/python bench/churn.py [--vms 50] [--parallel N]

Each microVM is its own `embervm` process driven over its API socket: PUT /boot-source
(the test guest, which powers off at once), PUT /machine-config, PUT /actions
InstanceStart, then the process is reaped when the guest resets. Prints microVMs per
second per host core and CPU time per microVM, next to Firecracker's published figure.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.apiproc import launch  # noqa: E402
from guest.build import build_guest  # noqa: E402
from tests.support.api_client import ApiClient  # noqa: E402

FIRECRACKER_VMS_PER_CORE_PER_S = 5.0


def one_microvm(sock: str, kernel: str, index: int) -> None:
    proc, _ = launch(sock, f"churn{index}")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, default=50)
    parser.add_argument("--parallel", type=int, default=os.cpu_count() or 1)
    opts = parser.parse_args()
    kernel = str(build_guest().elf)
    cores = os.cpu_count() or 1
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(opts.parallel) as pool:
        list(pool.map(lambda i: one_microvm(f"{tmp}/vm{i}.sock", kernel, i), range(opts.vms)))
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rate = opts.vms / wall / cores
    print(f"{opts.vms} microVMs, {opts.parallel} at a time, on {cores} cores: {wall:.1f} s wall")
    print(f"embervm     : {rate:.2f} microVMs / s / core, CPU time {cpu / opts.vms * 1e3:.0f} ms per microVM")
    print(f"firecracker : {FIRECRACKER_VMS_PER_CORE_PER_S:.2f} microVMs / s / core (published)")
    print(f"ratio embervm/firecracker: {rate / FIRECRACKER_VMS_PER_CORE_PER_S:.2f}")


if __name__ == "__main__":
    main()
