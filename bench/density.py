"""Density benchmark: marginal memory of a running microVM with a drive, a NIC and a vsock.

    .venv/bin/python bench/density.py [--vms 10] [--no-cold] [--baseline LABEL=PATH ...]

Starts 2N microVMs (the test guest waiting on its console, each with a 1 MiB drive, a NIC on
a TAP of its own and a vsock), cold and through a fork server (bench/variants.py), and
reports (PSS of all embervm processes with 2N running - with N running) / N: what one more
microVM costs. Firecracker's published figure (< 5 MiB of VMM overhead per microVM) and the
goal (issue 17: ≤ 10 MiB) are printed beside it. Needs root (TAP devices).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import variants as v  # noqa: E402
from bench.procstats import descendants, memory_kib, process_name  # noqa: E402
from controlplane.forkserver import SPARE_NAME  # noqa: E402
from guest.build import build_guest  # noqa: E402

FIRECRACKER_MIB = 5.0
GOAL_MIB = 10.0


def config(directory: Path, kernel: Path, index: int, tap: str) -> Path:
    drive = directory / f"drive{index}.img"
    drive.write_bytes(b"\0" * (1 << 20))
    body = {
        "boot-source": {"kernel_image_path": str(kernel), "boot_args": "console=ttyS0 test=echo"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "drives": [{"drive_id": "data", "path_on_host": str(drive), "is_root_device": False, "is_read_only": False}],
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": tap, "guest_mac": f"06:00:ac:10:00:{index:02x}"}],
        "vsock": {"guest_cid": 3, "uds_path": str(directory / f"vsock{index}.sock")},
    }
    path = directory / f"vm{index}.json"
    path.write_text(json.dumps(body))
    return path


def start(variant: v.Variant, cfg: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [*variant.command, "--config-file", str(cfg), "--no-api"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=variant.environ(),
    )
    assert proc.stdout is not None
    seen, deadline = b"", time.monotonic() + 60
    while b"echo ready" not in seen:
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk or time.monotonic() > deadline:
            raise RuntimeError(f"microVM {cfg.name} did not start ({variant.label}): {seen[-200:]!r}")
        seen += chunk
    return proc


def vm_pids(variant: v.Variant, procs: list[subprocess.Popen[bytes]]) -> set[int]:
    """Every process of these microVMs, and the fork server and its reapers' trees."""
    pids = [pid for proc in procs for pid in descendants(proc.pid)]
    if variant.server:
        pids += descendants(variant.server.proc.pid)
    return set(pids)


def total_pss_kib(variant: v.Variant, procs: list[subprocess.Popen[bytes]]) -> int:
    total = 0
    for pid in vm_pids(variant, procs):
        with contextlib.suppress(OSError, KeyError):
            total += memory_kib(pid)["pss"]
    return total


def by_process(variant: v.Variant, procs: list[subprocess.Popen[bytes]]) -> dict[str, list[dict[str, int]]]:
    """Each process's memory, by process name (what one more microVM is made of)."""
    table: dict[str, list[dict[str, int]]] = {}
    clients = {proc.pid for proc in procs}
    server = variant.server.proc.pid if variant.server else -1
    for pid in vm_pids(variant, procs):
        with contextlib.suppress(OSError, KeyError):
            name = process_name(pid)
            if pid in clients and variant.server:
                name += " (client)"
            elif pid == server or name == SPARE_NAME:
                name += " (once)"
            table.setdefault(name, []).append(memory_kib(pid))
    return table


def print_by_process(table: dict[str, list[dict[str, int]]], vms: int) -> None:
    print(f"    by process, with {vms} running (KiB each; private: pages no other process maps):")
    total = 0.0
    for name, rows in sorted(table.items(), key=lambda kv: -sum(r["private"] for r in kv[1])):
        private = sum(r["private"] for r in rows) / len(rows)
        pss = sum(r["pss"] for r in rows) / len(rows)
        per_vm = 0.0 if name.endswith("(once)") else sum(r["private"] for r in rows) / vms
        total += per_vm
        print(f"      {name:24} x{len(rows):3}  private {private:7.0f}  PSS {pss:7.0f}  "
              f"({per_vm / 1024:4.1f} MiB per microVM)")  # fmt: skip
    print(f"      {'private, all':24}       {total / 1024:.1f} MiB per microVM")


def measure(variant: v.Variant, configs: list[Path], n: int) -> tuple[int, int, dict[str, list[dict[str, int]]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for cfg in configs[:n]:
            procs.append(start(variant, cfg))
        time.sleep(1)
        first = total_pss_kib(variant, procs)
        for cfg in configs[n : 2 * n]:
            procs.append(start(variant, cfg))
        time.sleep(1)
        return first, total_pss_kib(variant, procs), by_process(variant, procs)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, default=10, help="N: measured with N and with 2N running")
    parser.add_argument("--no-cold", action="store_true")
    parser.add_argument("--baseline", action="append", default=[], metavar="LABEL=PATH", help="another checkout")
    opts = parser.parse_args()
    n = opts.vms
    kernel = build_guest().elf
    taps = [f"embdens{os.getpid() % 1000}x{i}" for i in range(2 * n)]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        for tap in taps:
            subprocess.run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"], check=True)
            stack.callback(subprocess.run, ["ip", "link", "del", tap], check=False)
        directory = Path(tmp)
        configs = [config(directory, kernel, i, tap) for i, tap in enumerate(taps)]
        variants = v.baselines(opts.baseline, tmp, stack, cold=not opts.no_cold)
        variants += [] if opts.no_cold else [v.cold()]
        variants.append(stack.enter_context(v.fork_server(tmp)).variant())
        print(f"marginal memory per running microVM (drive + NIC + vsock), ({n * 2} running - {n}) / {n}:")
        for variant in variants:
            with_n, with_2n, table = measure(variant, configs, n)
            marginal = (with_2n - with_n) / n / 1024
            print(f"  {variant.label:28} {marginal:6.1f} MiB PSS   (total {with_n / 1024:.0f} MiB with {n}, "
                  f"{with_2n / 1024:.0f} MiB with {2 * n}; goal ≤ {GOAL_MIB:.0f} MiB)")  # fmt: skip
            print_by_process(table, 2 * n)
        print(f"  {'firecracker (published)':28}  < {FIRECRACKER_MIB:.0f} MiB of VMM overhead per microVM")


if __name__ == "__main__":
    main()
