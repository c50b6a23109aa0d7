"""Memory and CPU figures for a process tree, from /proc (RSS and PSS in KiB)."""

from __future__ import annotations

import os
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def memory_kib(pid: int) -> dict[str, int]:
    """Rss, Pss and private (clean + dirty: pages no other process maps) of one process,
    from smaps_rollup."""
    values = {"private": 0}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            values[key.lower()] = int(rest.split()[0])
        elif key in ("Private_Clean", "Private_Dirty"):
            values["private"] += int(rest.split()[0])
    return values


def process_name(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time `pid` has used so far (a figure the machine's load does not
    inflate, unlike wall-clock throughput)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
