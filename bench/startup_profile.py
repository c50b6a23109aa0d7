"""Where a launch's time goes: the median timeline of `shared.startup_trace` marks.

A benchmark given `--profile` sets `EMBERVM_STARTUP_TRACE` for the fork server it starts
(the server's and reapers' marks) and for extra launches of this tree (the VMM's, zygote's
and workers' marks), after its timed runs, and prints each mark's median time since launch.
"""

from __future__ import annotations

import os
import statistics
from collections import Counter, defaultdict
from pathlib import Path

from shared.startup_trace import ENV_VAR


class Profile:
    """Marks of several launches, each read from the trace file between launches."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.rows: dict[str, list[float]] = defaultdict(list)
        self.launches = 0
        Path(path).write_bytes(b"")

    def env(self) -> dict[str, str]:
        return {ENV_VAR: self.path}

    def take(self, start_ns: int) -> None:
        """The marks written since the last call, relative to a launch at `start_ns`
        (time.monotonic_ns()); a label seen twice in one launch gets "#2"."""
        self.launches += 1
        seen: Counter[str] = Counter()
        data = Path(self.path).read_text()
        Path(self.path).write_bytes(b"")  # O_APPEND writers go on at the new end
        for line in data.splitlines():
            ns, _pid, label = line.split(" ", 2)
            if int(ns) < start_ns:
                continue  # the previous launch's last marks (its exit)
            seen[label] += 1
            self.rows[label if seen[label] == 1 else f"{label} #{seen[label]}"].append((int(ns) - start_ns) / 1e6)

    def print(self, title: str, until: dict[str, float] | None = None) -> None:
        """The median timeline; `until`: more points to place in it (label -> ms)."""
        points = {label: statistics.median(values) for label, values in self.rows.items()}
        points.update(until or {})
        print(f"{title} (median of {self.launches} traced launches, ms since launch):")
        previous = 0.0
        for label, ms in sorted(points.items(), key=lambda item: item[1]):
            n = len(self.rows.get(label, ()))
            some = f"  (in {n} of {self.launches})" if 0 < n < self.launches else ""
            print(f"  {ms:7.1f}  (+{ms - previous:5.1f})  {label}{some}")
            previous = ms


def server_env(profile: Profile | None) -> dict[str, str]:
    """The environment of a fork server started for a profile (its own marks and its reapers')."""
    return {**os.environ, **(profile.env() if profile else {})}
