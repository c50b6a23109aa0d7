"""A process's execution context, read from /proc, and how a forked VMM takes it on.

The fork server (`controlplane.forkserver`) forks VMMs for processes it did not start. A VMM
must run exactly where the process that asked for it runs (Firecracker's process model: the
jailer or orchestrator put it there), so the server reads that process's context from the
kernel, never from what the process says about itself:

- namespaces (`/proc/<pid>/ns/*`: user, mnt, net, ipc, uts, cgroup, pid, time), entered
  with one `setns(pidfd, flags)`; a pid namespace applies to the reaper's children;
- cgroups (`/proc/<pid>/cgroup`, v1 and v2), joined by writing the VMM's pid to each
  hierarchy's `cgroup.procs`, opened before the namespaces change;
- root (`/proc/<pid>/root`) and, passed by the client, its working directory;
- uid, gid (real, effective, saved), supplementary groups, umask, capabilities (bounding,
  permitted, effective, inheritable, ambient) and no_new_privs (`/proc/<pid>/status`);
- rlimits (`prlimit`), CPU affinity and nice value.

What cannot be reproduced is refused, and the client starts cold: a caller under a seccomp
filter (a filter cannot be copied from another process), or with another LSM label.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import resource

import prctl

CLONE_NEWTIME = 0x00000080
NAMESPACE_FLAGS = {  # user first: entering it gives the capabilities the others need
    "user": 0x10000000,
    "mnt": 0x00020000,
    "net": 0x40000000,
    "ipc": 0x08000000,
    "uts": 0x04000000,
    "cgroup": 0x02000000,
    "pid": 0x20000000,
    "time": CLONE_NEWTIME,
}
RLIMITS = {name: getattr(resource, name) for name in dir(resource) if name.startswith("RLIMIT_")}
# /proc/<pid>/limits rows (world-readable; prlimit on another uid's process needs CAP_SYS_RESOURCE)
LIMITS_ROWS = {
    "Max cpu time": "RLIMIT_CPU",
    "Max file size": "RLIMIT_FSIZE",
    "Max data size": "RLIMIT_DATA",
    "Max stack size": "RLIMIT_STACK",
    "Max core file size": "RLIMIT_CORE",
    "Max resident set": "RLIMIT_RSS",
    "Max processes": "RLIMIT_NPROC",
    "Max open files": "RLIMIT_NOFILE",
    "Max locked memory": "RLIMIT_MEMLOCK",
    "Max address space": "RLIMIT_AS",
    "Max file locks": "RLIMIT_LOCKS",
    "Max pending signals": "RLIMIT_SIGPENDING",
    "Max msgqueue size": "RLIMIT_MSGQUEUE",
    "Max nice priority": "RLIMIT_NICE",
    "Max realtime priority": "RLIMIT_RTPRIO",
    "Max realtime timeout": "RLIMIT_RTTIME",
}
_libc = ctypes.CDLL(None, use_errno=True)
SYS_SETNS = 308


class ContextError(Exception):
    """The caller's context cannot be read or reproduced."""


@dataclasses.dataclass
class CallerContext:
    pid: int
    namespaces: dict[str, int]  # name -> inode
    cgroups: list[tuple[str, str]]  # (hierarchy "controllers" field, path)
    uids: tuple[int, int, int]
    gids: tuple[int, int, int]
    groups: list[int]
    umask: int
    caps: dict[str, int]  # CapInh, CapPrm, CapEff, CapBnd, CapAmb
    no_new_privs: bool
    rlimits: dict[str, tuple[int, int]]
    affinity: set[int]
    nice: int
    seccomp: int
    lsm_label: str

    @property
    def root_path(self) -> str:
        return f"/proc/{self.pid}/root"


def _status(pid: int | str) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def namespaces_of(pid: int | str) -> dict[str, int]:
    found = {}
    for name in NAMESPACE_FLAGS:
        with contextlib.suppress(FileNotFoundError):
            found[name] = os.stat(f"/proc/{pid}/ns/{name}").st_ino
    return found


def cgroups_of(pid: int | str) -> list[tuple[str, str]]:
    rows = []
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            rows.append((controllers, path))
    return rows


def _limits(pid: int) -> dict[str, tuple[int, int]]:
    found = {}
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            row = next((r for r in LIMITS_ROWS if line.startswith(r + " ")), None)
            if row is None or LIMITS_ROWS[row] not in RLIMITS:
                continue
            soft, hard = line[len(row) :].split()[:2]
            found[LIMITS_ROWS[row]] = tuple(
                resource.RLIM_INFINITY if v == "unlimited" else int(v) for v in (soft, hard)
            )
    return found  # type: ignore[return-value]


def _lsm_label(pid: int | str) -> str:
    try:
        with open(f"/proc/{pid}/attr/current") as f:
            return f.read().strip("\0\n")
    except OSError:
        return ""


def read_context(pid: int) -> CallerContext:
    """Process `pid`'s context, as the kernel reports it."""
    try:
        status = _status(pid)
        return CallerContext(
            pid=pid,
            namespaces=namespaces_of(pid),
            cgroups=cgroups_of(pid),
            uids=tuple(int(x) for x in status["Uid"].split()[:3]),  # type: ignore[arg-type]
            gids=tuple(int(x) for x in status["Gid"].split()[:3]),  # type: ignore[arg-type]
            groups=[int(x) for x in status.get("Groups", "").split()],
            umask=int(status.get("Umask", "022"), 8),
            caps={k: int(status[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
            no_new_privs=status.get("NoNewPrivs", "0") == "1",
            rlimits=_limits(pid),
            affinity=os.sched_getaffinity(pid),
            nice=os.getpriority(os.PRIO_PROCESS, pid),
            seccomp=int(status.get("Seccomp", "0")),
            lsm_label=_lsm_label(pid),
        )
    except (OSError, KeyError, ValueError) as e:
        raise ContextError(f"cannot read the context of process {pid}: {e}") from None


def refusal(ctx: CallerContext) -> str | None:
    """Why a VMM cannot be given `ctx` (None: it can)."""
    if ctx.seccomp != 0:
        return "the caller runs under a seccomp filter, which cannot be copied to a forked VMM"
    if ctx.lsm_label != _lsm_label("self"):
        return f"the caller's LSM label {ctx.lsm_label!r} differs from the server's"
    return None


def _cgroup_mounts() -> dict[str, str]:
    """hierarchy key ("" for v2, else the controllers field, e.g. "memory" or "name=systemd") -> mount point."""
    found: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _, options = right.split()[:3]
            mount_point = left.split()[4]
            if fstype == "cgroup2":
                found.setdefault("", mount_point)
            elif fstype == "cgroup":
                names = [
                    o for o in options.split(",") if (o not in ("rw", "ro") and "=" not in o) or o.startswith("name=")
                ]
                found.setdefault(",".join(names), mount_point)
    return found


def open_cgroup_procs(ctx: CallerContext) -> list[int]:
    """fds of `cgroup.procs` of each of the caller's cgroups that differ from this process's
    (opened now, while this process still sees the host's cgroup file systems)."""
    mine = dict(cgroups_of("self"))
    mounts = _cgroup_mounts()
    fds = []
    try:
        for controllers, path in ctx.cgroups:
            if mine.get(controllers) == path:
                continue
            mount = mounts.get(controllers)
            if mount is None:
                raise ContextError(f"the cgroup hierarchy {controllers or 'v2'!r} is not mounted here")
            fds.append(os.open(f"{mount}{path}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC))
    except OSError as e:
        for fd in fds:
            os.close(fd)
        raise ContextError(f"cannot join the caller's cgroup: {e}") from None
    except ContextError:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def join_cgroups(fds: list[int], pid: int) -> None:
    """Move process `pid` (as this process's pid namespace names it) into each cgroup."""
    for fd in fds:
        try:
            os.write(fd, str(pid).encode())
        except OSError as e:
            raise ContextError(f"cannot join the caller's cgroup: {e}") from None


def enter_namespaces(ctx: CallerContext, pidfd: int) -> None:
    """Enter each of the caller's namespaces that differs from this process's, at once
    (setns with a pidfd, Linux >= 5.8). The pid namespace takes effect for children."""
    mine = namespaces_of("self")
    flags = 0
    for name, inode in ctx.namespaces.items():
        if name == "pid":
            current = _pid_ns_for_children()
            if current != inode:
                flags |= NAMESPACE_FLAGS[name]
        elif mine.get(name) != inode:
            flags |= NAMESPACE_FLAGS[name]
    if flags and _libc.syscall(SYS_SETNS, pidfd, flags) != 0:
        err = ctypes.get_errno()
        raise ContextError(f"cannot enter the caller's namespaces: {os.strerror(err)}")


def _pid_ns_for_children() -> int:
    try:
        return os.stat("/proc/self/ns/pid_for_children").st_ino
    except OSError:
        return os.stat("/proc/self/ns/pid").st_ino


def take_on(ctx: CallerContext, root_fd: int, cwd_fd: int) -> None:
    """In the forked VMM, after the namespaces and cgroups: the caller's root and working
    directory, rlimits, umask, affinity, nice, groups/gid/uid, capabilities, no_new_privs."""
    root = os.fstat(root_fd)
    here = os.stat("/")
    if (root.st_dev, root.st_ino) != (here.st_dev, here.st_ino):
        os.fchdir(root_fd)
        os.chroot(".")
    os.fchdir(cwd_fd)
    for name, limits in ctx.rlimits.items():
        if resource.getrlimit(RLIMITS[name]) != limits:
            resource.setrlimit(RLIMITS[name], limits)
    os.umask(ctx.umask)
    if os.sched_getaffinity(0) != ctx.affinity:
        os.sched_setaffinity(0, ctx.affinity)
    if os.getpriority(os.PRIO_PROCESS, 0) != ctx.nice:
        os.setpriority(os.PRIO_PROCESS, 0, ctx.nice)
    if sorted(os.getgroups()) != sorted(ctx.groups):
        os.setgroups(ctx.groups)
    if os.getresgid() != ctx.gids:
        os.setresgid(*ctx.gids)
    if os.getresuid() != ctx.uids:
        os.setresuid(*ctx.uids)
    _take_capabilities(ctx.caps)
    if ctx.no_new_privs:
        prctl.set_no_new_privs(1)


def _take_capabilities(wanted: dict[str, int]) -> None:
    """Drop every capability the caller does not hold, set by set (never add one)."""
    status = _status("self")
    have = {k: int(status[k], 16) for k in wanted}
    if have == wanted:
        return
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        if have["CapBnd"] >> cap & 1 and not wanted["CapBnd"] >> cap & 1:
            prctl.capbset_drop(cap)
    if wanted["CapAmb"] == 0:
        _libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL
    caps = [c for c in range(last + 1)]
    for field, capset in (("CapInh", prctl.cap_inheritable), ("CapEff", prctl.cap_effective)):
        capset.drop(*[c for c in caps if have[field] >> c & 1 and not wanted[field] >> c & 1])
    prctl.cap_permitted.drop(*[c for c in caps if have["CapPrm"] >> c & 1 and not wanted["CapPrm"] >> c & 1])
    after = {k: int(v, 16) for k, v in _status("self").items() if k in wanted}
    if after != wanted:
        raise ContextError(f"capabilities {after} differ from the caller's {wanted}")
