"""Boot the outer VM (QEMU, software CPU with SVM and nested paging) and run one job in it.

    .venv/bin/python -m tests.e2e.outer 'uname -a; ls /dev/kvm'     # a shell job
    .venv/bin/python -m tests.e2e.outer --file job.sh

The job is a shell script. It goes into a small archive of its own, put in front of the
cached outer initramfs (the kernel unpacks concatenated archives in order; the big one
goes last because an lz4 stream cannot be followed by anything), so changing a job
never rebuilds anything. The outer /init runs it as /e2e/job under `timeout` and reports
its status through QEMU's isa-debug-exit device: QEMU exits with (status << 1) | 1.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.e2e.cpio import Archive  # noqa: E402
from tests.e2e.environment import Environment, prepare  # noqa: E402

MEMORY = "2G"
STUCK = "E2E-OUTER-STUCK "
OUTER_EXIT = re.compile(r"^E2E-OUTER-EXIT (\d+)\s*$", re.M)
# what the outer /init keeps of the run's time, to show a job that ran out of it (E2E-OUTER-STUCK)
# and to power off
JOB_MARGIN_S = 30
ALIVE_PERIOD_S = 60  # the outer /init's heartbeat (E2E-OUTER-ALIVE), on its second serial port
STALL_S = 4 * ALIVE_PERIOD_S  # that long without a line or heartbeat from the outer VM: it stopped
OUTER_CMDLINE = "console=ttyS0 panic=-1 quiet i8042.noaux tsc=reliable"
# `-M pc`, not microvm: Linux calibrates the TSC against the PIT, and under the emulator on
# a busy host that fails now and then; pc also has an HPET to fall back on, while on
# microvm the boot then hung right after "tsc: Marking TSC unstable".
MACHINE = "pc"


class OuterVmError(RuntimeError):
    pass


@dataclass
class OuterRun:
    qemu_status: int  # QEMU's exit status (124 or 137 after `timeout`)
    job_status: int | None  # the job's exit status, None if it never reported one
    console: str  # everything the outer VM printed, \r\n turned into \n
    log: Path  # the same, kept on disk
    seconds: float
    timed_out: bool
    silent_s: float | None = None  # set when run_outer ended QEMU for printing nothing that long
    alive: str = ""  # the outer /init's last heartbeat line

    @property
    def ok(self) -> bool:
        return self.job_status == 0

    @property
    def stuck(self) -> bool:
        """The outer /init found the job still running at its deadline (E2E-OUTER-STUCK)."""
        return STUCK in self.console

    @property
    def stalled(self) -> bool:
        """QEMU's time ran out before the outer /init reported the job's end: the outer VM
        stopped running (its /init ends a job that runs out of time JOB_MARGIN_S earlier)."""
        return self.silent_s is not None or (self.timed_out and self.job_status is None)

    def describe(self) -> str:
        if self.stuck:
            return f"the job ran out of time ({self.seconds:.0f} s); the outer VM showed where (E2E-OUTER-STUCK)"
        if self.stalled:
            alive = f"last heartbeat: {self.alive}" if self.alive else "no heartbeat"
            ended = f"silent for {self.silent_s:.0f} s" if self.silent_s is not None else "QEMU timed out"
            return f"the outer VM stalled: {ended}, after {self.seconds:.0f} s ({alive})"
        if self.timed_out:
            return f"the outer VM timed out after {self.seconds:.0f} s"
        if self.job_status is None:
            return f"the outer VM ended (QEMU status {self.qemu_status}) without the job's exit status"
        return f"the job exited with status {self.job_status} ({self.seconds:.0f} s)"


def accelerator() -> list[str]:
    """QEMU's software CPU (`-cpu max` has SVM with nested paging), or with
    EMBERVM_E2E_ACCEL=kvm the host's KVM, on hosts that allow nested virtualisation."""
    if os.environ.get("EMBERVM_E2E_ACCEL", "tcg") == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg,tb-size=512", "-cpu", "max"]


def outer_args(timeout_s: float, heartbeat: bool) -> str:
    """The outer /init's settings: the job's deadline, and how often it beats (0: never)."""
    return f"e2e.timeout={int(timeout_s) - JOB_MARGIN_S} e2e.alive={ALIVE_PERIOD_S if heartbeat else 0}"


def qemu_command(
    env: Environment,
    initrd: Path,
    timeout_s: float,
    cmdline_extra: str = "",
    interactive: bool = False,
    heartbeat: Path | None = None,
) -> list[str]:
    """`heartbeat`: a file for the outer /init's heartbeat, its second serial port (ttyS1): on
    the console it could land in the middle of a line the job is printing."""
    # --foreground keeps QEMU in the terminal's foreground process group, so that it may read it.
    foreground = ["--foreground"] if interactive else []
    return [
        "timeout", *foreground, "--kill-after=10", str(int(timeout_s)),
        env.qemu,
        "-M", MACHINE,
        *accelerator(),
        "-smp", "1",  # a rare lock-up in kvm_destroy_vm was seen with 2
        "-m", MEMORY,
        "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
        "-serial", "stdio",
        *(["-serial", f"file:{heartbeat}"] if heartbeat else []),
        "-no-reboot",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel", str(env.kernel.bzimage),
        "-initrd", str(initrd),
        "-append", f"{OUTER_CMDLINE} {outer_args(timeout_s, heartbeat is not None)} {cmdline_extra}".strip(),
    ]  # fmt: skip


def job_archive(job: str, extra: Archive | None = None) -> bytes:
    archive = extra or Archive()
    archive.file("e2e/job", job.encode(), 0o755)
    buf = io.BytesIO()
    archive.write(buf)
    data = buf.getvalue()
    return gzip.compress(data, compresslevel=1) if len(data) > 1 << 20 else data


def decode_status(qemu_status: int, console: str) -> int | None:
    """The job's exit status: as the outer /init printed it, else from isa-debug-exit's
    (status << 1) | 1 (1 is ambiguous: QEMU's own failure status)."""
    reported = OUTER_EXIT.findall(console)
    if reported:
        return int(reported[-1])
    if qemu_status & 1 and qemu_status not in (1, 125, 127, 137):
        return qemu_status >> 1
    return None


def _pump(
    stream: io.BufferedReader, log: io.BufferedWriter, echo: TextIO | None, chunks: list[bytes], heard: list[float]
) -> None:
    while data := stream.read1(65536):
        heard[0] = time.monotonic()
        chunks.append(data)
        log.write(data)
        log.flush()
        if echo is not None:
            echo.write(data.decode(errors="replace").replace("\r\n", "\n"))
            echo.flush()


def run_outer(
    job: str,
    timeout_s: float = 600,
    env: Environment | None = None,
    extra: Archive | None = None,
    echo: TextIO | None = None,
    log_path: Path | None = None,
    interactive: bool = False,
) -> OuterRun:
    """Boot the outer VM with `job` (a shell script) as /e2e/job; wait for it to end.
    `interactive`: our stdin is the outer VM's serial input (the job's stdin)."""
    env = env or prepare()
    work = Path(tempfile.mkdtemp(prefix="embervm-e2e-"))
    try:
        initrd = work / "initrd"
        with initrd.open("wb") as out:
            out.write(job_archive(job, extra))
            with env.outer_initramfs.open("rb") as base:
                shutil.copyfileobj(base, out, 1 << 20)
        log = log_path or Path(tempfile.gettempdir()) / f"embervm-e2e-{os.getpid()}-{time.monotonic_ns()}.log"
        heartbeat = None if interactive else work / "alive"
        start = time.monotonic()
        chunks: list[bytes] = []
        with log.open("wb") as log_file:
            proc = subprocess.Popen(
                qemu_command(env, initrd, timeout_s, interactive=interactive, heartbeat=heartbeat),
                stdin=None if interactive else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            assert proc.stdout is not None
            heard = [start]  # when the outer VM last printed anything
            pump = threading.Thread(target=_pump, args=(proc.stdout, log_file, echo, chunks, heard), daemon=True)
            pump.start()
            try:
                status, ended, silent_s = _wait(proc, start + timeout_s + 30, heard, heartbeat)
            finally:
                pump.join(10)
                proc.stdout.close()
        seconds = time.monotonic() - start
        beats = heartbeat.read_text(errors="replace").splitlines() if heartbeat and heartbeat.exists() else []
    finally:
        shutil.rmtree(work, ignore_errors=True)
    console = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
    timed_out = ended or status in (124, 137)
    job_status = decode_status(0 if ended else status, console)  # a status we caused says nothing of the job
    return OuterRun(status, job_status, console, log, seconds, timed_out, silent_s, beats[-1].strip() if beats else "")


def _wait(
    proc: subprocess.Popen[bytes], deadline: float, heard: list[float], heartbeat: Path | None
) -> tuple[int, bool, float | None]:
    """QEMU's exit status, whether we ended it, and, when that was because the outer VM went
    STALL_S without a console line or a heartbeat (it stopped running), how long."""
    size = 0
    while True:
        try:
            return proc.wait(1), False, None
        except subprocess.TimeoutExpired:
            pass
        grown = heartbeat.stat().st_size if heartbeat is not None and heartbeat.exists() else size
        if grown != size:
            size, heard[0] = grown, time.monotonic()
        silent = time.monotonic() - heard[0]
        stalled = heartbeat is not None and silent > STALL_S
        if stalled or time.monotonic() > deadline:
            proc.terminate()  # `timeout` passes it on to QEMU
            try:
                status = proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                status = proc.wait()
            return status, True, (silent if stalled else None)


STALLS: list[str] = []  # the stalled runs retried in this process, for the test session's summary


def run_outer_retrying_a_stall(job: str, timeout_s: float, env: Environment | None = None, **kw: Any) -> OuterRun:
    """run_outer, once more when the outer VM stalled: under the emulator it has stopped
    running now and then, heartbeat included (seen as an inner VM was destroyed, and as one
    booted; tests/e2e/README.md). A job that hangs while the outer VM runs is not retried:
    the outer /init shows it (E2E-OUTER-STUCK) and the run fails."""
    run = run_outer(job, timeout_s, env=env, **kw)
    if run.stalled:
        STALLS.append(f"{run.describe()}; console log {run.log}; run again")
        run = run_outer(job, timeout_s, env=env, **kw)
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", nargs="?", help="shell commands to run in the outer VM")
    parser.add_argument("--file", type=Path, help="a shell script to run instead")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    if args.file:
        job = args.file.read_text()
    elif args.job:
        job = f"#!/bin/sh\n{args.job}\n"
    else:
        parser.error("give a job or --file")
    run = run_outer(job, args.timeout, echo=sys.stdout)
    print(f"\n{run.describe()}; console log: {run.log}", file=sys.stderr)
    return run.job_status if run.job_status is not None else 1


if __name__ == "__main__":
    sys.exit(main())
