"""Boot benchmark: process launch → first guest serial byte → exit, for the test guest.

    .venv/bin/python bench/boot.py [--runs 10] [--baseline LABEL=PATH ...] [--no-fork-server] [--profile]

Runs `embervm --config-file … --no-api` on the test guest (which prints its banner and
resets through the i8042), cold and through a fork server it starts (bench/variants.py),
plus the cold path of any `--baseline` checkout (e.g. the commit before a change), the
runs of all variants interleaved so that they share the machine's load; reports medians
of wall time and the CPU time of every process involved. Then boots a guest that keeps
running and reports RSS and PSS of every process of that microVM. If qemu-system-x86_64 is
installed, the same guest ELF (through its PVH entry note) is timed under
`qemu-system-x86_64 -M microvm -enable-kvm` and printed side by side, with the goal
(issue 17: first serial byte ≤ 1.0 x QEMU's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import variants as v  # noqa: E402
from bench.procstats import descendants, memory_kib, process_name  # noqa: E402
from bench.startup_profile import Profile, server_env  # noqa: E402
from guest.build import build_guest  # noqa: E402


def write_config(kernel: Path, args: str, directory: Path) -> Path:
    config = {
        "boot-source": {"kernel_image_path": str(kernel), "boot_args": args},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
    }
    path = directory / f"vm-{abs(hash(args))}.json"
    path.write_text(json.dumps(config))
    return path


def time_boot(variant: v.Variant, args: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """(seconds to the first console byte, seconds to process exit, CPU seconds) for one run."""
    cpu_before = v.children_cpu_s() + (variant.server.cpu_s() if variant.server else 0.0)
    start = time.perf_counter()
    proc = subprocess.Popen(
        [*variant.command, *(args if variant.takes_args else [])],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**variant.environ(), **(env or {})},
    )
    assert proc.stdout is not None
    first = None
    while first is None:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        if not ready:
            proc.kill()
            raise RuntimeError(f"no console output from {variant.label} within 30 s")
        if os.read(proc.stdout.fileno(), 1):
            first = time.perf_counter() - start
    proc.stdout.read()
    if proc.wait(30) != 0:
        raise RuntimeError(f"{variant.label} exited with status {proc.returncode}")
    total = time.perf_counter() - start
    if variant.server:
        variant.server.settle()
    cpu_after = v.children_cpu_s() + (variant.server.cpu_s() if variant.server else 0.0)
    return first, total, cpu_after - cpu_before


def measure(variants: list[v.Variant], args: list[str], runs: int) -> dict[str, dict[str, float]]:
    """Median first byte, exit and CPU (ms) per variant; the variants' runs interleaved."""
    samples: dict[str, list[tuple[float, float, float]]] = {x.label: [] for x in variants}
    for _ in range(runs):
        for variant in variants:
            samples[variant.label].append(time_boot(variant, args))
    return {
        label: {
            "first_byte_ms": statistics.median(s[0] for s in rows) * 1e3,
            "exit_ms": statistics.median(s[1] for s in rows) * 1e3,
            "cpu_ms": statistics.median(s[2] for s in rows) * 1e3,
        }
        for label, rows in samples.items()
    }


def memory_of_running_vm(variant: v.Variant, config: Path) -> list[tuple[str, int, int]]:
    """(process name, RSS KiB, PSS KiB) of each process of one microVM while its guest runs:
    the started process and its descendants, and with a fork server the reaper and its
    descendants (the VMM, its zygote and workers)."""
    proc = subprocess.Popen(
        [*variant.command, "--config-file", str(config), "--no-api"], stdout=subprocess.PIPE, env=variant.environ()
    )
    assert proc.stdout is not None
    try:
        seen = b""
        while b"tick 1" not in seen:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError("the looping guest exited early")
            seen += chunk
        pids = descendants(proc.pid)
        if variant.server:
            pids += [pid for reaper in variant.server.reapers() for pid in descendants(reaper)]
        rows = []
        for pid in pids:
            m = memory_kib(pid)
            rows.append((process_name(pid), m["rss"], m["pss"]))
        return rows
    finally:
        proc.terminate()
        proc.wait()


def qemu_command(kernel: Path) -> list[str] | None:
    """QEMU microvm booting the same ELF through its PVH note, when QEMU is installed.

    QEMU's microvm has no i8042, so the guest's reset falls back to a triple fault,
    which `-no-reboot` turns into QEMU's exit. (`-arch-capabilities`: this host's
    paravirtual KVM refuses that MSR.)
    """
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return None
    return [
        qemu, "-M", "microvm,x-option-roms=off,rtc=off", "-enable-kvm", "-cpu", "host,-arch-capabilities",
        "-m", "128", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
        "-kernel", str(kernel), "-append", "console=ttyS0 test=boot",
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--baseline", action="append", default=[], metavar="LABEL=PATH", help="another checkout")
    parser.add_argument("--no-fork-server", action="store_true", help="measure the cold path only")
    parser.add_argument("--profile", action="store_true", help="then trace boots through the fork server")
    opts = parser.parse_args()
    runs = opts.runs
    images = build_guest()
    stale, total = v.stale_bytecode(REPO)
    print(f"bytecode: {stale} of {total} embervm modules have no up-to-date .pyc"
          f"{' (scripts/setup compiles them)' if stale else ''}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        boot_cfg = write_config(images.elf, "console=ttyS0 test=boot", Path(tmp))
        loop_cfg = write_config(images.elf, "console=ttyS0 test=loop", Path(tmp))
        variants = [*v.baselines(opts.baseline, tmp, stack, server=not opts.no_fork_server), v.cold()]
        profile = Profile(f"{tmp}/trace") if opts.profile and not opts.no_fork_server else None
        ours = None if opts.no_fork_server else stack.enter_context(v.fork_server(tmp, env=server_env(profile)))
        if ours is not None:
            variants.append(ours.variant())
        qemu = qemu_command(images.elf)
        if qemu is not None:
            variants.append(v.Variant("qemu -M microvm", qemu, takes_args=False))
        boot_args = ["--config-file", str(boot_cfg), "--no-api"]
        results = measure(variants, boot_args, runs)
        print(f"launch → first serial byte / exit, median of {runs} interleaved runs:")
        for label, r in results.items():
            print(f"  {label:28} first byte {r['first_byte_ms']:7.1f} ms   exit {r['exit_ms']:7.1f} ms   "
                  f"CPU {r['cpu_ms']:6.0f} ms")  # fmt: skip
        if qemu is None:
            print("  qemu: not measured (apt-get install qemu-system-x86 to compare)")
        else:
            ref = results["qemu -M microvm"]["first_byte_ms"]
            for label, r in results.items():
                if label != "qemu -M microvm":
                    print(f"  ratio {label} / qemu, first byte: {r['first_byte_ms'] / ref:5.2f}  (goal ≤ 1.00)")
        if profile is not None and ours is not None:
            firsts = []
            for _ in range(runs):
                start_ns = time.monotonic_ns()
                firsts.append(time_boot(ours.variant(), boot_args, profile.env())[0] * 1e3)
                profile.take(start_ns)
            profile.print(
                "where the time goes through the fork server", {"bench: first serial byte": statistics.median(firsts)}
            )
        for variant in variants:
            if variant.label.startswith("qemu"):
                continue
            rows = memory_of_running_vm(variant, loop_cfg)
            print(f"memory of a running microVM, {variant.label} (KiB):")
            for name, rss, pss in rows:
                print(f"  {name:16} RSS {rss:8d}   PSS {pss:8d}")
            print(f"  {'total':16} RSS {sum(r[1] for r in rows):8d}   PSS {sum(r[2] for r in rows):8d}")


if __name__ == "__main__":
    main()
