"""API benchmark: launch → API socket accepting, and PUT request latency.

    .venv/bin/python bench/api.py [--launches 10] [--requests 1000] [--baseline LABEL=PATH ...]

Launches are timed cold and through a fork server (bench/variants.py), interleaved, and
printed beside the goal (issue 17: ≤ 50 ms) and Firecracker's figure (about 12 ms).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import variants as v  # noqa: E402
from bench.apiproc import launch  # noqa: E402
from tests.support.api_client import ApiClient  # noqa: E402

GOAL_MS = 50.0
FIRECRACKER_MS = 12.0  # launch → API socket accepting, Firecracker's published order of magnitude


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launches", type=int, default=10)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--baseline", action="append", default=[], metavar="LABEL=PATH")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        variants = [*v.baselines(opts.baseline, tmp, stack), v.cold()]
        variants.append(stack.enter_context(v.fork_server(tmp)).variant())
        startups: dict[str, list[float]] = {x.label: [] for x in variants}
        for i in range(opts.launches):
            for n, variant in enumerate(variants):
                proc, seconds = launch(f"{tmp}/fc{i}-{n}.sock", command=variant.command, env=variant.environ())
                startups[variant.label].append(seconds)
                proc.terminate()
                proc.wait()
        print(f"launch → API socket accepting, median of {opts.launches} interleaved launches:")
        for label, values in startups.items():
            ms = statistics.median(values) * 1e3
            print(f"  {label:28} {ms:7.1f} ms   (goal ≤ {GOAL_MS:.0f} ms: {'met' if ms <= GOAL_MS else 'not met'})")
        print(f"  {'firecracker (published)':28} {FIRECRACKER_MS:7.1f} ms")

        sock = f"{tmp}/latency.sock"
        proc, _ = launch(sock)
        try:
            with ApiClient(sock) as api:
                latencies = []
                for i in range(opts.requests):
                    body = {"vcpu_count": 1 + i % 2, "mem_size_mib": 128}
                    start = time.perf_counter()
                    response = api.put("/machine-config", json=body)
                    latencies.append(time.perf_counter() - start)
                    if response.status_code != 204:
                        raise RuntimeError(f"PUT /machine-config answered {response.status_code}: {response.text}")
        finally:
            proc.terminate()
            proc.wait()
        print(
            f"PUT /machine-config over {opts.requests} requests: median {statistics.median(latencies) * 1e6:.0f} µs, "
            f"p99 {percentile(latencies, 0.99) * 1e6:.0f} µs"
        )


if __name__ == "__main__":
    main()
