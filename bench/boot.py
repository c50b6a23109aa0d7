"""Boot benchmark: process launch → first guest serial byte → exit, for the test guest.

    .venv/bin/python bench/boot.py [--runs 10]

Runs `embervm --config-file … --no-api` on the test guest (which prints its banner and
resets through the i8042) and reports medians; then boots a guest that keeps running
and reports RSS and PSS of every embervm process (supervisor, zygote, vCPU worker).
If qemu-system-x86_64 is installed, the same guest ELF (through its PVH entry note) is
timed under `qemu-system-x86_64 -M microvm -enable-kvm` and printed side by side.
"""

from __future__ import annotations

import argparse
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

from bench.procstats import descendants, memory_kib, process_name  # noqa: E402
from guest.build import build_guest  # noqa: E402

EMBERVM = [str(Path(sys.executable).parent / "embervm")]


def write_config(kernel: Path, args: str, directory: Path) -> Path:
    config = {
        "boot-source": {"kernel_image_path": str(kernel), "boot_args": args},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
    }
    path = directory / f"vm-{abs(hash(args))}.json"
    path.write_text(json.dumps(config))
    return path


def time_boot(command: list[str]) -> tuple[float, float]:
    """(seconds to the first console byte, seconds to process exit) for one run."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    first = None
    while first is None:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        if not ready:
            proc.kill()
            raise RuntimeError(f"no console output from {command[0]} within 30 s")
        if os.read(proc.stdout.fileno(), 1):
            first = time.perf_counter() - start
    proc.stdout.read()
    if proc.wait(30) != 0:
        raise RuntimeError(f"{command[0]} exited with status {proc.returncode}")
    return first, time.perf_counter() - start


def measure(command: list[str], runs: int) -> dict[str, float]:
    firsts, totals = zip(*(time_boot(command) for _ in range(runs)), strict=True)
    return {"first_byte_ms": statistics.median(firsts) * 1e3, "exit_ms": statistics.median(totals) * 1e3}


def memory_of_running_vm(config: Path) -> list[tuple[str, int, int]]:
    """(process name, RSS KiB, PSS KiB) of each embervm process while the guest runs."""
    proc = subprocess.Popen([*EMBERVM, "--config-file", str(config), "--no-api"], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        seen = b""
        while b"tick 1" not in seen:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError("the looping guest exited early")
            seen += chunk
        rows = []
        for pid in descendants(proc.pid):
            m = memory_kib(pid)
            rows.append((process_name(pid), m["rss"], m["pss"]))
        return rows
    finally:
        proc.kill()
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
    runs = parser.parse_args().runs
    images = build_guest()
    with tempfile.TemporaryDirectory() as tmp:
        boot_cfg = write_config(images.elf, "console=ttyS0 test=boot", Path(tmp))
        loop_cfg = write_config(images.elf, "console=ttyS0 test=loop", Path(tmp))
        ours = measure([*EMBERVM, "--config-file", str(boot_cfg), "--no-api"], runs)
        print(f"embervm  (median of {runs}): first serial byte {ours['first_byte_ms']:7.1f} ms   "
              f"exit {ours['exit_ms']:7.1f} ms")  # fmt: skip
        qemu = qemu_command(images.elf)
        if qemu is None:
            print("qemu     : not measured (apt-get install qemu-system-x86 to compare)")
        else:
            theirs = measure(qemu, runs)
            print(f"qemu     (median of {runs}): first serial byte {theirs['first_byte_ms']:7.1f} ms   "
                  f"exit {theirs['exit_ms']:7.1f} ms")  # fmt: skip
            print(f"ratio embervm/qemu: first byte {ours['first_byte_ms'] / theirs['first_byte_ms']:.2f}  "
                  f"exit {ours['exit_ms'] / theirs['exit_ms']:.2f}")  # fmt: skip
        rows = memory_of_running_vm(loop_cfg)
        print("memory of a running microVM (KiB):")
        for name, rss, pss in rows:
            print(f"  {name:16} RSS {rss:8d}   PSS {pss:8d}")
        print(f"  {'total':16} RSS {sum(r[1] for r in rows):8d}   PSS {sum(r[2] for r in rows):8d}")


if __name__ == "__main__":
    main()
