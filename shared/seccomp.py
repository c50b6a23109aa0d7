"""Seccomp policies as data, compiled into kernel filters by libseccomp.

A policy (`Filter`) has the shape of one entry of Firecracker's seccompiler JSON:

    {"default_action": "kill_process", "filter_action": "allow",
     "filter": [{"syscall": "ioctl", "comment": "who calls it",
                 "args": [{"index": 1, "type": "dword", "op": "eq", "val": 44672, "comment": "KVM_RUN"}]}]}

so a `--seccomp-filter` file is a JSON map from worker kind ("vcpu", "block", ...) to such
an entry, and `Filter.to_json()` prints ours in the same form. One extension: a rule may
carry its own `"action"` (we use it for `clone3` -> `{"errno": 38}`). Conditions of one
rule are and-ed, rules of one syscall or-ed, as in Firecracker. A "dword" condition with
`eq` compares the low 32 bits only (libseccomp `MASKED_EQ` with 0xffffffff), so a C `int`
argument matches whatever the caller left in the upper half of the register.

The default policies live next to each worker (`vcpu_worker/policy.py`, ...); `COMMON`
below is what every Python worker needs: CPython, glibc and ZeroMQ.

The binding is PyPI's `pyseccomp` (import name `pyseccomp`), a ctypes wrapper over
Debian's libseccomp2; no BPF is written by hand here.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyseccomp

DWORD_MASK = 0xFFFFFFFF
PROT_EXEC = 0x4
AT_EMPTY_PATH = 0x1000
AF_UNIX = 1
SOCK_STREAM = 1
CLONE_THREAD = 0x10000
SOCK_CLOEXEC = 0o2000000
SOCK_NONBLOCK = 0o4000
PR_SET_NAME = 15
# fcntl commands (asm-generic/fcntl.h) and the O_ASYNC flag: only the first five are ever allowed.
F_GETFD, F_SETFD, F_GETFL, F_SETFL = 1, 2, 3, 4
F_DUPFD_CLOEXEC = 1030
O_ASYNC = 0o20000

_SIMPLE_ACTIONS = {
    "allow": pyseccomp.ALLOW,
    "kill_process": pyseccomp.KILL_PROCESS,
    "kill_thread": pyseccomp.KILL_THREAD,
    "kill": pyseccomp.KILL_PROCESS,  # Firecracker's "kill" kills the process
    "log": pyseccomp.LOG,
    "trap": pyseccomp.TRAP,
}
_OPS = {
    "eq": pyseccomp.EQ,
    "ne": pyseccomp.NE,
    "lt": pyseccomp.LT,
    "le": pyseccomp.LE,
    "gt": pyseccomp.GT,
    "ge": pyseccomp.GE,
}

Action = str | dict[str, int]  # "allow" | {"errno": 13} | {"trace": 1}


class PolicyError(ValueError):
    """A seccomp policy (ours or a user's --seccomp-filter file) is malformed."""


@dataclass(frozen=True)
class Cond:
    """One condition on a syscall argument; `mask` is set only for op `masked_eq`."""

    index: int
    op: str
    value: int
    comment: str = ""
    dword: bool = True
    mask: int | None = None

    def to_arg(self) -> pyseccomp.Arg:
        if self.op == "masked_eq":
            mask = self.mask if self.mask is not None else DWORD_MASK
            return pyseccomp.Arg(self.index, pyseccomp.MASKED_EQ, mask & (DWORD_MASK if self.dword else ~0), self.value)
        if self.op == "eq" and self.dword:
            return pyseccomp.Arg(self.index, pyseccomp.MASKED_EQ, DWORD_MASK, self.value & DWORD_MASK)
        return pyseccomp.Arg(self.index, _OPS[self.op], self.value)

    def to_json(self) -> dict[str, Any]:
        op: Any = {"masked_eq": self.mask} if self.op == "masked_eq" else self.op
        out: dict[str, Any] = {"index": self.index, "type": "dword" if self.dword else "qword", "op": op}
        out["val"] = self.value
        if self.comment:
            out["comment"] = self.comment
        return out


@dataclass(frozen=True)
class Rule:
    """Syscall `syscall` matches when all `args` hold; `action` overrides the filter action."""

    syscall: str
    comment: str = ""
    args: tuple[Cond, ...] = ()
    action: Action | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"syscall": self.syscall}
        if self.comment:
            out["comment"] = self.comment
        if self.args:
            out["args"] = [c.to_json() for c in self.args]
        if self.action is not None:
            out["action"] = self.action
        return out


@dataclass(frozen=True)
class Filter:
    """One worker kind's policy: an allowlist whose misses kill the process by default."""

    rules: tuple[Rule, ...]
    default_action: Action = "kill_process"
    filter_action: Action = "allow"

    def __add__(self, other: Filter) -> Filter:
        return Filter(self.rules + other.rules, self.default_action, self.filter_action)

    def syscalls(self) -> set[str]:
        return {r.syscall for r in self.rules}

    def to_json(self) -> dict[str, Any]:
        return {
            "default_action": self.default_action,
            "filter_action": self.filter_action,
            "filter": [r.to_json() for r in self.rules],
        }


# --- helpers for writing policies -------------------------------------------------------
def allow(syscall: str, comment: str, *args: Cond) -> Rule:
    """Allow `syscall` (when every condition in `args` holds); `comment` names the caller."""
    return Rule(syscall, comment, tuple(args))


def fail(syscall: str, err: int, comment: str, *args: Cond) -> Rule:
    """Make `syscall` return -`err` instead of running it (the process survives)."""
    return Rule(syscall, comment, tuple(args), {"errno": err})


def arg_eq(index: int, value: int, comment: str = "") -> Cond:
    """Argument `index` equals `value` (low 32 bits: a C int or unsigned int argument)."""
    return Cond(index, "eq", value, comment)


def arg_masked(index: int, mask: int, value: int, comment: str = "") -> Cond:
    """`(argument index) & mask == value`."""
    return Cond(index, "masked_eq", value, comment, mask=mask)


def ioctl_request(value: int, name: str) -> Cond:
    """`ioctl`'s request (argument 1) pinned to `value`, labelled with its name and number."""
    return Cond(1, "eq", value, f"{name} ({value:#x})")


def policy(*rules: Rule) -> Filter:
    return Filter(tuple(rules))


NO_EXEC = arg_masked(2, PROT_EXEC, 0, "prot without PROT_EXEC")

# What every Python worker needs after set-up: CPython, glibc (threads, malloc), libzmq.
# Each entry was seen under strace in a worker after its filter was loaded, or is named
# for the path that needs it; docs/seccomp.md says how to redo that survey.
# No syscall that takes a path is allowed (seccomp cannot read the string a pointer points
# to); no socket() or connect(): every ZeroMQ connection is made before the filter is loaded.
COMMON = policy(
    # memory
    allow("brk", "glibc malloc: grows the main heap"),
    allow("mmap", "pymalloc arenas, glibc malloc arenas, thread stacks; never executable", NO_EXEC),
    allow("mprotect", "glibc: a new thread's stack, growing a malloc arena; never executable", NO_EXEC),
    allow("munmap", "pymalloc and glibc give memory back"),
    allow("mremap", "glibc realloc of a large block (bytes and list growth)"),
    allow("madvise", "glibc frees an exited thread's stack (MADV_DONTNEED)"),
    # fds the worker already holds
    allow("read", "os.read on pipes, sockets and eventfds; libzmq reads its mailbox eventfd"),
    allow("write", "os.write on pipes, sockets and eventfds; libzmq's mailbox; tracebacks to stderr"),
    allow("close", "libzmq drops a connection; fds closed at exit"),
    allow("poll", "zmq.Poller / zmq_poll; libzmq's mailbox wait"),
    allow("epoll_wait", "libzmq I/O and reaper threads"),
    allow("epoll_ctl", "libzmq I/O thread (re)registers its connections"),
    fail(
        "newfstatat",
        errno.EACCES,
        "stat() of a path: linecache looks for a frame's source (a Cython frame of pyzmq) while a"
        " traceback is formatted; refused with EACCES, without looking the path up, so that an error"
        " report does not kill the worker",
        arg_masked(3, AT_EMPTY_PATH, 0, "not AT_EMPTY_PATH"),
    ),
    # fcntl: the file-status and fd flags only. Never F_SETOWN/F_SETOWN_EX/F_SETSIG (with
    # O_ASYNC they make the kernel signal any process: a SIGKILL that `kill` is not needed
    # for), F_SETLEASE/F_NOTIFY (signals too), F_SETLK (host file locks) or F_SETPIPE_SZ.
    allow("fcntl", "libzmq (unblock_socket) and os.get_blocking read a new fd's flags", arg_eq(1, F_GETFL, "F_GETFL")),
    allow(
        "fcntl",
        "libzmq (unblock_socket) and os.set_blocking set O_NONBLOCK; never O_ASYNC (SIGIO to an owner)",
        arg_eq(1, F_SETFL, "F_SETFL"),
        arg_masked(2, O_ASYNC, 0, "O_ASYNC clear"),
    ),
    allow("getsockopt", "libzmq: SO_ERROR of a non-blocking connect, its connections' peer credentials"),
    allow("getsockname", "libzmq names a new connection's local end"),
    allow("getpeername", "libzmq names a new connection's remote end"),
    allow("sendto", "libzmq sends on a connection (send)"),
    allow("recvfrom", "libzmq receives on a connection (recv)"),
    # threads and synchronization
    allow("futex", "threading locks and conditions, queue.SimpleQueue, thread join"),
    allow(
        "clone",
        "threading.Thread.start (pthread_create); a fork has no CLONE_THREAD and is killed",
        arg_masked(0, CLONE_THREAD, CLONE_THREAD, "CLONE_THREAD"),
    ),
    fail("clone3", errno.ENOSYS, "glibc tries clone3 first; ENOSYS makes it use clone, whose flags a filter can see"),
    allow("set_robust_list", "glibc: every new thread"),
    # libzmq's background threads, started with the first socket, may still be starting when
    # TSYNC puts the filter on them: each reads its scheduling parameters and names itself.
    allow("sched_getparam", "libzmq thread start-up (pthread_getschedparam)"),
    allow("sched_getscheduler", "libzmq thread start-up (pthread_getschedparam)"),
    allow("prctl", "libzmq names its threads ZMQbg/... (pthread_setname_np)", arg_eq(0, PR_SET_NAME, "PR_SET_NAME")),
    allow("rseq", "glibc: every new thread registers its restartable sequence area"),
    allow("exit", "a thread ends"),
    allow("exit_group", "the worker ends (os._exit in the zygote's child)"),
    # signals
    allow("rt_sigprocmask", "glibc blocks signals around clone and in thread start-up"),
    allow("rt_sigreturn", "return from a signal handler (the vCPU kick signal)"),
    allow("restart_syscall", "the kernel resumes a wait that a signal interrupted"),
    allow("getpid", "libzmq's fork check on every mailbox operation; signal.pthread_kill"),
    allow("gettid", "glibc thread bookkeeping"),
    # tgkill is added with its first argument pinned to this process (tgkill_own_process)
    allow("clock_gettime", "time.monotonic where the vDSO falls back to the syscall (some clock sources)"),
)


def tgkill_own_process(pid: int) -> Rule:
    """`tgkill` limited to this process's threads: signal.pthread_kill kicks a vCPU thread."""
    return allow("tgkill", "signal.pthread_kill (the vCPU kick); raise()", arg_eq(0, pid, "this process"))


# --- JSON (Firecracker's seccompiler format) ------------------------------------------------
def _action(value: Any, where: str) -> Action:
    if isinstance(value, str) and value.lower() in _SIMPLE_ACTIONS:
        return value.lower()
    if isinstance(value, dict) and len(value) == 1:
        ((key, number),) = value.items()
        if key.lower() in ("errno", "trace") and isinstance(number, int) and 0 <= number < 0x10000:
            return {key.lower(): number}
    raise PolicyError(f"{where}: unknown action {value!r}")


def action_value(action: Action) -> int:
    """The libseccomp action for an `Action`."""
    if isinstance(action, str):
        return _SIMPLE_ACTIONS[action]
    ((key, number),) = action.items()
    return pyseccomp.ERRNO(number) if key == "errno" else pyseccomp.TRACE(number)


def _int(obj: dict[str, Any], key: str, where: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PolicyError(f"{where}: {key!r} must be a non-negative integer")
    return value


def _cond(obj: Any, where: str) -> Cond:
    if not isinstance(obj, dict):
        raise PolicyError(f"{where}: a condition must be an object")
    index = obj.get("index", obj.get("arg_index"))
    if not isinstance(index, int) or not 0 <= index <= 5:
        raise PolicyError(f"{where}: 'index' must be 0..5")
    kind = obj.get("type", obj.get("arg_type", "dword"))
    if kind not in ("dword", "qword"):
        raise PolicyError(f"{where}: 'type' must be 'dword' or 'qword'")
    value = _int(obj, "val", where)
    op = obj.get("op")
    if isinstance(op, dict) and set(op) == {"masked_eq"}:
        return Cond(
            index, "masked_eq", value, str(obj.get("comment", "")), kind == "dword", _int(op, "masked_eq", where)
        )
    if op not in _OPS:
        raise PolicyError(f"{where}: unknown op {op!r}")
    return Cond(index, op, value, str(obj.get("comment", "")), kind == "dword")


def _rule(obj: Any, where: str) -> Rule:
    if not isinstance(obj, dict) or not isinstance(obj.get("syscall"), str):
        raise PolicyError(f"{where}: a rule must be an object with a 'syscall' name")
    name = obj["syscall"]
    where = f"{where} ({name})"
    if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) < 0:
        raise PolicyError(f"{where}: unknown syscall {name!r}")
    args = obj.get("args", [])
    if not isinstance(args, list) or len(args) > 6:
        raise PolicyError(f"{where}: 'args' must be a list of at most 6 conditions")
    action = _action(obj["action"], where) if "action" in obj else None
    return Rule(name, str(obj.get("comment", "")), tuple(_cond(a, where) for a in args), action)


def filter_from_json(obj: Any, where: str = "filter") -> Filter:
    """Parse one worker kind's entry of a seccompiler-format JSON map."""
    if not isinstance(obj, dict) or not {"default_action", "filter_action", "filter"} <= set(obj):
        raise PolicyError(f"{where}: needs 'default_action', 'filter_action' and 'filter'")
    if not isinstance(obj["filter"], list):
        raise PolicyError(f"{where}: 'filter' must be a list")
    rules = tuple(_rule(r, f"{where} rule {i}") for i, r in enumerate(obj["filter"]))
    return Filter(rules, _action(obj["default_action"], where), _action(obj["filter_action"], where))


def load_filter_file(path: str | Path) -> dict[str, Filter]:
    """A `--seccomp-filter` file: {worker kind: filter}. Compiled once here to catch errors early."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise PolicyError(f"cannot read seccomp filter file {path}: {e.strerror}") from None
    except ValueError as e:
        raise PolicyError(f"seccomp filter file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not data:
        raise PolicyError(f"seccomp filter file {path} must map worker kinds to filters")
    filters = {str(kind): filter_from_json(entry, f"{path}: {kind}") for kind, entry in data.items()}
    for kind, flt in filters.items():
        try:
            compile_filter(flt)
        except OSError as e:
            raise PolicyError(f"{path}: {kind}: libseccomp refused the filter: {e}") from None
    return filters


# --- compiling ------------------------------------------------------------------------------
def compile_filter(flt: Filter, tsync: bool = True) -> pyseccomp.SyscallFilter:
    """A libseccomp filter for `flt` (not loaded). TSYNC puts it on every thread at load."""
    compiled = pyseccomp.SyscallFilter(action_value(flt.default_action))
    compiled.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    compiled.set_attr(pyseccomp.Attr.CTL_TSYNC, 1 if tsync else 0)
    for rule in flt.rules:
        action = action_value(rule.action if rule.action is not None else flt.filter_action)
        if action == action_value(flt.default_action):
            continue  # libseccomp refuses a rule that repeats the default action
        compiled.add_rule(action, rule.syscall, *(c.to_arg() for c in rule.args))
    return compiled


# --- compiled programs, kept for the processes forked later ---------------------------------
SYS_SECCOMP = 317  # x86-64
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
PR_SET_NO_NEW_PRIVS = 38
BPF_INSN_SIZE = 8  # struct sock_filter
_programs: dict[str, bytes] = {}  # repr(Filter) -> its BPF program; inherited over fork


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


_libc = ctypes.CDLL(None, use_errno=True)


def export_program(flt: Filter) -> bytes:
    """The BPF program libseccomp generates for `flt`: what `compile_filter(flt).load()` loads
    (both go through libseccomp's one generator), as an array of `struct sock_filter`."""
    compiled = compile_filter(flt)
    fd = os.memfd_create("embervm-seccomp", os.MFD_CLOEXEC)
    try:
        with os.fdopen(fd, "w+b", closefd=False) as f:
            compiled.export_bpf(f)
            f.seek(0)
            return f.read()
    finally:
        os.close(fd)


def program_for(flt: Filter) -> bytes:
    """`flt`'s program, generated once per process tree: a process that forks (the fork server,
    the zygote) generates the programs of the processes it will fork (`precompile`), and they
    load it without libseccomp generating it again."""
    key = repr(flt)  # a Filter is plain data: equal filters, equal reprs
    program = _programs.get(key)
    if program is None:
        program = _programs[key] = export_program(flt)
    return program


def precompile(*filters: Filter) -> None:
    """Generate the programs of filters that processes forked from this one will load."""
    for flt in filters:
        program_for(flt)


def load_program(program: bytes, tsync: bool = True) -> None:
    """Set no_new_privs and load a BPF program from `program_for`, as libseccomp's
    `seccomp_load` does with the program it generates (seccomp(2), TSYNC: on every thread)."""
    if not program or len(program) % BPF_INSN_SIZE:
        raise OSError(errno.EINVAL, "not a BPF program")
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"PR_SET_NO_NEW_PRIVS: {os.strerror(err)}")
    fprog = _SockFprog(len(program) // BPF_INSN_SIZE, program)
    flags = SECCOMP_FILTER_FLAG_TSYNC if tsync else 0
    syscall = _libc.syscall
    syscall.restype = ctypes.c_long
    result = syscall(
        ctypes.c_long(SYS_SECCOMP), ctypes.c_uint(SECCOMP_SET_MODE_FILTER), ctypes.c_uint(flags), ctypes.byref(fprog)
    )
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(err)}")
    if result > 0:  # TSYNC: the thread that could not take the filter
        raise OSError(errno.EAGAIN, f"seccomp: thread {result} could not be synchronized")


def syscall_name(number: int) -> str:
    """x86-64 syscall name for `number`, or "syscall N" when libseccomp does not know it."""
    try:
        name = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, number)
    except (OSError, ValueError):
        return f"syscall {number}"
    return name.decode() if isinstance(name, bytes) and name else f"syscall {number}"


# --- who was killed, for what ------------------------------------------------------------
_KILL_RECORD = re.compile(r"type=1326 .*?\bpid=(\d+)\b.*?\bsyscall=(\d+)\b.*?\bcode=(0x[0-9a-f]+)")
_KILL_CODES = {pyseccomp.KILL_PROCESS, pyseccomp.KILL_THREAD}
_MAX_REMEMBERED = 256


class SeccompKillLog:
    """The syscall that made seccomp kill a process, read from the kernel log (/dev/kmsg).

    When a filter kills a process, the kernel writes an audit record
    (`audit: type=1326 ... pid=P ... syscall=N ... code=0x80000000`) to the kernel log:
    `kill_process` is in /proc/sys/kernel/seccomp/actions_logged by default, and without
    an audit daemon the record goes to the kernel log. The supervisor opens /dev/kmsg when
    it starts, positioned at the end, and reads it only when a worker dies of SIGSYS.
    Reading /dev/kmsg needs CAP_SYSLOG when kernel.dmesg_restrict is 1 (root outside a
    jail); where it cannot be read (jailed, or auditd takes the records) the syscall is
    reported as unknown and `unavailable` says why.
    """

    def __init__(self, fd: int | None, unavailable: str = "") -> None:
        self._fd = fd
        self.unavailable = unavailable
        self._kills: dict[int, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str = "/dev/kmsg") -> SeccompKillLog:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            return cls(None, f"cannot read the kernel log {path}: {e.strerror}")
        with contextlib.suppress(OSError):
            os.lseek(fd, 0, os.SEEK_END)  # only records written from now on
        return cls(fd)

    def _drain(self) -> None:
        while self._fd is not None:
            try:
                record = os.read(self._fd, 8192)
            except BlockingIOError:
                return
            except BrokenPipeError:  # records were overwritten before we read them
                continue
            except OSError as e:
                self.unavailable = f"reading the kernel log failed: {e.strerror}"
                return
            match = _KILL_RECORD.search(record.decode(errors="replace"))
            if match and int(match.group(3), 16) in _KILL_CODES:
                if len(self._kills) >= _MAX_REMEMBERED:
                    self._kills.pop(next(iter(self._kills)))
                self._kills[int(match.group(1))] = int(match.group(2))

    def syscall_of(self, pid: int, timeout: float = 1.0) -> int | None:
        """The syscall number seccomp killed `pid` for, waiting up to `timeout` s for the record
        (the audit record reaches the log a moment after the process dies)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._drain()
                if pid in self._kills:
                    return self._kills.pop(pid)
                if self._fd is None or time.monotonic() >= deadline:
                    return None
            time.sleep(0.01)

    def describe(self, pid: int) -> str:
        """ "syscall 59, execve", or why the syscall is unknown."""
        number = self.syscall_of(pid)
        if number is None:
            return f"syscall unknown: {self.unavailable or 'no audit record in the kernel log'}"
        return f"syscall {number}, {syscall_name(number)}"

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
