"""Linux boot benchmark one level down: InstanceStart → the inner /init, embervm vs QEMU.

    .venv/bin/python bench/linux_boot.py [--runs 5] [--kernel vmlinux|bzImage] [--mem 256]

Boots the nested-KVM outer VM of tests/e2e once (QEMU, software CPU with SVM, kvm_amd
loaded) with QEMU added to it, and there boots Debian's cloud kernel with the e2e inner
initramfs (`quiet`, /init prints "E2E-INIT" first thing) `--runs` times each way:

- embervm through its API: launch, PUT /boot-source and /machine-config, then
  InstanceStart → "E2E-INIT" on the console (and launch → "E2E-INIT");
- QEMU `-M microvm -enable-kvm -cpu host`, same kernel, initramfs, command line and
  memory: launch → "E2E-INIT".

It prints medians (and min/max) in seconds, plus the guest's own uptime when /init ran.
The absolute figures are those of a guest one level down, under an emulator, where every
trapped access costs ~0.5 ms; the ratio is the interesting part. `--shmem-thp always`
lets the outer kernel back embervm's memfd guest memory with huge pages (QEMU's anonymous
guest memory gets them by default), which here takes the guest's own boot from ~2 s to
~1.2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GUEST = Path("/e2e/guest")
BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off quiet e2e.checks="
INIT_MARK = re.compile(rb"E2E-INIT uptime=([\d.]+)\r?\n")
RESULT_MARK = "BENCH-RESULT "
QEMU_FIRMWARE = ["bios-microvm.bin", "qboot.rom"]


# --- inside the outer VM ------------------------------------------------------------------------
def wait_for_mark(proc: subprocess.Popen[bytes], timeout: float) -> tuple[float, float]:
    """(monotonic time the /init mark was read, the guest's uptime then)."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            continue
        data = os.read(proc.stdout.fileno(), 65536)
        if not data:
            break
        seen += data
        m = INIT_MARK.search(seen)
        if m:
            return time.monotonic(), float(m.group(1))
    raise RuntimeError(f"no /init mark within {timeout} s; console:\n{seen.decode(errors='replace')[-3000:]}")


def wait_for_socket(path: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"embervm exited with {proc.returncode} before serving its API")
        if os.path.exists(path):
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(path)
                    return
                except OSError:
                    pass
        time.sleep(0.02)
    raise RuntimeError(f"embervm's API socket {path} did not appear in {timeout} s")


def embervm_run(kernel: Path, mem: int, index: int) -> dict[str, float]:
    from tests.support.api_client import ApiClient

    sock = f"/tmp/bench-{index}.sock"
    launch = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, str(Path(sys.prefix) / "bin" / "embervm"), "--api-sock", sock, "--id", f"bench{index}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_socket(sock, proc)
        with ApiClient(sock, timeout=60) as api:
            boot = {"kernel_image_path": str(kernel), "initrd_path": str(GUEST / "initramfs"), "boot_args": BOOT_ARGS}
            for path, body in (("/boot-source", boot), ("/machine-config", {"vcpu_count": 1, "mem_size_mib": mem})):
                r = api.put(path, json=body)
                assert r.status_code == 204, (path, r.status_code, r.text)
            start = time.monotonic()
            r = api.put("/actions", json={"action_type": "InstanceStart"})
            assert r.status_code == 204, r.text
            started = time.monotonic()
        at_init, uptime = wait_for_mark(proc, 120)
        status = proc.wait(60)
        if status != 0:
            raise RuntimeError(f"embervm exited with {status} (the guest should reset through the i8042)")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
    return {
        "start_to_init": at_init - start,
        "launch_to_init": at_init - launch,
        "instance_start_call": started - start,
        "guest_uptime_at_init": uptime,
    }


def qemu_run(qemu: str, kernel: Path, mem: int) -> dict[str, float]:
    command = [
        qemu, "-M", "microvm,x-option-roms=off,rtc=on", "-enable-kvm", "-cpu", "host", "-smp", "1", "-m", str(mem),
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(GUEST / "initramfs"), "-append", BOOT_ARGS,
    ]  # fmt: skip
    launch = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        at_init, uptime = wait_for_mark(proc, 120)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
    return {"launch_to_init": at_init - launch, "guest_uptime_at_init": uptime}


def inside(args: argparse.Namespace) -> int:
    kernel = GUEST / args.kernel
    qemu = shutil.which("qemu-system-x86_64")
    results: dict[str, list[dict[str, float]]] = {"embervm": [], "qemu": []}
    for i in range(args.runs):  # interleaved, so that drift in the outer VM hits both alike
        results["embervm"].append(embervm_run(kernel, args.mem, i))
        print(f"bench: embervm run {i + 1}: {results['embervm'][-1]}", flush=True)
        if qemu:
            try:
                results["qemu"].append(qemu_run(qemu, kernel, args.mem))
                print(f"bench: qemu run {i + 1}: {results['qemu'][-1]}", flush=True)
            except RuntimeError as exc:
                print(f"bench: qemu failed: {exc}", flush=True)
                qemu = None
    print(RESULT_MARK + json.dumps(results), flush=True)
    return 0


# --- on the host -----------------------------------------------------------------------------------
def qemu_archive():  # type: ignore[no-untyped-def]
    """QEMU with its shared libraries and microvm firmware, to add to the outer VM."""
    from tests.e2e.cpio import Archive
    from tests.e2e.environment import _ldd

    qemu = shutil.which("qemu-system-x86_64")
    assert qemu is not None
    archive = Archive()
    archive.add_host_path(qemu)
    for lib in sorted(_ldd([qemu])):
        archive.add_host_path(lib)
    for name in QEMU_FIRMWARE:
        archive.add_host_path(Path("/usr/share/qemu") / name)
    return archive


def summary(label: str, runs: list[dict[str, float]], key: str) -> str:
    values = [r[key] for r in runs if key in r]
    if not values:
        return f"{label:34} (not measured)"
    return (
        f"{label:34} median {statistics.median(values):7.3f} s   min {min(values):7.3f}   max {max(values):7.3f}"
        f"   (n={len(values)})"
    )


def host(args: argparse.Namespace) -> int:
    from tests.e2e.environment import prepare
    from tests.e2e.outer import run_outer

    env = prepare()
    thp = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
    job = (
        '#!/bin/sh\ncd "$E2E_REPO" || exit 1\n'
        + (f"echo {args.shmem_thp} > {thp} || exit 1\n" if args.shmem_thp else "")
        + f'echo "bench: shmem THP: $(cat {thp})"\n'
        f'exec "$E2E_PYTHON" bench/linux_boot.py --inside --runs {args.runs} --kernel {args.kernel} --mem {args.mem}\n'
    )
    timeout = 120 + args.runs * 90
    run = run_outer(job, timeout, env=env, extra=qemu_archive(), echo=sys.stderr if args.verbose else None)
    lines = [line for line in run.console.splitlines() if line.startswith(RESULT_MARK)]
    if not run.ok or not lines:
        print(run.console[-5000:], file=sys.stderr)
        print(f"benchmark failed: {run.describe()}; console log {run.log}", file=sys.stderr)
        return 1
    results = json.loads(lines[-1][len(RESULT_MARK) :])
    ours, theirs = results["embervm"], results["qemu"]
    thp_line = next((line for line in run.console.splitlines() if line.startswith("bench: shmem THP:")), "")
    print(f"Linux {env.kernel.version} ({args.kernel}), {args.mem} MiB, 1 vCPU, one level down (outer VM: QEMU TCG)")
    print(f"outer VM {thp_line.removeprefix('bench: ')} (embervm's guest memory is a memfd, i.e. shmem)")
    print(summary("embervm InstanceStart -> /init", ours, "start_to_init"))
    print(summary("  of which the InstanceStart call", ours, "instance_start_call"))
    print(summary("embervm launch -> /init (API)", ours, "launch_to_init"))
    print(summary("qemu microvm launch -> /init", theirs, "launch_to_init"))
    print(summary("embervm guest uptime at /init", ours, "guest_uptime_at_init"))
    print(summary("qemu guest uptime at /init", theirs, "guest_uptime_at_init"))
    if ours and theirs:
        a = statistics.median(r["start_to_init"] for r in ours)
        b = statistics.median(r["launch_to_init"] for r in theirs)
        print(f"ratio embervm InstanceStart->/init / qemu launch->/init: {a / b:.2f}")
    print(f"(outer VM run {run.seconds:.0f} s; console log {run.log})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--kernel", choices=["vmlinux", "bzImage"], default="vmlinux")
    parser.add_argument("--mem", type=int, default=256, help="guest memory in MiB")
    parser.add_argument("--verbose", action="store_true", help="show the outer VM's console")
    parser.add_argument(
        "--shmem-thp",
        choices=["never", "advise", "always", "within_size"],
        help="set the outer VM's /sys/kernel/mm/transparent_hugepage/shmem_enabled first (default: leave it)",
    )
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    return inside(args) if args.inside else host(args)


if __name__ == "__main__":
    sys.exit(main())
