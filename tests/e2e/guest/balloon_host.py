"""The host's side of the nested balloon case, run in the outer VM beside embervm.

    balloon_host.py API_SOCK METRICS_FILE TARGET_MIB

Waits for the guest's balloon driver (statistics arriving), then for the guest to have
dirtied memory (the guest-memory memfd's resident size above RESIDENT_READY), PATCHes the
target to TARGET_MIB, waits until the guest reports it as `actual`, measures the memfd
again (from /proc, and the supervisor's own `embervm_memory` figures through GET /embervm/metrics),
counts statistics updates over a few polling intervals, checks that statistics
cannot be turned off after boot, and deflates. One `key=value` line per fact on stdout.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from tests.support.api_client import ApiClient

RESIDENT_READY = 150 << 20
STATS_WINDOW_S = 8.0


def say(key: str, value: object) -> None:
    print(f"{key}={value}", flush=True)


def memfd_resident() -> int:
    """Allocated bytes of embervm's guest-memory memfd, from any process that holds it."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            path = f"/proc/{pid}/fd/{fd}"
            try:
                if os.readlink(path).startswith("/memfd:embervm-") and "-mem" in os.readlink(path):
                    return os.stat(path).st_blocks * 512
            except OSError:
                continue
    return -1


def wait(what: str, predicate, timeout: float):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    say("timeout", what)
    sys.exit(1)


def settled() -> int:
    """The resident size once it has not grown for two seconds (0 while it still grows)."""
    samples = []
    for _ in range(5):
        samples.append(memfd_resident())
        time.sleep(0.5)
    return samples[-1] if samples[-1] - samples[0] < (1 << 20) else 0


def counters(api: ApiClient, path: Path) -> dict:  # type: ignore[type-arg]
    """Every counter so far, from GET /embervm/metrics (cumulative; embervm's own groups and
    fields too), plus `file_balloon`: the metrics file's balloon fields (Firecracker's six)
    summed over its lines (they hold deltas), after a FlushMetrics."""
    api.put("/actions", json={"action_type": "FlushMetrics"})
    lines = [json.loads(text) for text in path.read_text().splitlines() if text.strip()]
    snapshot: dict = api.get("/embervm/metrics").json()  # type: ignore[type-arg]
    snapshot["file_balloon"] = {
        key: sum(line.get("balloon", {}).get(key, 0) for line in lines) for key in lines[-1].get("balloon", {})
    }
    return snapshot


def main(sock: str, metrics_path: str, target_mib: int) -> None:
    wait("api socket", lambda: os.path.exists(sock), 120)
    metrics = Path(metrics_path)
    with ApiClient(sock, timeout=60) as api:

        def stats() -> dict | None:  # type: ignore[type-arg]
            try:
                r = api.get("/balloon/statistics")
            except httpx.TransportError as e:  # the server may still be starting (seen: a reset)
                say("api_retry", type(e).__name__)
                return None
            return r.json() if r.status_code == 200 else None

        first = wait("balloon statistics", lambda: (s := stats()) and "total_memory" in s and s, 180)
        say("stats_total_memory_mib", first["total_memory"] >> 20)
        say("resident_at_driver_up_mib", memfd_resident() >> 20)
        wait("guest dirtying memory", lambda: memfd_resident() >= RESIDENT_READY, 180)
        before = wait("the guest's dirtying to end", settled, 120)
        say("resident_before_mib", before >> 20)
        say("patch_inflate", api.patch("/balloon", json={"amount_mib": target_mib}).status_code)
        start = time.monotonic()
        wait("inflation", lambda: (s := stats()) and s["actual_mib"] == target_mib, 120)
        say("inflate_s", round(time.monotonic() - start, 1))
        time.sleep(0.5)
        after = memfd_resident()
        say("resident_after_mib", after >> 20)
        say("resident_drop_mib", (before - after) >> 20)
        line = counters(api, metrics)
        say("supervisor_resident_after_mib", line["embervm_memory"]["guest_memory_resident_bytes"] >> 20)
        say("released_mib", line["balloon"].get("released_bytes", 0) >> 20)
        say("invalid_pfns", line["balloon"].get("invalid_pfns", 0))
        say("inflate_count", line["file_balloon"].get("inflate_count", 0))
        updates_before = line["file_balloon"].get("stats_updates_count", 0)
        seen, last, deadline = 0, stats(), time.monotonic() + STATS_WINDOW_S
        while time.monotonic() < deadline:  # each update the guest sends changes its counters
            time.sleep(0.25)
            now = stats()
            if now is not None and now != last:
                seen, last = seen + 1, now
        say("stats_changes_in_window", seen)
        line = counters(api, metrics)
        say("stats_updates_counted_in_window", line["file_balloon"].get("stats_updates_count", 0) - updates_before)
        say("stats_fields", ",".join(sorted(k for k in stats() or {} if not k.endswith(("_pages", "_mib")))))
        off = api.patch("/balloon/statistics", json={"stats_polling_interval_s": 0})
        say("stats_off_status", off.status_code)
        say("patch_deflate", api.patch("/balloon", json={"amount_mib": 0}).status_code)
        wait("deflation", lambda: (s := stats()) and s["actual_mib"] == 0, 120)
        say("deflated", 1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
