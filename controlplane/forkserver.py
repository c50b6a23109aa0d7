"""`embervm-forkserver`: a preloaded process that forks a ready VMM for each `embervm` client.

Why: a cold `embervm` spends most of its start importing Python (FastAPI, uvicorn, pydantic,
pyzmq, the device code) and building what those imports build; all of it is paid again per
microVM (docs/performance.md). This process pays it once. For each request it forks; the
forked VMMs share its pages copy-on-write.

Per request (`controlplane.forkclient` is the other side; docs/ARCHITECTURE.md, "Fork server"):

1. accept; the peer's credentials (SO_PEERCRED) must be this server's uid or root; a pidfd
   pins the peer, and the connection must still be open once it is taken (no pid reuse);
2. the request: argv, environment, which of fds 0-2 are open, and with SCM_RIGHTS those fds
   and the client's working directory; its code stamp must be this server's (an upgraded
   installation is refused, and the client starts cold);
3. hand the request to the *reaper*, forked ahead of it while the server was idle (the
   *spare*: `SPARE_NAME` until it has a request), which reads the client's context from the kernel
   (`controlplane.caller_context`), opens its cgroups, enters its namespaces and forks the
   *VMM*; moves the VMM into the cgroups; then forwards the client's signals to the VMM,
   kills the VMM if the client's connection ends, and sends the client the VMM's wait status;
4. the VMM takes on the client's root, cwd, rlimits, ids and capabilities, puts the client's
   fds on 0-2, closes everything else, tells the client its pid and runs `controlplane.cli`.

The server itself never opens /dev/kvm, never maps guest memory and never reads anything a
VMM or worker writes: the only input it parses is a client's request, from its owner or root.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any, NamedTuple, NoReturn

from controlplane import caller_context as cc
from controlplane import forkclient
from shared.startup_trace import mark as _mark

MAX_FDS = 4  # stdin, stdout, stderr, cwd
REQUEST_TIMEOUT_S = 2.0
SPARE_NAME = "embervm-spare"  # a reaper forked ahead, waiting for its request
REAPER_NAME = "embervm-reaper"  # the spare once it has its request
HANDOVER = struct.Struct("=i")  # the client's pid, then the request as the client sent it


def preload() -> None:
    """Import and build, once, what every VMM would: the CLI, the API app and server, the
    MicroVm, every worker kind, the API models' validators, and the source lines workers keep
    for tracebacks. No thread, no ZeroMQ context and no file descriptor stays behind: the
    server must remain safe to fork."""
    import uvicorn
    from fastapi import FastAPI

    from controlplane import api, cli, launcher, microvm, server  # noqa: F401
    from controlplane.api.app import _routes, warm_routes
    from controlplane.models._base import FcModel
    from controlplane.policy import SUPERVISOR, ZYGOTE
    from controlplane.zygote import WORKER_ENTRIES, _resolve, precompile_worker_filters
    from shared.boot.cpu_state import identity_map_table
    from shared.confine import read_sources
    from shared.seccomp import precompile

    for kind in WORKER_ENTRIES:
        _resolve(kind)
    precompile(SUPERVISOR, ZYGOTE)  # every VMM's filters, and its workers': generated once
    precompile_worker_filters()
    cli._parser()  # the command line's parser, the API's routes, the boot page tables: built once
    _routes()
    warm_routes()
    identity_map_table()
    with contextlib.suppress(ImportError):  # what anyio imports at its first worker thread (sync endpoints)
        import anyio._backends._asyncio  # noqa: F401
    config = uvicorn.Config(FastAPI(), log_config=None, lifespan="off")
    config.load()  # imports the HTTP protocol and loop modules uvicorn picks at run time
    todo: list[type] = [FcModel]
    while todo:
        model = todo.pop()
        todo.extend(model.__subclasses__())
        if model is not FcModel:
            model.model_rebuild(force=True)  # type: ignore[attr-defined]
    read_sources()
    time.localtime()
    gc.collect()
    gc.freeze()  # the collector never walks (so never writes to) the preloaded objects: they stay shared


class ForkServer:
    """The listening socket and the loop that serves it."""

    def __init__(self, path: str, max_forks: int = 0) -> None:
        self.path = path
        self.max_forks = max_forks
        self.forks = 0
        self.stamp = forkclient.code_stamp()
        parent = os.path.dirname(path)
        if parent and not os.path.isdir(parent):
            os.makedirs(parent, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket (a live server's is replaced: see docs, upgrade)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old_umask)
        self.inode = os.stat(path).st_ino
        self.sock.listen(64)
        self.spare: Spare | None = None

    def serve(self) -> int:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        stopping: list[int] = []
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _f: stopping.append(signum))
        try:
            while not stopping:
                if self.spare is None and not (self.max_forks and self.forks >= self.max_forks):
                    try:
                        self.spare = self._fork_spare()  # while idle: off the next request's path
                    except OSError as e:  # a request forks one itself, or is refused
                        print(f"embervm-forkserver: cannot fork a spare reaper: {e}", file=sys.stderr)
                try:
                    ready, _, _ = select.select([self.sock.fileno(), wake_r], [], [])
                except InterruptedError:
                    continue
                if wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(wake_r, 64):
                            pass
                    _reap_children()
                if self.sock.fileno() in ready and not stopping:
                    self._serve_one()
                    if self.max_forks and self.forks >= self.max_forks:
                        print("embervm-forkserver: served --max-forks requests; exiting", file=sys.stderr)
                        break
        finally:
            self.close()
        return 0

    def close(self) -> None:
        """Stop listening. The socket path is removed only if it is still ours (a new server
        may have replaced it); running VMMs and their reapers are not touched; the spare
        ends at its socket's EOF."""
        self.sock.close()
        if self.spare is not None:
            self.spare.sock.close()
            self.spare = None
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)

    def _serve_one(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        fds: list[int] = []
        try:
            conn.settimeout(REQUEST_TIMEOUT_S)
            pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid not in (0, os.geteuid()):
                _reply(conn, {"op": "refused", "why": f"uid {uid} may not use the fork server of uid {os.geteuid()}"})
                return
            data, fds, _, _ = socket.recv_fds(conn, forkclient.MAX_MSG, MAX_FDS)
            request = json.loads(data) if data else None
            why = _check_request(request, fds, self.stamp)
            if why is not None:
                _reply(conn, {"op": "refused", "why": why})
                return
            assert isinstance(request, dict)
            _mark("server: request read")
            pidfd = os.pidfd_open(pid)
            try:
                if select.select([conn], [], [], 0)[0] and not conn.recv(1, socket.MSG_PEEK):
                    return  # the client is gone: `pid` may already name another process
                self._hand_over(conn, pid, pidfd, data, fds)
            finally:
                os.close(pidfd)
        except (OSError, ValueError) as e:
            with contextlib.suppress(OSError):
                _reply(conn, {"op": "refused", "why": f"bad request: {e}"})
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            conn.close()

    def _hand_over(self, conn: socket.socket, pid: int, pidfd: int, data: bytes, fds: list[int]) -> None:
        """Give the spare the request and the fds it needs: it is the reaper from now on. A
        spare that died meanwhile (killed by hand) is replaced once."""
        message = [HANDOVER.pack(pid) + data]
        for _attempt in range(2):
            spare = self.spare if self.spare is not None else self._fork_spare()
            self.spare = None
            try:
                socket.send_fds(spare.sock, message, [conn.fileno(), pidfd, *fds])
            except OSError:
                continue
            finally:
                spare.sock.close()
            self.forks += 1
            _mark("server: request handed over")
            return
        raise OSError("no reaper could be started")

    def _fork_spare(self) -> Spare:
        if threading.active_count() > 1:
            raise OSError("the fork server has a thread: it cannot fork")
        sys.stdout.flush()
        sys.stderr.flush()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the spare
            code = 1
            try:
                mine.close()
                code = _spare(theirs, self.sock)
            finally:
                os._exit(code)
        theirs.close()
        return Spare(child, mine)


class Spare(NamedTuple):
    """A reaper forked ahead; `sock` takes its request."""

    pid: int
    sock: socket.socket


def _spare(sock: socket.socket, listener: socket.socket) -> int:  # pragma: no cover - runs in the spare
    """Wait for a request (EOF: the server stopped), then be its reaper."""
    listener.close()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    from shared.process import set_process_name

    set_process_name(SPARE_NAME)
    data, fds, _, _ = socket.recv_fds(sock, forkclient.MAX_MSG + HANDOVER.size, MAX_FDS + 2)
    sock.close()
    if len(data) <= HANDOVER.size or len(fds) < 2:
        for fd in fds:
            os.close(fd)
        return 0
    _mark("reaper: request taken")
    set_process_name(REAPER_NAME)
    (client,) = HANDOVER.unpack_from(data)
    conn = socket.socket(fileno=fds[0])
    conn.settimeout(REQUEST_TIMEOUT_S)  # as the server had it (the fd's O_NONBLOCK is shared)
    return _reaper(conn, client, fds[1], json.loads(data[HANDOVER.size :]), fds[2:])


def _reply(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.send(json.dumps(message).encode())


def _check_request(request: object, fds: list[int], stamp: str) -> str | None:
    """Why `request` is malformed or unwelcome (None: it is fine)."""
    if not isinstance(request, dict) or request.get("op") != "fork":
        return "not a fork request"
    argv, env, stdio = request.get("argv"), request.get("env"), request.get("stdio")
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
        return "argv must be a list of strings"
    if not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
        return "env must map strings to strings"
    if not (isinstance(stdio, list) and all(fd in (0, 1, 2) for fd in stdio) and len(set(stdio)) == len(stdio)):
        return "stdio must list which of fds 0-2 are open"
    if len(fds) != len(stdio) + 1:
        return f"expected {len(stdio) + 1} fds, got {len(fds)}"
    if not isinstance(request.get("start_ns"), int) or not isinstance(request.get("cpu_us"), int):
        return "start_ns and cpu_us must be integers"
    if request.get("stamp") != stamp:
        return "the fork server runs other code than this embervm (started before an upgrade?): restart it"
    return None


def _reap_children() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _reaper(  # pragma: no cover - runs in the reaper
    conn: socket.socket, client: int, pidfd: int, request: dict[str, Any], fds: list[int]
) -> int:
    """The reaper: put a VMM in the client's context, then bind their lives together."""
    try:
        ctx = cc.read_context(client)
        why = cc.refusal(ctx)
        if why is not None:
            raise cc.ContextError(why)
        root_fd = os.open(ctx.root_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        cgroup_fds = cc.open_cgroup_procs(ctx)
        _mark("reaper: context read")
        cc.enter_namespaces(ctx, pidfd)
    except (cc.ContextError, OSError) as e:
        _reply(conn, {"op": "refused", "why": str(e)})
        return 1
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    vmm = os.fork()
    _mark("reaper: VMM forked" if vmm else "vmm: born")
    if vmm == 0:
        os.close(go_w)
        _vmm(conn, ctx, request, fds, root_fd, go_r)
    os.close(go_r)
    os.close(root_fd)
    for fd in fds:
        os.close(fd)
    try:
        cc.join_cgroups(cgroup_fds, vmm)
        os.write(go_w, b"g")
    except (cc.ContextError, OSError) as e:
        os.kill(vmm, signal.SIGKILL)
        os.waitpid(vmm, 0)
        _reply(conn, {"op": "refused", "why": str(e)})
        return 1
    finally:
        os.close(go_w)
        for fd in cgroup_fds:
            os.close(fd)
    return _bind_lives(conn, vmm)


def _bind_lives(conn: socket.socket, vmm: int) -> int:  # pragma: no cover - runs in the reaper
    """Forward the client's signals to the VMM; kill the VMM when the client's connection
    ends; send the VMM's wait status to the client when it ends."""
    vmm_fd = os.pidfd_open(vmm)
    conn.settimeout(None)
    while True:
        ready, _, _ = select.select([conn.fileno(), vmm_fd], [], [])
        if vmm_fd in ready:
            _, status = os.waitpid(vmm, 0)
            with contextlib.suppress(OSError):
                _reply(conn, {"op": "exit", "status": status})
            return 0
        try:
            data = conn.recv(forkclient.MAX_MSG)
        except OSError:
            data = b""
        if not data:  # the client died (or closed): no VM may outlive it
            os.kill(vmm, signal.SIGKILL)
            os.waitpid(vmm, 0)
            return 0
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            message = json.loads(data)
            sig = int(message.get("signal", 0))
            if message.get("op") == "signal" and sig in forkclient.FORWARDED_SIGNALS:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(vmm, sig)


def _vmm(  # pragma: no cover - runs in the VMM
    conn: socket.socket,
    ctx: cc.CallerContext,
    request: dict[str, Any],
    fds: list[int],
    root_fd: int,
    go_r: int,
) -> NoReturn:
    """The VMM: wait to be in the client's cgroups, take on the rest of its context, become
    `embervm` with the client's fds 0-2, argv and environment."""
    code = 1
    try:
        if os.read(go_r, 1) != b"g":
            os._exit(1)
        os.close(go_r)
        *stdio_fds, cwd_fd = fds
        try:
            cc.take_on(ctx, root_fd, cwd_fd)
        except (cc.ContextError, OSError) as e:
            _reply(conn, {"op": "refused", "why": f"cannot take on the caller's context: {e}"})
            os._exit(1)
        _mark("vmm: context taken on")
        from shared.process import close_fds_except, die_with_parent, set_process_name

        die_with_parent(signal.SIGKILL)  # after the uid change, which clears it
        set_process_name("embervm")
        _reply(conn, {"op": "forked", "pid": os.getpid()})
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in stdio_fds]  # clear of 0-2
        for target in (0, 1, 2):
            if target in request["stdio"]:
                os.dup2(high[request["stdio"].index(target)], target)
            else:
                with contextlib.suppress(OSError):
                    os.close(target)  # closed in the client: closed in the VMM
        close_fds_except([0, 1, 2])
        _reopen_stdio()
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["embervm", *request["argv"]]
        from controlplane import cli

        cli.START_NS = int(request["start_ns"])
        cli.BIND_EARLY = True  # everything is imported: the API serves ~15 ms after binding
        argv = list(request["argv"])
        if not any(a.startswith("--parent-cpu-time-us") for a in argv):
            argv += ["--parent-cpu-time-us", str(int(request["cpu_us"]))]  # the client's share
        try:
            cli.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _reopen_stdio() -> None:  # pragma: no cover - runs in the VMM
    """sys.stdin/stdout/stderr on the client's fds 0-2, buffered as Python buffers them at
    start-up (a closed fd: None, as in a cold start)."""
    for name, fd, mode, buffering in (("stdin", 0, "r", -1), ("stdout", 1, "w", -1), ("stderr", 2, "w", 1)):
        try:
            stream = open(fd, mode, buffering=buffering, closefd=False)  # noqa: SIM115
        except OSError:
            stream = None
        setattr(sys, name, stream)


def ensure_running(path: str, log_path: str, timeout: float = 120.0) -> int | None:
    """Start a detached `embervm-forkserver` at `path` unless one already answers there; its
    pid once it listens (None: one was running). For ./scripts/demo: later runs start fast."""
    probe = forkclient.connect(path)
    if probe is not None:
        probe.close()
        return None
    import subprocess

    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "embervm-forkserver"), "--socket", path],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while (probe := forkclient.connect(path)) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise OSError(f"embervm-forkserver did not start (see {log_path})")
        time.sleep(0.05)
    probe.close()
    return proc.pid


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="embervm-forkserver", description=__doc__.splitlines()[0])
    p.add_argument("--socket", default=forkclient.default_socket_path(), help="Where to listen.")
    p.add_argument(
        "--max-forks",
        type=int,
        default=0,
        help="Exit after this many forks (0: never); a supervisor that restarts the server "
        "then gives later VMMs a fresh address-space layout (docs/ARCHITECTURE.md, ASLR).",
    )
    return p


def main(argv: list[str] | None = None) -> NoReturn:
    args = build_parser().parse_args(argv)
    preload()
    server = ForkServer(args.socket, args.max_forks)
    print(f"embervm-forkserver: listening on {args.socket}", file=sys.stderr, flush=True)
    sys.exit(server.serve())
