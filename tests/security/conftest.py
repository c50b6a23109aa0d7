"""Helpers for the confinement tests: run a snippet in a fresh interpreter, read /proc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SIGSYS_RC = -signal.SIGSYS
# The kernel writes at most 10 seccomp kill records per 5 s for the whole host
# (printk_ratelimit): tests that read a kill's syscall back space their kills.
KILL_SPACING_S = 0.6
_last_kill = [0.0]


def space_kills() -> None:
    """Wait until KILL_SPACING_S has passed since the previous call (in this test run)."""
    time.sleep(max(0.0, _last_kill[0] + KILL_SPACING_S - time.monotonic()))
    _last_kill[0] = time.monotonic()


def run_confined(body: str, setup: str = "", quiet: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `setup`, load COMMON (+ tgkill for this process), run `body` and `os._exit(0)`
    (as a worker ends: no interpreter shutdown), in a new interpreter. Its return code is
    -SIGSYS when the filter stopped it. `quiet` makes a miss SECCOMP_RET_TRAP (also SIGSYS,
    but not written to the kernel log, whose rate limit the kill-report tests rely on)."""
    default = "dataclasses.replace(COMMON, default_action='trap')" if quiet else "COMMON"
    script = "\n".join(
        [
            "import dataclasses, os, sys",
            "from shared.confine import SeccompSettings, install_filter",
            "from shared.seccomp import COMMON",
            textwrap.dedent(setup),
            f"install_filter(SeccompSettings(), {default})",
            "sys.stdout.write('confined\\n'); sys.stdout.flush()",
            textwrap.dedent(body),
            "sys.stdout.flush(); os._exit(0)",
        ]
    )
    return subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=30, check=False
    )


def proc_status(pid: int, tid: int | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/task/{tid}/status" if tid is not None else f"/proc/{pid}/status"
    with open(path) as f:
        return {k: v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}


def threads_of(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """What the red team (test_redteam.py) tried, from inside which worker, and what came of it."""
    module = sys.modules.get("tests.security.test_redteam")
    results = getattr(module, "RESULTS", None)
    if not results:
        return
    reached = sum(verdict != "blocked" for _, _, verdict, _ in results)
    runs = sum(getattr(module, "EMBERVM_LAUNCHES", []))
    blocked = len(results) - reached
    terminalreporter.section(
        f"red team: {len(results)} attacks in {runs} embervm runs, {blocked} blocked, {reached} REACHED"
    )
    for worker, what, verdict, outcome in results:
        terminalreporter.write_line(f"{verdict:8} {worker:13} {what[:64]:64} {outcome}")
