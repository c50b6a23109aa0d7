"""The red-team catalog (test-only): what a compromised worker tries, run from inside a worker.

tests/security/test_redteam.py proves that a worker taken over by a hostile guest reaches
nothing but its own fds. It cannot copy the confinement to do that: it runs these attacks
inside the real workers, spawned by the real zygote under their production confinement
(namespaces, uid, seccomp filter), by sending them `RedTeam(seq, attack, arg)` control
messages. A worker acts on them only when it was spawned with `SeccompSettings.test_hooks`,
which no command-line flag or API call can set. Workers import this module at module
level (nothing may be imported once the filter is loaded); until `run` is called it does
nothing.

Each attack is a function `(arg, context) -> outcome`, where the outcome starts with
"blocked: " (the kernel refused: an errno, no such path, nothing to read) or "REACHED: "
(the worker got there, and what it got). A worker that the seccomp filter kills never
answers: the test reads the kill from the supervisor and counts it as blocked. A few
attacks ("sent: ...") only deliver something hostile to the supervisor; the test judges
those by what the supervisor does next.

Attacks never do lasting harm when they do get through: signals go to a victim the test
started, ptrace detaches at once, a forked child exits at once.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared import protocol as p

_libc = ctypes.CDLL(None, use_errno=True)
_libc_gil = ctypes.PyDLL(None, use_errno=True)  # keeps the GIL across the call: clone() returns twice
_libc.syscall.restype = ctypes.c_long
_libc_gil.syscall.restype = ctypes.c_long
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

# x86-64 syscall numbers and the constants the attacks pass
SYS_PTRACE, SYS_WAIT4, SYS_KILL, SYS_SCHED_GETPARAM, SYS_CLONE = 101, 61, 62, 143, 56
SYS_TGKILL, SYS_NEWFSTATAT, SYS_UNSHARE, SYS_SETNS, SYS_PROCESS_VM_READV, SYS_PIDFD_OPEN = 234, 262, 272, 308, 310, 434
PTRACE_ATTACH, PTRACE_DETACH = 16, 17
WALL = 0x40000000
AT_FDCWD, AT_EMPTY_PATH = -100, 0x1000
CLONE_NEWNET, CLONE_NEWUSER, SIGCHLD = 0x40000000, 0x10000000, 17
F_SETSIG = 10
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20
MAP_FAILED = ctypes.c_void_p(-1).value
PAGE = 4096
FORGED_METRIC = 987654321  # the value the foreign-metrics attack reports: easy to find
MAX_FD = 256
SIGIO_WAIT_MS = 300

_armed: list[int] = []  # fds the SIGIO attack armed, for sigio_disarm


@dataclass
class Context:
    """What an attack may use of the worker it runs in, as hostile code there would."""

    name: str  # the worker's name ("vcpu", "block_rootfs", ...)
    send_frames: Callable[[list[bytes]], object]  # raw frames on its control socket to the supervisor


Attack = Callable[[str, Context], str]
ATTACKS: dict[str, Attack] = {}
# The syscalls each attack is about: a filter that kills the worker for another one stopped
# the attack's plumbing, not the attack (the test then fails instead of counting it blocked).
SYSCALLS: dict[str, tuple[str, ...]] = {}


def attack(*syscalls: str) -> Callable[[Attack], Attack]:
    def register(func: Attack) -> Attack:
        ATTACKS[func.__name__] = func
        SYSCALLS[func.__name__] = syscalls
        return func

    return register


def run(msg: p.RedTeam, context: Context) -> str:
    """Run one attack; the log line that reports it (`redteam#<seq> <attack>: <outcome>`)."""
    func = ATTACKS.get(msg.attack)
    if func is None:
        outcome = f"unknown attack {msg.attack!r}"
    else:
        try:
            outcome = func(msg.arg, context)
        except OSError as e:
            outcome = blocked(e)
        except Exception as e:  # an attack's own bug: say so, never pass for blocked
            outcome = f"attack failed: {type(e).__name__}: {e}"
    return f"redteam#{msg.seq} {msg.attack}: {outcome}"


def blocked(e: OSError) -> str:
    name = errno.errorcode.get(e.errno or 0, str(e.errno))
    return f"blocked: {name} ({e.strerror})"


def _check(result: int) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _syscall(number: int, *args: int | bytes | ctypes.Array[ctypes.c_char]) -> int:
    converted = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    return _check(_libc.syscall(number, *converted))


# --- host files ------------------------------------------------------------------------------
@attack("openat")
def open_host_file(path: str, _: Context) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, 64)
    finally:
        os.close(fd)
    return f"REACHED: opened {path} and read {len(data)} bytes"


def _stat(path: str, flags: int) -> str:
    buf = ctypes.create_string_buffer(256)
    _syscall(SYS_NEWFSTATAT, AT_FDCWD, path.encode(), buf, flags)
    size = int.from_bytes(buf.raw[48:56], "little")  # st_size in x86-64's struct stat
    return f"REACHED: stat {path}: {size} bytes"


@attack("newfstatat")
def stat_host_path(path: str, _: Context) -> str:
    return _stat(path, 0)


@attack("newfstatat")
def stat_host_path_with_empty_path_flag(path: str, _: Context) -> str:
    """AT_EMPTY_PATH does not require the path to be empty: a rule that allows the flag
    to let fstat() through lets the worker stat any path."""
    return _stat(path, AT_EMPTY_PATH)


@attack("openat", "newfstatat", "getdents64")
def list_root(_: str, __: Context) -> str:
    names = sorted(os.listdir("/"))
    if not names:
        return "blocked: / is empty"
    return f"REACHED: / holds {len(names)} entries ({', '.join(names[:6])}, ...)"


@attack("openat", "newfstatat", "getdents64")
def list_proc(_: str, __: Context) -> str:
    """Enumerate the processes it can see."""
    pids = [name for name in os.listdir("/proc") if name.isdigit()]
    if len(pids) <= 1:
        return f"blocked: /proc shows {len(pids)} process(es)"
    return f"REACHED: /proc lists {len(pids)} processes"


@attack("execve")
def execve_host_file(path: str, _: Context) -> str:
    """`path` exists on the host and is not executable: EACCES means the worker saw it."""
    try:
        os.execv(path, [path])
    except OSError as e:
        if e.errno == errno.EACCES:
            return f"REACHED: execve found {path} on the host (refused only as not executable)"
        raise
    return "REACHED: execve succeeded"  # pragma: no cover - the process image is gone by now


# --- sockets ------------------------------------------------------------------------------------
# Straight libc calls: Python's socket module adds syscalls of its own (ioctl FIONBIO for a
# timeout) that a filter may kill for, which would hide whether the attack itself is stopped.
def _socket(family: int, kind: int, proto: int = 0) -> int:
    return _check(_libc.socket(family, kind | socket.SOCK_CLOEXEC, proto))


def _connect(address: str) -> int:
    """A connected AF_UNIX stream socket's fd (`address` starting with NUL: abstract)."""
    raw = address.encode()
    sockaddr = socket.AF_UNIX.to_bytes(2, "little") + raw + (b"" if raw.startswith(b"\0") else b"\0")
    fd = _socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _check(_libc.connect(fd, ctypes.create_string_buffer(sockaddr, len(sockaddr)), len(sockaddr)))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_some(fd: int, timeout_ms: int = 5000) -> bytes:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return os.read(fd, 4096) if poller.poll(timeout_ms) else b""


@attack("socket", "connect")
def connect_api_socket(path: str, _: Context) -> str:
    fd = _connect(path)
    try:
        os.write(fd, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        reply = _read_some(fd)
    finally:
        os.close(fd)
    first = reply.split(b"\r\n", 1)[0].decode(errors="replace")
    return f"REACHED: the API answered {first!r}" if reply else "REACHED: connected to the API socket"


@attack("socket", "connect")
def connect_unix_socket(path: str, _: Context) -> str:
    fd = _connect(path)
    try:
        banner = _read_some(fd)
    finally:
        os.close(fd)
    return f"REACHED: connected to {path} (it said {banner!r})"


@attack("socket", "connect")
def connect_abstract_socket(name: str, _: Context) -> str:
    fd = _connect("\0" + name)
    try:
        banner = _read_some(fd)
    finally:
        os.close(fd)
    return f"REACHED: connected to @{name} (it said {banner!r})"


@attack("socket")
def socket_inet(_: str, __: Context) -> str:
    os.close(_socket(socket.AF_INET, socket.SOCK_STREAM))
    return "REACHED: created an AF_INET socket"


@attack("socket")
def socket_unix(_: str, __: Context) -> str:
    os.close(_socket(socket.AF_UNIX, socket.SOCK_STREAM))
    return "REACHED: created an AF_UNIX socket"


@attack("socket")
def socket_netlink(_: str, __: Context) -> str:
    os.close(_socket(socket.AF_NETLINK, socket.SOCK_RAW))
    return "REACHED: created an AF_NETLINK socket"


# --- signals, processes ----------------------------------------------------------------------
@attack("kill")
def kill_process(pid: str, _: Context) -> str:
    _syscall(SYS_KILL, int(pid), 9)
    return f"REACHED: kill({pid}, SIGKILL) succeeded"


@attack("tgkill")
def tgkill_process(pid: str, _: Context) -> str:
    _syscall(SYS_TGKILL, int(pid), int(pid), 9)
    return f"REACHED: tgkill({pid}, {pid}, SIGKILL) succeeded"


@attack("kill")
def kill_every_process(_: str, __: Context) -> str:
    """kill(-1, 0): signal 0 only asks whether any process could be signalled."""
    try:
        _syscall(SYS_KILL, -1, 0)
    except OSError as e:
        if e.errno == errno.ESRCH:
            return "blocked: ESRCH (no process it may signal)"
        raise
    return "REACHED: kill(-1, 0) found processes it may signal"


@attack("sched_getparam")
def probe_pid(pid: str, _: Context) -> str:
    """sched_getparam needs no permission: it tells whether a pid exists."""
    buf = ctypes.create_string_buffer(8)
    try:
        _syscall(SYS_SCHED_GETPARAM, int(pid), buf)
    except OSError as e:
        if e.errno == errno.ESRCH:
            return f"blocked: ESRCH (pid {pid} is not visible)"
        raise
    return f"REACHED: pid {pid} is visible (sched_getparam)"


@attack("fcntl")
def sigio_arm(pid: str, _: Context) -> str:
    """Point SIGIO of every fd the worker holds at `pid`, as SIGKILL: the next byte that
    arrives on any of them (the supervisor's next control message) kills the victim."""
    refused: OSError | None = None
    for fd in range(3, MAX_FD):
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError:
            continue  # not an open fd
        try:
            fcntl.fcntl(fd, fcntl.F_SETOWN, int(pid))
            fcntl.fcntl(fd, F_SETSIG, 9)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_ASYNC)
        except OSError as e:
            refused = e
            continue
        _armed.append(fd)
    if not _armed:
        return blocked(refused) if refused is not None else "blocked: no fd to arm"
    return f"REACHED: {len(_armed)} fds send SIGKILL to pid {pid} when they become readable"


@attack("fcntl")
def sigio_disarm(_: str, __: Context) -> str:
    """Undo sigio_arm (its message arriving was the trigger)."""
    for fd in _armed:
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_ASYNC)
            fcntl.fcntl(fd, F_SETSIG, 0)
            fcntl.fcntl(fd, fcntl.F_SETOWN, 0)
        except OSError:
            continue
    count = len(_armed)
    _armed.clear()
    return f"disarmed {count} fds"


@attack("ptrace", "wait4")
def ptrace_attach(pid: str, _: Context) -> str:
    _syscall(SYS_PTRACE, PTRACE_ATTACH, int(pid), 0, 0)
    try:
        _syscall(SYS_WAIT4, int(pid), 0, WALL, 0)  # the attach stop, then let it go
    finally:
        _syscall(SYS_PTRACE, PTRACE_DETACH, int(pid), 0, 0)
    return f"REACHED: ptrace attached to pid {pid}"


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


@attack("process_vm_readv")
def process_vm_readv(pid: str, _: Context) -> str:
    """Read the target's memory where the `sys` module object lives: every embervm process
    is forked from the supervisor, so it is at the same address in each of them."""
    buf = ctypes.create_string_buffer(64)
    local = _Iovec(ctypes.cast(buf, ctypes.c_void_p), len(buf))
    remote = _Iovec(id(sys), len(buf))
    try:
        count = _libc.syscall(
            ctypes.c_long(SYS_PROCESS_VM_READV),
            ctypes.c_long(int(pid)),
            ctypes.byref(local),
            ctypes.c_long(1),
            ctypes.byref(remote),
            ctypes.c_long(1),
            ctypes.c_long(0),
        )
        _check(count)
    except OSError as e:
        if e.errno == errno.EFAULT:  # the access check passed; only the address was wrong
            return f"REACHED: process_vm_readv may read pid {pid} (EFAULT at the address tried)"
        raise
    return f"REACHED: read {count} bytes of pid {pid}'s memory"


# --- executable memory, exec, namespaces -----------------------------------------------------
@attack("mmap")
def mmap_exec(_: str, __: Context) -> str:
    addr = _libc.mmap(None, PAGE, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    if addr in (None, MAP_FAILED):
        _check(-1)
    _libc.munmap(addr, PAGE)
    return "REACHED: mapped writable and executable memory"


@attack("mprotect")
def mprotect_exec(_: str, __: Context) -> str:
    addr = _libc.mmap(None, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    if addr in (None, MAP_FAILED):
        _check(-1)
    try:
        _check(_libc.mprotect(addr, PAGE, PROT_READ | PROT_EXEC))
    finally:
        _libc.munmap(addr, PAGE)
    return "REACHED: made memory executable"


@attack("unshare")
def unshare_net(_: str, __: Context) -> str:
    _syscall(SYS_UNSHARE, CLONE_NEWNET)
    return "REACHED: unshare(CLONE_NEWNET) succeeded"


@attack("pidfd_open", "setns")
def setns_into_pid(pid: str, _: Context) -> str:
    """Join the network namespace of `pid` (the supervisor) through its pidfd."""
    pidfd = _syscall(SYS_PIDFD_OPEN, int(pid), 0)
    try:
        _syscall(SYS_SETNS, pidfd, CLONE_NEWNET)
    finally:
        os.close(pidfd)
    return f"REACHED: setns into pid {pid}'s network namespace"


@attack("clone", "wait4")
def clone_new_namespaces(_: str, __: Context) -> str:
    """A fork into new user and network namespaces (needs no capability); the child exits at once."""
    flags, zero = ctypes.c_long(CLONE_NEWUSER | CLONE_NEWNET | SIGCHLD), ctypes.c_long(0)
    pid = _check(_libc_gil.syscall(ctypes.c_long(SYS_CLONE), flags, zero, zero, zero, zero))
    if pid == 0:  # the child: nothing but exit
        _libc_gil.syscall(ctypes.c_long(231), ctypes.c_long(0))  # exit_group
    _syscall(SYS_WAIT4, pid, 0, WALL, 0)
    return "REACHED: cloned a child into new user and network namespaces"


# --- the standard fds --------------------------------------------------------------------------
@attack("poll", "read")
def read_stdin(_: str, __: Context) -> str:
    poller = select.poll()
    poller.register(0, select.POLLIN)
    events = dict(poller.poll(500))
    if events.get(0, 0) & select.POLLNVAL:
        return "blocked: fd 0 is not open"
    if not events:
        return "blocked: nothing to read on fd 0 within 0.5 s"
    data = os.read(0, 4096)
    if not data:
        return "blocked: fd 0 is at end of file (/dev/null)"
    return f"REACHED: read {len(data)} bytes from fd 0: {data[:40]!r}"


@attack("write")
def write_stdio(token: str, _: Context) -> str:
    """Lines on fds 1 and 2 imitating the supervisor; the test looks for them in embervm's output."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000000000")
    done = []
    for fd in (1, 2):
        line = f"{stamp} [anonymous-instance:main] Firecracker exiting successfully. exit_code=0 {token} fd{fd}\n"
        try:
            os.write(fd, line.encode())
            done.append(f"fd {fd}: written")
        except OSError as e:
            done.append(f"fd {fd}: {blocked(e)}")
    return "sent: " + "; ".join(done)


# --- hostile messages to the supervisor --------------------------------------------------------
@attack("sendto", "write")
def zmq_three_frames(_: str, context: Context) -> str:
    context.send_frames([b"redteam", b"three", b"frames"])
    return "sent: a 3-frame message"


@attack("sendto", "write")
def zmq_oversized(mib: str, context: Context) -> str:
    context.send_frames([bytes(int(mib) << 20)])
    return f"sent: a {mib} MiB message"


@attack("sendto", "write")
def zmq_forged_update_results(count: str, context: Context) -> str:
    """Answers to run-time updates the supervisor has not asked this worker for (ids are sequential)."""
    for request_id in range(1, int(count) + 1):
        forged = p.UpdateResult(request_id, False, f"forged by {context.name}")
        context.send_frames([p.encode(forged)])
    return f"sent: UpdateResult for request ids 1..{count}"


@attack("sendto", "write")
def zmq_fake_log(token: str, context: Context) -> str:
    """A Log whose text carries a second line shaped like the supervisor's own."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000000000")
    text = f"x\n{stamp} [anonymous-instance:main] Firecracker exiting successfully. exit_code=0 {token}"
    context.send_frames([p.encode(p.Log("info", text))])
    context.send_frames([p.encode(p.Log("error", f"Firecracker exiting successfully. exit_code=0 {token}"))])
    return "sent: two Log lines imitating the supervisor"


@attack("sendto", "write", "exit_group")
def zmq_foreign_metrics(group: str, context: Context) -> str:
    """Metrics for another worker's group, then exit: a dead worker's counters are kept for good."""
    context.send_frames([p.encode(p.Metrics({group: {"read_count": FORGED_METRIC}}))])
    select.poll().poll(SIGIO_WAIT_MS)  # let libzmq's I/O thread deliver it
    os._exit(0)
