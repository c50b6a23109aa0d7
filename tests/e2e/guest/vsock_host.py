"""The host side of the vsock checks (runs in the outer VM), Firecracker's hybrid vsock model.

    python vsock_host.py serve UDS_PATH_PORT              # guest-initiated: the VMM connects here
    python vsock_host.py connect UDS_PATH PORT MESSAGE    # host-initiated: "CONNECT PORT\\n", "OK ..."
    python vsock_host.py stream UDS_PATH_PORT BYTES [COUNT]  # guest-initiated streams, checked both ways
    python vsock_host.py hold UDS_PATH_PORT               # like serve, then keep the connection open

`serve` accepts one connection on the Unix socket `<uds_path>_<port>` the VMM connects to
when the guest connects to CID 2, reads a line and answers "pong:<line>". `connect` keeps
trying (the guest's listener may not be up yet) until the VMM answers "OK", then sends the
message and prints the guest's reply. Each prints what happened, one line, and exits 0 on
success.
"""

from __future__ import annotations

import os
import socket
import sys
import time

DEADLINE_S = 90


def read_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").rstrip("\n")


def serve(path: str) -> int:
    if os.path.exists(path):
        os.unlink(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(DEADLINE_S)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(30)
            line = read_line(conn)
            conn.sendall(f"pong:{line}\n".encode())
    print(f"served {line}")
    return 0


def hold(path: str) -> int:
    """Serve one connection as `serve` does, then keep it open until the peer ends it (the
    snapshot test: the guest holds it across a snapshot); prints "held <line>" once answered
    and "closed after_s=<s>" when it ends."""
    if os.path.exists(path):
        os.unlink(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(600)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(30)
            line = read_line(conn)
            conn.sendall(f"pong:{line}\n".encode())
            print(f"held {line}", flush=True)
            start = time.monotonic()
            conn.settimeout(None)
            try:
                while conn.recv(4096):
                    pass
            except OSError as exc:
                print(f"error {exc}", flush=True)
    print(f"closed after_s={time.monotonic() - start:.1f}", flush=True)
    return 0


def stream(path: str, reply_bytes: int, count: int = 1) -> int:
    """Accept `count` connections, one after the other; on each, read the guest's pattern
    (byte o is o % 251) until its half-close, then send `reply_bytes` of the same pattern
    and close."""
    if os.path.exists(path):
        os.unlink(path)
    failed = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(DEADLINE_S)
        for _ in range(count):
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                break
            failed += stream_one(conn, reply_bytes)
    return 1 if failed else 0


def stream_one(conn: socket.socket, reply_bytes: int) -> int:
    """One guest stream (see `stream`); prints "stream guest-done received= bad=" at the guest's
    half-close, then "stream received= bad= sent= seconds=", or "stream error ..." if the
    connection broke."""
    pattern = bytes(range(251)) * 263  # any offset (< 251) plus 64 KiB
    received = bad = sent = 0
    start = time.monotonic()
    try:
        with conn:
            conn.settimeout(120)
            while chunk := conn.recv(1 << 16):
                offset = received % 251
                expected = pattern[offset : offset + len(chunk)]
                if chunk != expected:
                    bad += sum(a != b for a, b in zip(chunk, expected, strict=True))
                received += len(chunk)
            print(f"stream guest-done received={received} bad={bad}", flush=True)  # a fault driver's cue
            while sent < reply_bytes:
                n = min(1 << 16, reply_bytes - sent)
                offset = sent % 251
                conn.sendall(pattern[offset : offset + n])
                sent += n
    except OSError as exc:
        print(f"stream error received={received} sent={sent}: {exc}", flush=True)
        return 1
    elapsed = time.monotonic() - start
    print(f"stream received={received} bad={bad} sent={sent} seconds={elapsed:.1f}", flush=True)
    return 0 if bad == 0 else 1


def connect(path: str, port: int, message: str) -> int:
    deadline = time.monotonic() + DEADLINE_S
    last = ""
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(path)
                sock.sendall(f"CONNECT {port}\n".encode())
                answer = read_line(sock)
                if not answer.startswith("OK "):
                    last = f"answer {answer!r}"
                else:
                    sock.sendall(f"{message}\n".encode())
                    print(f"reply {read_line(sock)}")
                    return 0
        except OSError as exc:
            last = str(exc)
        time.sleep(0.3)
    print(f"gave up: {last}")
    return 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"] and len(sys.argv) == 3:
        sys.exit(serve(sys.argv[2]))
    if sys.argv[1:2] == ["hold"] and len(sys.argv) == 3:
        sys.exit(hold(sys.argv[2]))
    if sys.argv[1:2] == ["stream"] and len(sys.argv) in (4, 5):
        sys.exit(stream(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) == 5 else 1))
    if sys.argv[1:2] == ["connect"] and len(sys.argv) == 5:
        sys.exit(connect(sys.argv[2], int(sys.argv[3]), sys.argv[4]))
    sys.exit(__doc__)
