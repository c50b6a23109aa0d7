"""The outer VM's end of the guest-driven I/O programs (bench/guest_io.py, the TCP floor test).

    python io_peer.py tcp-sink PORT [COUNT]     # accept COUNT connections, read each to its end
    python io_peer.py http-source PORT [COUNT]  # answer COUNT "GET /<bytes>" with that many bytes
    python io_peer.py tcp-hash PORT [COUNT]     # like tcp-sink, and print each stream's md5 (md5=...)

Each served connection prints one line `io_peer <kind> bytes=<n> secs=<first byte → end>`
(flushed), so a shell job can run it in the background and read its output afterwards.
bench/guest_io.py imports the same servers and runs them in threads; the vsock ends are
here too (Firecracker's hybrid model: `<uds_path>_<port>` for the guest's connections,
`CONNECT <port>` on `uds_path` for the host's).
"""

from __future__ import annotations

import hashlib
import socket
import sys
import time
from collections.abc import Callable

CHUNK = 1 << 16
Report = Callable[[str, int, float], None]


def _print_report(kind: str, nbytes: int, secs: float) -> None:
    print(f"io_peer {kind} bytes={nbytes} secs={secs:.3f}", flush=True)


def drain(conn: socket.socket) -> tuple[int, float]:
    """Read to the end; (bytes, seconds from the first byte to the end)."""
    total, first = 0, None
    buf = bytearray(CHUNK)
    while n := conn.recv_into(buf):
        if first is None:
            first = time.monotonic()
        total += n
    return total, (time.monotonic() - first) if first is not None else 0.0


def listener(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(4)
    return sock


def tcp_sink(sock: socket.socket, count: int, report: Report = _print_report) -> None:
    """Accept `count` connections, read each to its end, close it."""
    for _ in range(count):
        conn, _ = sock.accept()
        with conn:
            report("tcp-sink", *drain(conn))


def tcp_hash(sock: socket.socket, count: int) -> None:
    """Accept `count` connections, read each to its end and print its length and md5 (the
    fault tests compare it with what the guest sent, over one connection)."""
    for n in range(count):
        conn, peer = sock.accept()
        digest, total, start = hashlib.md5(), 0, time.monotonic()
        with conn:
            buf = bytearray(CHUNK)
            while got := conn.recv_into(buf):
                digest.update(memoryview(buf)[:got])
                total += got
        secs = time.monotonic() - start
        where = f"{peer[0]}:{peer[1]}"
        print(
            f"io_peer tcp-hash connection={n + 1} peer={where} bytes={total} md5={digest.hexdigest()} secs={secs:.1f}"
        )
        sys.stdout.flush()


def http_source(sock: socket.socket, count: int, report: Report = _print_report) -> None:
    """Answer `count` requests `GET /<bytes>` (busybox wget) with that many zeros."""
    zeros = bytes(CHUNK)
    for _ in range(count):
        conn, _ = sock.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 4096:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                request += chunk
            try:
                nbytes = int(request.split(b" ", 2)[1].lstrip(b"/"))
            except (IndexError, ValueError):
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
                continue
            start = time.monotonic()
            conn.sendall(f"HTTP/1.0 200 OK\r\nContent-Length: {nbytes}\r\n\r\n".encode())
            left = nbytes
            while left:
                left -= conn.send(zeros[: min(left, CHUNK)])
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(CHUNK):  # until the guest has read it all and closed
                pass
            report("http-source", nbytes, time.monotonic() - start)


def unix_sink(sock: socket.socket, count: int, report: Report = _print_report) -> None:
    """Accept `count` connections on a listening vsock or Unix socket, read each to its end."""
    for _ in range(count):
        conn, _ = sock.accept()
        with conn:
            report("vsock-sink", *drain(conn))


def vsock_send(uds_path: str, port: int, nbytes: int, deadline_s: float = 60) -> float:
    """Connect to the guest's `port` through the VMM (`CONNECT`), send `nbytes`, close; the seconds
    from "OK" to the guest's close. Retries until the guest listens."""
    deadline = time.monotonic() + deadline_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(uds_path)
            sock.sendall(f"CONNECT {port}\n".encode())
            answer = sock.recv(64)
            if answer.startswith(b"OK"):
                break
        except OSError:
            pass
        sock.close()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the guest never listened on vsock port {port}")
        time.sleep(0.2)
    with sock:
        start = time.monotonic()
        zeros, left = bytes(CHUNK), nbytes
        while left:
            left -= sock.send(zeros[: min(left, CHUNK)])
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(CHUNK):
            pass
        return time.monotonic() - start


def main(argv: list[str]) -> int:
    servers = {"tcp-sink": tcp_sink, "http-source": http_source, "tcp-hash": tcp_hash}
    if len(argv) < 2 or argv[0] not in servers:
        print(__doc__, file=sys.stderr)
        return 2
    count = int(argv[2]) if len(argv) > 2 else 1
    with listener(int(argv[1])) as sock:
        servers[argv[0]](sock, count)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
