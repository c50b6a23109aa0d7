"""API benchmark: launch → API socket accepting, and PUT request latency.

.venv/bin/python bench/api.py [--launches 10] [--requests 1000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.apiproc import launch  # noqa: E402
from tests.support.api_client import ApiClient  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launches", type=int, default=10)
    parser.add_argument("--requests", type=int, default=1000)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        startups = []
        for i in range(opts.launches):
            proc, seconds = launch(f"{tmp}/fc{i}.sock")
            startups.append(seconds)
            proc.terminate()
            proc.wait()
        print(f"launch → API socket accepting, median of {opts.launches}: {statistics.median(startups) * 1e3:.1f} ms")

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
