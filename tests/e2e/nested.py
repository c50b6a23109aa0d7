"""Inner Linux boots on embervm, grouped into one outer VM run, and their results.

A `Case` is one inner guest: which kernel image (ELF vmlinux or bzImage), vCPUs, memory
and the checks its /init runs (guest/inner_init.sh). `run_cases` boots the outer VM once
for a list of cases (`tests.e2e.inside` runs them one after the other with
`embervm --config-file ... --no-api`) and parses each case's framed console back into a
`CaseResult`.

    .venv/bin/python -m tests.e2e.nested          # the default cases, console on stdout
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.e2e import outer as outer_vm  # noqa: E402
from tests.e2e.environment import Environment, prepare  # noqa: E402
from tests.e2e.outer import STUCK, OuterRun  # noqa: E402

# `quiet`: every console byte costs two trapped port accesses, which one level down in an
# emulator is ~1 ms; Linux's boot log alone would add ~20 s per boot.
BASE_ARGS = "console=ttyS0 reboot=k panic=1 pci=off quiet"
OUTER_OVERHEAD_S = 60  # outer boot, embervm start-up per case is in each case's timeout

CASE_BEGIN = re.compile(r"^E2E-CASE-BEGIN (\S+)$", re.M)
CASE_END = re.compile(r"^E2E-CASE-END (\S+) (.*)$", re.M)
CHECK = re.compile(r"^E2E-CHECK (\S+) (PASS|FAIL) ?(.*)$", re.M)
INFO = re.compile(r"^E2E-INFO (\S+) (.*)$", re.M)
DONE = re.compile(r"^E2E-DONE failures=(\d+)", re.M)
BEFORE = re.compile(r"^E2E-BEFORE (.*)$", re.M)
AFTER = re.compile(r"^E2E-AFTER (.*)$", re.M)
API = re.compile(r"^E2E-API PUT (\S+) (\d+)", re.M)
SECCOMP = re.compile(r"^E2E-SECCOMP (\S+) mode=(\d+) filters=(\S+)$", re.M)


@dataclass
class Case:
    name: str
    kernel: str = "vmlinux"  # or "bzImage"
    vcpus: int = 1
    mem_mib: int = 256
    checks: list[str] = field(default_factory=lambda: ["boot"])
    extra_args: str = ""
    timeout: float = 150
    config: dict[str, object] = field(default_factory=dict)  # more Firecracker config sections
    copy: dict[str, str] = field(default_factory=dict)  # file in the case's folder <- outer VM path
    before: str = ""  # shell, in the outer VM, in the case's folder, before embervm starts
    after: str = ""  # ... and after it exits (e.g. read back what the guest wrote)
    args: list[str] = field(default_factory=list)  # more embervm arguments
    metadata: object = None  # MMDS contents: --metadata, or PUT /mmds
    api: bool = False  # configure and start through the API instead of --config-file --no-api

    @property
    def boot_args(self) -> str:
        return " ".join(a for a in (BASE_ARGS, f"e2e.checks={','.join(self.checks)}", self.extra_args) if a)

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kernel": self.kernel,
            "vcpus": self.vcpus,
            "mem_mib": self.mem_mib,
            "boot_args": self.boot_args,
            "timeout": self.timeout,
            "config": self.config,
            "copy": self.copy,
            "before": self.before,
            "after": self.after,
            "args": self.args,
            "metadata": self.metadata,
            "api": self.api,
        }


@dataclass
class CaseResult:
    name: str
    console: str  # the inner guest's console and embervm's log, as framed by tests.e2e.inside
    status: int | None = None  # embervm's exit status; None if the case never ended
    timed_out: bool = False
    init_s: float | None = None  # embervm launch -> the inner /init's first line
    total_s: float | None = None
    checks: dict[str, tuple[bool, str]] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)
    failures: int | None = None  # from E2E-DONE; None if /init never finished
    before: list[str] = field(default_factory=list)  # the before script's output lines, then status=<n>
    after: list[str] = field(default_factory=list)
    seccomp: dict[str, int] = field(default_factory=dict)  # embervm process name -> seccomp mode (2: filter)
    api: list[tuple[str, int]] = field(default_factory=list)  # (path, status) of each API request

    @property
    def reached_init(self) -> bool:
        return "E2E-INIT " in self.console or "E2E-ROOT " in self.console

    def check(self, name: str) -> tuple[bool, str]:
        assert name in self.checks, f"check {name!r} did not report\n{self.explain()}"
        return self.checks[name]

    def explain(self) -> str:
        return f"--- inner guest {self.name!r}: console and embervm log ---\n{self.console.rstrip()}\n--- end ---"


@dataclass
class NestedRun:
    outer: OuterRun
    results: dict[str, CaseResult]

    def __getitem__(self, name: str) -> CaseResult:
        assert name in self.results, f"case {name!r} never started: {self.outer.describe()}\n{self.tail()}"
        return self.results[name]

    def tail(self, lines: int = 60) -> str:
        """The console's end; from `lines` before E2E-OUTER-STUCK when the job ran out of time."""
        console = self.outer.console.splitlines()
        stuck = next((i for i, line in enumerate(console) if line.startswith(STUCK)), None)
        start = len(console) - lines if stuck is None else stuck - lines
        text = "\n".join(console[max(start, 0) :])
        return f"--- outer VM console (last {lines} lines; full log {self.outer.log}) ---\n{text}\n--- end ---"


def parse_cases(console: str) -> dict[str, CaseResult]:
    """Split the outer console into per-case results."""
    results: dict[str, CaseResult] = {}
    begins = list(CASE_BEGIN.finditer(console))
    for i, begin in enumerate(begins):
        name = begin.group(1)
        stop = begins[i + 1].start() if i + 1 < len(begins) else len(console)
        section = console[begin.end() : stop]
        end = next((m for m in CASE_END.finditer(section) if m.group(1) == name), None)
        body = section[: end.start()] if end else section
        result = CaseResult(name, body.strip("\n"))
        if end:
            fields = dict(kv.split("=", 1) for kv in end.group(2).split() if "=" in kv)
            result.status = int(fields["status"])
            result.timed_out = fields.get("timed_out") == "1"
            init_s = float(fields.get("init_s", "-1"))
            result.init_s = init_s if init_s >= 0 else None
            result.total_s = float(fields["total_s"]) if "total_s" in fields else None
        for m in CHECK.finditer(body):
            result.checks[m.group(1)] = (m.group(2) == "PASS", m.group(3).strip())
        for m in INFO.finditer(body):
            result.info[m.group(1)] = m.group(2).strip()
        result.before = BEFORE.findall(body)
        result.after = AFTER.findall(body)
        result.api = [(m.group(1), int(m.group(2))) for m in API.finditer(body)]
        result.seccomp = {m.group(1): int(m.group(2)) for m in SECCOMP.finditer(body)}
        done = DONE.findall(body)
        result.failures = int(done[-1]) if done else None
        results[name] = result
    return results


def inside_job(cases: list[Case]) -> str:
    payload = json.dumps([c.to_json() for c in cases]).replace("'", "'\\''")
    return f'#!/bin/sh\ncd "$E2E_REPO" || exit 1\nexec "$E2E_PYTHON" -m tests.e2e.inside cases \'{payload}\'\n'


def run_cases(cases: list[Case], env: Environment | None = None, echo: TextIO | None = None) -> NestedRun:
    """Every case in one outer VM. If the outer VM stalls (tests/e2e/outer.py), the cases that
    ended before it keep their results and only the others run once more, in a new outer VM:
    a second stall then costs those cases, not the whole module."""
    env = env or prepare()
    run = _run_in_one_outer_vm(cases, env, echo)
    results = parse_cases(run.console)
    if run.stalled:
        ended = {name: r for name, r in results.items() if r.status is not None}
        rest = [c for c in cases if c.name not in ended]
        outer_vm.STALLS.append(f"{run.describe()}; console log {run.log}; {len(rest)} of {len(cases)} cases run again")
        if rest:
            run = _run_in_one_outer_vm(rest, env, echo)
            results = {**ended, **parse_cases(run.console)}
    return NestedRun(run, results)


def _run_in_one_outer_vm(cases: list[Case], env: Environment, echo: TextIO | None) -> OuterRun:
    timeout = OUTER_OVERHEAD_S + sum(c.timeout + 15 for c in cases)
    return outer_vm.run_outer(inside_job(cases), timeout, env=env, echo=echo)


DEFAULT_CASES = [
    Case("vmlinux-2vcpu", kernel="vmlinux", vcpus=2, checks=["boot", "cpus:0-1", "modules"]),
    Case("bzimage-1vcpu", kernel="bzImage", vcpus=1, checks=["boot", "cpus:0"]),
]


def main() -> int:
    run = run_cases(DEFAULT_CASES, echo=sys.stdout)
    print(f"\n{run.outer.describe()}; console log: {run.outer.log}")
    for r in run.results.values():
        checks = " ".join(f"{k}={'PASS' if ok else 'FAIL'}" for k, (ok, _) in r.checks.items())
        print(f"{r.name}: status={r.status} init_s={r.init_s} total_s={r.total_s} {checks}")
    return 0 if run.outer.ok and all(r.status == 0 and r.failures == 0 for r in run.results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
