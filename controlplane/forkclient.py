"""The `embervm` command: a microVM from the fork server when one runs, else a cold start.

Firecracker's process model holds either way (docs/ARCHITECTURE.md, "Fork server"). With a
server (`controlplane.forkserver`), this process hands the server its stdin, stdout and
stderr, its working directory, its argv and environment; the server forks a VMM that it puts
in exactly this process's context (namespaces, cgroups, root, uid/gid/groups, rlimits,
capabilities: `controlplane.caller_context`) and this process stays its face:

- SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to it go to the VMM;
- it ends with the VMM's wait status (an exit code, or death by the same signal);
- if it dies (SIGKILL included), the server's reaper kills the VMM at once; if the VMM or
  the reaper dies, it ends too.

No server (no socket at the path, nothing listening, or it refuses: another uid, other code,
a context it cannot reproduce): the cold path, `controlplane.cli.main`, in this process (or,
started by the `-I -S` launcher that has no site-packages, in this process after an exec of
the interpreter as usual: `controlplane.client_launcher`).

This process lives for as long as its microVM and starts for every one, so before that choice
it imports only modules written in C (`posix`, `_socket`, `_signal`, `_json`; `select` once forked):
`os`, `socket`, `signal` and `json` would cost more than the fork server's whole answer
(docs/performance.md).

`EMBERVM_FORK_SERVER`: the server's socket path, or `off`; default `/run/embervm/forkserver.sock`
as root, `$XDG_RUNTIME_DIR/embervm/forkserver.sock` otherwise.
"""

from __future__ import annotations

import _json
import _signal
import _socket
import posix as os  # `os` itself would cost 2 ms (collections.abc, posixpath) without site
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

START_NS = time.monotonic_ns()
ENV_VAR = "EMBERVM_FORK_SERVER"
FORWARDED_SIGNALS = (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP, _signal.SIGQUIT, _signal.SIGUSR1, _signal.SIGUSR2)
MAX_MSG = 1 << 20
PACKAGES = ("controlplane", "shared", "devices", "vcpu_worker", "jailer")
GENERIC_ERROR = 1  # shared.exitcodes.GENERIC_ERROR, without importing it
COLD_ENTRY = "from controlplane.cli import main; main()"


def environ() -> dict[str, str]:
    """The environment as `os.environ` has it (`posix.environ` holds bytes)."""
    encoding, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
    return {k.decode(encoding, errors): v.decode(encoding, errors) for k, v in os.environ.items()}


def default_socket_path() -> str:
    if os.geteuid() == 0:
        return "/run/embervm/forkserver.sock"
    runtime = environ().get("XDG_RUNTIME_DIR") or f"/tmp/embervm-{os.geteuid()}"
    return f"{runtime}/embervm/forkserver.sock"


def socket_path() -> str | None:
    """Where to look for the server; None: do not (`EMBERVM_FORK_SERVER=off`)."""
    value = environ().get(ENV_VAR)
    if value is None:
        return default_socket_path()
    return None if value in ("", "off", "0", "no") else value


def code_stamp() -> str:
    """What identifies the code a VMM would run: the interpreter and every embervm module's
    path, size and mtime (the text itself: hashing it would import more than it saves). The
    server refuses a client whose stamp differs from its own (it was started before an
    upgrade), and the client starts cold instead."""
    path = __file__ if __file__.startswith("/") else f"{os.getcwd()}/{__file__}"
    root = path.rpartition("/")[0].rpartition("/")[0]
    parts = [sys.executable, sys.version]
    for package in PACKAGES:
        _stamp_tree(f"{root}/{package}", parts)
    return "\n".join(parts)


def _stamp_tree(directory: str, parts: list[str]) -> None:
    with os.scandir(directory) as it:
        entries = sorted(it, key=lambda entry: entry.name)
    for entry in entries:
        if entry.name.endswith(".py") and not entry.is_dir():
            st = entry.stat()
            parts.append(f"{entry.path}:{st.st_size}:{st.st_mtime_ns}")
        elif entry.name != "__pycache__" and entry.is_dir(follow_symlinks=False):
            _stamp_tree(entry.path, parts)


# --- JSON with the json package's own C parts (the package imports re, ~5 ms) -----------------
class _JsonContext:
    """What `_json.make_scanner` reads from a `json.JSONDecoder`: plain JSON, strict."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # NaN, Infinity, -Infinity


_scan = _json.make_scanner(_JsonContext())  # type: ignore[arg-type]  # duck-typed, as json.decoder passes itself


def dumps(value: object) -> str:
    """JSON for the request's types: dicts with string keys, lists, strings, ints, bools, None."""
    if isinstance(value, str):
        return str(_json.encode_basestring_ascii(value))
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{dumps(str(k))}:{dumps(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def loads(data: bytes) -> object:
    """Parse one JSON document (ValueError if it is not exactly one)."""
    text = data.decode()
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        raise ValueError("not JSON") from None
    if text[end:].strip():
        raise ValueError("extra data after the JSON document")
    return value


# --- the connection ------------------------------------------------------------------------
def send(sock: _socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = dumps(message).encode()
    if fds:
        rights = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds)
        sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
    else:
        sock.send(data)


def receive(sock: _socket.socket) -> dict[str, Any] | None:
    """The next message, or None at EOF."""
    data = sock.recv(MAX_MSG)
    if not data:
        return None
    message = loads(data)
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    return message


def connect(path: str) -> _socket.socket | None:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    return sock


def _open_stdio() -> list[int]:
    """Which of fds 0-2 are open (a closed one stays closed in the VMM)."""
    opened = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            opened.append(fd)
        except OSError:
            pass
    return opened


def request_fork(sock: _socket.socket, argv: list[str]) -> int | None:
    """Ask for a VMM; its pid (in this process's pid namespace), or None if refused."""
    stdio = _open_stdio()
    cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        request = {
            "op": "fork",
            "argv": argv,
            "env": environ(),
            "stdio": stdio,
            "start_ns": START_NS,
            "cpu_us": time.process_time_ns() // 1000,
            "stamp": code_stamp(),
        }
        send(sock, request, [*stdio, cwd])
    finally:
        os.close(cwd)
    reply = receive(sock)
    if reply is None or reply.get("op") != "forked":
        why = "the server closed the connection" if reply is None else str(reply.get("why", reply))
        print(f"embervm: fork server: {why}; starting without it", file=sys.stderr)
        return None
    return int(reply["pid"])


def catch_signals() -> int:
    """Catch the forwarded signals from before the fork request on; the read end of the pipe
    that carries their numbers. A signal that comes while the server forks is kept there and
    forwarded once the VMM's pid is known: in a PID namespace of its own this process is pid
    1, and a signal it has no handler for would be dropped (a SIGTERM sent as soon as the
    VMM's API socket exists would be lost)."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    _signal.set_wakeup_fd(wake_w)
    for sig in FORWARDED_SIGNALS:
        _signal.signal(sig, lambda *_: None)  # the wakeup fd carries the number
    return wake_r


def release_signals(wake_r: int) -> list[int]:
    """Default handlers again (the cold path); the signals caught meanwhile."""
    for sig in FORWARDED_SIGNALS:
        _signal.signal(sig, _signal.SIG_DFL)
    _signal.set_wakeup_fd(-1)
    try:
        caught = list(os.read(wake_r, 64))
    except BlockingIOError:
        caught = []
    os.close(wake_r)
    return caught


def stay_the_face(sock: _socket.socket, wake_r: int) -> NoReturn:
    """Forward signals to the VMM until it ends, then end the same way."""
    import select  # only now: the server forks meanwhile

    while True:
        try:
            ready, _, _ = select.select([sock.fileno(), wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            try:
                for number in os.read(wake_r, 64):
                    send(sock, {"op": "signal", "signal": number})
            except BlockingIOError:
                pass
            except OSError:
                pass  # the reaper is gone: its EOF ends us below
        if sock.fileno() in ready:
            try:
                message = receive(sock)
            except (OSError, ValueError):
                message = None
            if message is None:
                print("embervm: the fork server's reaper of this microVM went away", file=sys.stderr)
                os._exit(GENERIC_ERROR)
            if message.get("op") == "exit":
                end_like(int(message["status"]))


def end_like(status: int) -> NoReturn:
    """Exit with the VMM's raw wait status: its exit code, or death by its signal."""
    sys.stdout.flush()
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (_signal.SIGKILL, _signal.SIGSTOP):  # those two cannot be caught anyway
            _signal.signal(sig, _signal.SIG_DFL)
            _signal.pthread_sigmask(_signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
        time.sleep(1)
        os._exit(128 + sig)  # a signal this process cannot die of (SIGSTOP was never sent)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else GENERIC_ERROR)


def start_cold(args: list[str]) -> NoReturn:
    """The cold path in this process: `controlplane.cli.main`. Started without site-packages
    (the `-I -S` launcher), exec the interpreter as it starts by default first: same pid, the
    usual sys.path and environment, and `-P` so that the working directory is not on sys.path."""
    if sys.flags.no_site:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-P", "-c", COLD_ENTRY, *args])
    from controlplane import cli

    cli.main(args)


def main(argv: list[str] | None = None) -> NoReturn:
    """The `embervm` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    path = socket_path()
    sock = connect(path) if path else None
    if sock is not None:
        wake_r = catch_signals()
        try:
            pid = request_fork(sock, args)
        except (OSError, ValueError) as e:
            print(f"embervm: fork server: {e}; starting without it", file=sys.stderr)
            pid = None
        if pid is not None:
            stay_the_face(sock, wake_r)
        sock.close()
        caught = release_signals(wake_r)
        if caught:  # asked to stop before any VM existed: stop, as the signal would have
            end_like(caught[0])  # a wait status of death by that signal
    start_cold(args)
