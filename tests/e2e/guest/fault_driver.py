"""Break a device worker again and again while the inner guest uses it (runs in the outer VM).

    python fault_driver.py API_SOCK WORKER_PREFIX DEVICE_ID [--start S] [--kills N] [--faults crash,hang,delay:MS:COUNT]

Once GET / says the instance is Running (and, with `--wait-tap TAP:N`, once the TAP carried
N frames: the guest's traffic has begun; with `--wait-line FILE:TEXT`, once FILE has a line
starting with TEXT: a peer says the guest reached a phase), it waits `--start` seconds more (the guest boots
and starts its load: a worker killed during InstanceStart fails the start, by design), then SIGKILLs the worker
whose process name starts with WORKER_PREFIX `--kills` times, at random moments `--gap` (2-5 s)
apart, each time waiting until a replacement (a new pid) runs. Then it injects each of
`--faults` through the API (`PUT /faults/DEVICE_ID`, embervm started with
--enable-fault-injection) and waits for the replacement after each (`delay:MS:COUNT`
delays COUNT requests by MS ms: no replacement; it waits 5 s and reports how many fired).
It prints one line per event ("FAULT kill pid=... replaced_by=... after_s=...") and
finally "FAULT done ..." with the restarts embervm reports for the device in GET /embervm
and whether the device is broken (its restart policy exhausted).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

WAIT_S = 60
PHASE_WAIT_S = 300  # for the instance to run, or the guest to reach a phase


def worker_pid(prefix: str) -> int | None:
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().startswith(prefix):
                return int(comm.parent.name)
        except OSError:
            continue
    return None


def replacement(prefix: str, old: int | None) -> int | None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        pid = worker_pid(prefix)
        if pid is not None and pid != old:
            return pid
        time.sleep(0.05)
    return None


def api(sock_path: str, method: str, path: str, body: object = None) -> tuple[int, str]:
    """One HTTP/1.1 request over the API socket (the outer VM has no curl)."""
    data = b"" if body is None else json.dumps(body).encode()
    request = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(data)}\r\n"
    request += "Content-Type: application/json\r\nConnection: close\r\n\r\n"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(sock_path)
        sock.sendall(request.encode() + data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, rest = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest.decode(errors="replace")


def until(check: Callable[[], bool], period_s: float, errors: tuple[type[Exception], ...] = (OSError,)) -> bool:
    """Whether `check` comes true within PHASE_WAIT_S, asked every `period_s`; `errors`
    raised by it mean "not yet"."""
    deadline = time.monotonic() + PHASE_WAIT_S
    while time.monotonic() < deadline:
        try:
            if check():
                return True
        except errors:
            pass
        time.sleep(period_s)
    return False


def wait_running(sock_path: str) -> bool:
    def running() -> bool:
        status, body = api(sock_path, "GET", "/")
        return status == 200 and json.loads(body).get("state") == "Running"

    return until(running, 0.5, (OSError, ValueError))


def wait_tap(tap: str, frames: str) -> bool:
    """Until the guest's traffic has begun: the TAP has carried `frames` frames (either way).
    A fixed delay after InstanceStart would not do: the guest's boot takes 10-50 s here."""
    stats = Path("/sys/class/net") / tap / "statistics"
    return until(lambda: sum(int((stats / f"{way}_packets").read_text()) for way in ("rx", "tx")) >= int(frames), 0.1)


def wait_line(path: str, text: str) -> bool:
    """Until `path` has a line starting with `text` (a peer's progress line, e.g. the vsock
    host's "stream guest-done": the guest -> host half of a stream is over)."""
    return until(lambda: any(line.startswith(text) for line in Path(path).read_text().splitlines()), 0.1)


def worker_reported(sock_path: str, device_id: str) -> dict[str, object]:
    status, body = api(sock_path, "GET", "/embervm")  # embervm's own view; GET / is Firecracker's InstanceInfo
    if status != 200:
        return {}
    for worker in json.loads(body).get("workers", []):
        if device_id in (worker.get("drive_id"), worker.get("iface_id")) or worker.get("kind") == device_id:
            return dict(worker)
    return {}


def all_restarts(sock_path: str) -> str:
    """ "<worker>:<restarts>/<broken>,..." for every device worker (the soak's report)."""
    status, body = api(sock_path, "GET", "/embervm")
    if status != 200:
        return "?"
    workers = [w for w in json.loads(body).get("workers", []) if w.get("kind") != "vcpu"]
    return ",".join(f"{w.get('name')}:{w.get('restarts')}/{int(bool(w.get('broken')))}" for w in workers)


def fired(sock_path: str, device_id: str) -> int | None:
    status, body = api(sock_path, "GET", "/faults")
    if status != 200:
        return None
    return next((int(f["fired"]) for f in json.loads(body) if f.get("device_id") == device_id), None)


def kill_loop(args: argparse.Namespace) -> int:
    """SIGKILL the worker(s) `--kills` times (or for `--soak` seconds); how many were replaced."""
    low, high = (float(x) for x in args.gap.split(":"))
    done = 0
    soak_end = time.monotonic() + args.soak
    prefixes = [p for p in args.soak_prefixes.split(",") if p] or [args.prefix]
    kills = 0
    while (kills < args.kills) if not args.soak else (time.monotonic() < soak_end):
        kills += 1
        time.sleep(random.uniform(low, high))
        prefix = random.choice(prefixes)
        pid = worker_pid(prefix)
        if pid is None:
            print(f"FAULT no {prefix} worker to kill", flush=True)
            continue
        start = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        new = replacement(prefix, pid)
        took = time.monotonic() - start
        print(f"FAULT kill pid={pid} replaced_by={new} after_s={took:.2f}" + (f" worker={prefix}" if args.soak else ""))
        sys.stdout.flush()
        done += new is not None
    return done


def inject(args: argparse.Namespace) -> int:
    """Arm each of `--faults` in turn; how many workers were replaced."""
    done = 0
    low, high = (float(x) for x in args.gap.split(":"))
    for spec in filter(None, args.faults.split(",")):
        time.sleep(random.uniform(low, high))
        kind, *params = spec.split(":")
        body_in: dict[str, object] = {"kind": kind}
        if kind == "delay":
            body_in.update(delay_ms=int(params[0]), count=int(params[1]) if len(params) > 1 else 1)
        pid = worker_pid(args.prefix)
        start = time.monotonic()
        try:
            status, body = api(args.api_sock, "PUT", f"/faults/{args.device_id}", body_in)
        except OSError as e:  # embervm has gone: the guest's load ended before this fault
            print(f"FAULT {kind} not injected: {e!r} after_s={time.monotonic() - start:.2f}", flush=True)
            return done
        if kind == "delay":  # no death: the worker serves late; a used-up fault leaves GET /faults
            hits, deadline = None, time.monotonic() + 10
            while time.monotonic() < deadline and (now := fired(args.api_sock, args.device_id)) is not None:
                hits = now
                time.sleep(0.1)
            same = worker_pid(args.prefix) == pid
            used_up = fired(args.api_sock, args.device_id) is None
            line = f"FAULT delay status={status} delay_ms={body_in['delay_ms']} used_up={used_up} same_worker={same}"
            print(f"{line} after_s={time.monotonic() - start:.2f} last_seen_fired={hits}", flush=True)
            continue
        new = replacement(args.prefix, pid) if status == 204 else None
        why = "" if status == 204 else f" {body.strip()}"
        print(f"FAULT {kind} status={status} pid={pid} replaced_by={new} after_s={time.monotonic() - start:.2f}{why}")
        sys.stdout.flush()
        done += new is not None
    return done


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("api_sock")
    parser.add_argument("prefix")
    parser.add_argument("device_id")
    parser.add_argument("--start", type=float, default=20)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--faults", default="")
    parser.add_argument("--gap", default="2:5", help="MIN:MAX seconds between two kills")
    parser.add_argument("--soak", type=float, default=0, help="kill for this long instead (--kills ignored)")
    parser.add_argument("--soak-prefixes", default="", help="with --soak: a random one of these each time")
    parser.add_argument("--faults-first", action="store_true", help="inject --faults before the kills")
    parser.add_argument("--wait-tap", default="", help="TAP:N: first wait until the TAP has carried N frames")
    parser.add_argument("--wait-line", default="", help="FILE:TEXT: first wait until FILE has a line starting TEXT")
    args = parser.parse_args()
    if not wait_running(args.api_sock):
        print("FAULT the instance never ran", flush=True)
        return 1
    if args.wait_tap and not wait_tap(*args.wait_tap.split(":")):
        print(f"FAULT {args.wait_tap}: the guest's traffic never came", flush=True)
        return 1
    if args.wait_line and not wait_line(*args.wait_line.split(":", 1)):
        print(f"FAULT {args.wait_line}: the line never came", flush=True)
        return 1
    time.sleep(args.start)
    done = inject(args) if args.faults_first else 0
    done += kill_loop(args)
    if not args.faults_first:
        done += inject(args)
    time.sleep(2)  # a last worker started with needs_reset says so once it runs
    worker = worker_reported(args.api_sock, args.device_id)
    every = all_restarts(args.api_sock)
    line = f"FAULT done replaced={done} restarts={worker.get('restarts')} broken={worker.get('broken')}"
    print(line + (f" all_restarts={every}" if args.soak else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
