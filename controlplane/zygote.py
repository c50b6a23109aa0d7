"""The worker zygote: a single-threaded, preloaded process that forks every worker.

Why: a fresh interpreter per worker costs ~70 ms and ~7 MiB; a fork of a process that
has already imported the worker code costs a few ms and shares its pages. Forking is
only safe from a process with no threads and no ZeroMQ context, which the supervisor
is not (uvicorn, ZeroMQ I/O threads), so the supervisor forks this zygote first thing
and asks it for workers over a SOCK_SEQPACKET socketpair, passing fds with SCM_RIGHTS.

Each worker is forked into namespaces of its own (`shared.isolation`: mount, network, IPC,
PID, and user when not root) unless the request says `"namespaces": false` (--no-namespaces),
with stdin and stdout on /dev/null and stderr on /dev/null or, with `"stderr": true`, on a
pipe whose write end is the request's last fd (the supervisor reads and labels it). The
child adds `args["isolation"]` = {"namespaces": bool, "host_pid": int} for the worker's own
later steps (connect, then `shared.isolation.isolate_after_connect`).

Wire format, msgpack maps:
    supervisor -> zygote  {"op": "spawn", "kind": str, "name": str, "args": map,
                           "namespaces": bool, "stderr": bool} + fds
                          {"op": "quit"}
    zygote -> supervisor  {"op": "spawned", "pid": int} | {"op": "error", "text": str}
                          {"op": "exited", "pid": int, "status": int}   (a raw wait status)
"""

from __future__ import annotations

import contextlib
import importlib
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import msgpack

from controlplane import startup_signals
from controlplane.policy import ZYGOTE, drop_zygote_capabilities
from shared import isolation
from shared.confine import PID_IN_OWN_NAMESPACE, default_filter, load_process_filter, warm_linecache
from shared.device_kinds import DEVICE_KINDS
from shared.process import close_fds_except, die_with_parent, reset_inherited_io, set_process_name
from shared.seccomp import Filter, precompile
from shared.startup_trace import mark as _mark

WorkerEntry = Callable[[dict[str, Any], list[int]], int]

# kind -> "module:function"; the function runs in the forked child and returns its exit code.
# The device kinds' entries come from their table (shared.device_kinds).
WORKER_ENTRIES = {
    "vcpu": "vcpu_worker.main:run",
    **{kind.name: kind.entry for kind in DEVICE_KINDS.values()},
    "test": "controlplane.zygote:_test_entry",
}
MAX_FDS = 64
MAX_MSG = 1 << 20


class ZygoteError(Exception):
    """The zygote died or refused a spawn request."""


def _test_entry(args: dict[str, Any], fds: list[int]) -> int:
    """A worker kind for tests of the zygote itself: writes `args["text"]`, its pid on the
    host and its pid in its own PID namespace to fds[0]."""
    host_pid = args.get("isolation", {}).get("host_pid") or os.getpid()
    os.write(fds[0], f"{args.get('text', '')} {host_pid} {os.getpid()}".encode())
    if len(fds) > 1:  # hold until the test closes its end, so it can look at this process
        os.read(fds[1], 1)
    return int(args.get("code", 0))


def precompile_worker_filters() -> None:
    """Generate, once, the seccomp program of each worker kind whose policy is fixed (its
    entry module's `POLICY`; the balloon's names one of its fds: generated in the worker), as a
    worker in its own PID namespace loads it: every worker forked from here loads it as is
    (shared.seccomp.program_for)."""
    for entry in WORKER_ENTRIES.values():
        module = importlib.import_module(entry.partition(":")[0])
        fixed = getattr(module, "POLICY", None)
        if isinstance(fixed, Filter):
            precompile(default_filter(fixed, PID_IN_OWN_NAMESPACE))


def _resolve(kind: str) -> WorkerEntry:
    module_name, _, func = WORKER_ENTRIES[kind].partition(":")
    return getattr(importlib.import_module(module_name), func)  # type: ignore[no-any-return]


class Zygote:
    """Supervisor-side handle: spawn workers, learn their exit statuses."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self._sock = sock
        self._lock = threading.Lock()
        self._exits: dict[int, int] = {}

    @classmethod
    def start(cls, seccomp: bool = True, close: tuple[int, ...] = ()) -> Zygote:
        """Fork the zygote. Call before this process starts any thread or ZeroMQ context.
        `seccomp` False (--no-seccomp) leaves it without its filter (controlplane/policy.py);
        the zygote closes the fds in `close` first thing (the API socket, bound before it)."""
        if threading.active_count() > 1:
            raise ZygoteError("the zygote must be forked before any thread starts")
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            parent_sock.close()
            for fd in close:
                os.close(fd)
            startup_signals.reset_in_child()  # the supervisor's; the zygote dies of SIGTERM
            code = 1
            try:
                code = _zygote_main(child_sock, seccomp)
            finally:
                os._exit(code)
        child_sock.close()
        return cls(pid, parent_sock)

    @property
    def fileno(self) -> int:
        return self._sock.fileno()

    def spawn(
        self,
        kind: str,
        name: str,
        args: dict[str, Any],
        fds: list[int],
        *,
        namespaces: bool = True,
        stderr_fd: int | None = None,
    ) -> int:
        """Fork a worker of `kind` holding `fds` (in this order), in namespaces of its own
        unless `namespaces` is False, its stderr on `stderr_fd` (else /dev/null); its pid."""
        request = msgpack.packb(
            {"op": "spawn", "kind": kind, "name": name, "args": args, "namespaces": namespaces,
             "stderr": stderr_fd is not None}
        )  # fmt: skip
        with self._lock:
            socket.send_fds(self._sock, [request], [*fds, *([] if stderr_fd is None else [stderr_fd])])
            while True:
                reply = self._recv_locked(block=True)
                if reply.get("op") == "spawned":
                    return int(reply["pid"])
                if reply.get("op") == "error":
                    raise ZygoteError(str(reply.get("text")))

    def poll_exits(self) -> dict[int, int]:
        """Exit statuses that arrived since the last call: {pid: raw wait status}."""
        with self._lock:
            while True:
                try:
                    self._recv_locked(block=False)
                except BlockingIOError:
                    break
            exits, self._exits = self._exits, {}
        return exits

    def wait_exit(self, pid: int, timeout: float) -> int | None:
        """Block up to `timeout` s for worker `pid`'s wait status."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if pid in self._exits:
                    return self._exits.pop(pid)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                ready, _, _ = select.select([self._sock], [], [], remaining)
                if ready:
                    self._recv_locked(block=True)

    def _recv_locked(self, block: bool) -> dict[str, Any]:
        flags = 0 if block else socket.MSG_DONTWAIT
        data = self._sock.recv(MAX_MSG, flags)
        if not data:
            raise ZygoteError("the worker zygote exited")
        reply = msgpack.unpackb(data, raw=False)
        if reply.get("op") == "exited":
            self._exits[int(reply["pid"])] = int(reply["status"])
        return reply  # type: ignore[no-any-return]

    def shutdown(self) -> None:
        """Ask the zygote to exit and reap it."""
        try:
            with self._lock:
                self._sock.send(msgpack.packb({"op": "quit"}))
        except OSError:
            pass
        self._sock.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _zygote_main(sock: socket.socket, seccomp: bool = True) -> int:  # pragma: no cover - runs in the child
    """The zygote's loop: fork workers on request, report their exits."""
    set_process_name("embervm-zygote")
    die_with_parent(signal.SIGKILL)
    _resolve("vcpu")  # every microVM's first worker: loaded before the first request is read
    time.localtime()  # glibc reads /etc/localtime once: before workers leave the host's files
    # The rest is preloaded while no request waits (children share these imported pages); a
    # request for a kind not loaded yet imports it in the child. Last, the source lines of
    # embervm's modules for tracebacks, which workers cannot read once they have left the
    # host's filesystem (shared.confine.warm_linecache; a worker reads what is missing).
    idle_work: list[Callable[[], object]] = [
        *(lambda kind=kind: _resolve(kind) for kind in WORKER_ENTRIES if kind != "vcpu"),
        precompile_worker_filters,  # no-op when the fork server did it
        warm_linecache,
    ]
    devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    sock_fd = sock.fileno()
    drop_zygote_capabilities()
    if seccomp:
        load_process_filter(ZYGOTE)  # a deny-list; every worker inherits it under its own
    _mark("zygote: confined")
    while True:
        ready, _, _ = select.select([sock_fd, wake_r], [], [], 0 if idle_work else None)
        if not ready and idle_work:
            idle_work.pop(0)()
            continue
        if wake_r in ready:
            while True:
                try:
                    if not os.read(wake_r, 64):
                        break
                except BlockingIOError:
                    break
            _report_exits(sock)
        if sock_fd in ready:
            try:
                data, fds, _, _ = socket.recv_fds(sock, MAX_MSG, MAX_FDS)
            except OSError:
                return 0
            if not data:
                return 0
            request = msgpack.unpackb(data, raw=False)
            if request.get("op") == "quit":
                return 0
            _spawn(sock, request, fds, keep={wake_r, wake_w}, devnull=devnull)


def _report_exits(sock: socket.socket) -> None:  # pragma: no cover - runs in the child
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        sock.send(msgpack.packb({"op": "exited", "pid": pid, "status": status}))


def _spawn(
    sock: socket.socket, request: dict[str, Any], fds: list[int], keep: set[int], devnull: int
) -> None:  # pragma: no cover
    kind, name = request.get("kind"), str(request.get("name", "worker"))
    stderr_fd = fds.pop() if request.get("stderr") and fds else devnull
    namespaces = bool(request.get("namespaces", True))
    if kind not in WORKER_ENTRIES:
        sock.send(msgpack.packb({"op": "error", "text": f"unknown worker kind {kind!r}"}))
        _close_all(fds, *([stderr_fd] if stderr_fd != devnull else []))
        return
    try:
        pid = isolation.clone_isolated(isolation.clone_flags()) if namespaces else os.fork()
    except isolation.IsolationError as e:
        sock.send(
            msgpack.packb(
                {"op": "error", "text": f"{e} (needs mount, network, IPC and PID namespaces: see docs/security.md)"}
            )
        )
        _close_all(fds, *([stderr_fd] if stderr_fd != devnull else []))
        return
    _mark(f"zygote: cloned {kind}" if pid else f"worker {kind}: born")
    if pid == 0:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            die_with_parent(signal.SIGKILL)  # a worker never outlives its zygote
            sock.close()
            for fd in keep:
                os.close(fd)
            set_process_name(f"embervm-{name}"[:15])
            # Nothing of embervm's own stdio: stdin and stdout are /dev/null, stderr the
            # supervisor's pipe for this worker (labelled there) or /dev/null.
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            os.dup2(stderr_fd, 2)
            close_fds_except([0, 1, 2, *fds])
            reset_inherited_io()  # nothing may write to an fd number the worker reuses
            args = dict(request.get("args", {}))
            args["isolation"] = {
                "namespaces": namespaces,
                "host_pid": isolation.host_pid() if namespaces else 0,
                "base_vm_size": isolation.address_space(),  # what the memory ceiling adds to
            }
            if namespaces:
                isolation.keep_only_setup_caps()
            code = _resolve(str(kind))(args, fds)
        except BaseException:
            traceback.print_exc(file=sys.stderr)
        finally:
            os._exit(code)
    _close_all(fds, *([stderr_fd] if stderr_fd != devnull else []))
    sock.send(msgpack.packb({"op": "spawned", "pid": pid}))


def _close_all(fds: list[int], *more: int) -> None:  # pragma: no cover - runs in the zygote
    for fd in [*fds, *more]:
        with contextlib.suppress(OSError):
            os.close(fd)
