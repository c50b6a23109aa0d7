"""API benchmark: launch → API socket accepting, and PUT request latency.

    .venv/bin/python bench/api.py [--launches 10] [--requests 1000] [--baseline LABEL=PATH ...] [--profile]

Launches are timed cold and through a fork server (bench/variants.py), interleaved, and
printed beside the goal (issue 17: ≤ 50 ms) and Firecracker's figure (about 12 ms): until
the socket accepts a connection, and until GET / is answered (the socket listens before the
rest of start-up: requests wait in its backlog). `--profile` then traces launches through
the fork server and prints where their time goes (bench/startup_profile.py).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import variants as v  # noqa: E402
from bench.apiproc import launch, wait_accepting  # noqa: E402
from bench.startup_profile import Profile, server_env  # noqa: E402
from tests.support.api_client import ApiClient  # noqa: E402

GOAL_MS = 50.0
FIRECRACKER_MS = 12.0  # launch → API socket accepting, Firecracker's published order of magnitude


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def first_answer(path: str, timeout: float = 30.0) -> None:
    """Send GET / on `path` (accepting already) and wait for the answer's status line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n")
        reply = sock.recv(4096)
    if not reply.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"GET / answered {reply[:64]!r}")


def timed_launch(variant: v.Variant, sock: str, env: dict[str, str] | None = None) -> tuple[float, float, int]:
    """(seconds to the API socket accepting, seconds to the answer of GET /, start in
    time.monotonic_ns()) for one launch, stopped afterwards."""
    start_ns = time.monotonic_ns()
    start = time.perf_counter()
    proc = subprocess.Popen(
        [*variant.command, "--api-sock", sock, "--id", "bench"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**variant.environ(), **(env or {})},
    )
    try:
        wait_accepting(sock, proc)
        accepting = time.perf_counter() - start
        first_answer(sock)
        answered = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait()
    return accepting, answered, start_ns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launches", type=int, default=10)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--baseline", action="append", default=[], metavar="LABEL=PATH")
    parser.add_argument("--profile", action="store_true", help="then trace launches through the fork server")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        profile = Profile(f"{tmp}/trace") if opts.profile else None
        variants = [*v.baselines(opts.baseline, tmp, stack), v.cold()]
        server = stack.enter_context(v.fork_server(tmp, env=server_env(profile)))
        variants.append(server.variant())
        accepting: dict[str, list[float]] = {x.label: [] for x in variants}
        answered: dict[str, list[float]] = {x.label: [] for x in variants}
        for i in range(opts.launches):
            for n, variant in enumerate(variants):
                seconds, answer, _ = timed_launch(variant, f"{tmp}/fc{i}-{n}.sock")
                accepting[variant.label].append(seconds)
                answered[variant.label].append(answer)
        print(f"launch → API socket accepting / → GET / answered, median of {opts.launches} interleaved launches:")
        for label, values in accepting.items():
            ms = statistics.median(values) * 1e3
            answer_ms = statistics.median(answered[label]) * 1e3
            verdict = "met" if ms <= GOAL_MS else "not met"
            print(f"  {label:28} {ms:7.1f} ms / {answer_ms:7.1f} ms   (accepting, goal ≤ {GOAL_MS:.0f} ms: {verdict})")
        print(f"  {'firecracker (published)':28} {FIRECRACKER_MS:7.1f} ms")
        if profile is not None:
            marks = {"accepting": 0.0, "GET / answered": 0.0}
            samples: dict[str, list[float]] = {k: [] for k in marks}
            for i in range(opts.launches):
                seconds, answer, start_ns = timed_launch(server.variant(), f"{tmp}/p{i}.sock", profile.env())
                profile.take(start_ns)
                samples["accepting"].append(seconds * 1e3)
                samples["GET / answered"].append(answer * 1e3)
            until = {f"bench: {k}": statistics.median(x) for k, x in samples.items()}
            profile.print("where the time goes through the fork server", until)

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
