"""Seccomp deny-lists for the supervisor and the zygote, and the supervisor's capabilities.

Workers get allowlists (vcpu_worker/policy.py, devices/*/policy.py): they run a fixed,
small program. The supervisor runs CPython, FastAPI and uvicorn and opens whatever files
the API names; the zygote forks every worker and creates its namespaces. Their syscalls
cannot be listed as tightly, so both get a default-allow filter that kills on the
syscalls that are weapons and that neither ever makes: debugging or reading other
processes, loading kernel code, changing the host's clock, keys, swap or reboot, and
io_uring (its operations bypass seccomp). The supervisor additionally may not create
namespaces, mount, change uids or exec. The zygote may: its children become workers that
set up their own namespaces and uid before loading their own filter; filters stack, so
the zygote's is inherited by every worker and must not deny what a worker needs before
its own filter is loaded.

Both set no_new_privs before loading (shared.confine.load_process_filter).
"""

from __future__ import annotations

import errno

import prctl

from shared.confine import LAST_CAP, ConfineError, clear_ambient_capabilities, load_process_filter
from shared.seccomp import Filter, Rule, arg_masked

# Namespace flags a clone(2) may carry (linux/sched.h).
CLONE_NEW = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}


def _deny(syscall: str, comment: str) -> Rule:
    return Rule(syscall, comment, (), "kill_process")


def _refuse(syscall: str, err: int, comment: str) -> Rule:
    return Rule(syscall, comment, (), {"errno": err})


# Denied to both: nothing in embervm makes these calls, and each is a weapon.
_WEAPONS = (
    _deny("ptrace", "debug, read or write another process"),
    _deny("process_vm_readv", "read another process's memory"),
    _deny("process_vm_writev", "write another process's memory"),
    _deny("pidfd_getfd", "take a file descriptor out of another process"),
    _deny("process_madvise", "act on another process's memory"),
    _deny("process_mrelease", "reap another process's memory"),
    _deny("move_pages", "move another process's pages"),
    _deny("migrate_pages", "move another process's pages"),
    _deny("kcmp", "compare another process's kernel objects (probing for fds)"),
    _deny("kexec_load", "replace the running kernel"),
    _deny("kexec_file_load", "replace the running kernel"),
    _deny("init_module", "load kernel code"),
    _deny("finit_module", "load kernel code"),
    _deny("delete_module", "unload kernel code"),
    _deny("bpf", "load BPF programs into the kernel"),
    _deny("perf_event_open", "observe other processes and the kernel"),
    _deny("fanotify_init", "watch the host's file accesses"),
    _deny("keyctl", "the kernel keyrings"),
    _deny("add_key", "the kernel keyrings"),
    _deny("request_key", "the kernel keyrings"),
    _deny("open_by_handle_at", "open a file by handle, past any chroot or mount namespace"),
    _deny("name_to_handle_at", "file handles (open_by_handle_at's other half)"),
    _deny("reboot", "reboot or halt the host"),
    _deny("swapon", "host swap"),
    _deny("swapoff", "host swap"),
    _deny("acct", "process accounting to a file"),
    _deny("syslog", "read or clear the kernel log buffer (the seccomp kill log reads /dev/kmsg instead)"),
    _deny("settimeofday", "set the host's clock"),
    _deny("clock_settime", "set the host's clock"),
    _deny("clock_adjtime", "adjust the host's clock"),
    _deny("adjtimex", "adjust the host's clock"),
    _deny("iopl", "raw I/O port access"),
    _deny("ioperm", "raw I/O port access"),
    _deny("userfaultfd", "stall the kernel on a page fault (a race-widening primitive); embervm does not use it"),
    _deny("personality", "turn off address-space randomization for children"),
    _refuse("io_uring_setup", errno.ENOSYS, "io_uring runs operations seccomp never sees; a library falls back"),
    _deny("io_uring_enter", "io_uring (no ring can exist: setup fails)"),
    _deny("io_uring_register", "io_uring (no ring can exist: setup fails)"),
)

# The zygote: the weapons only. It forks workers (clone without CLONE_THREAD), and creates
# their namespaces and uid (clone/unshare with CLONE_NEW*, mount, pivot_root, umount2,
# setresuid/setresgid/setgroups, chdir, prlimit64): all allowed.
ZYGOTE = Filter(_WEAPONS, default_action="allow", filter_action="kill_process")

# The supervisor after set-up: the zygote is forked, so it needs no new process, namespace,
# mount or uid of its own. Threads (uvicorn, ZeroMQ, the VM monitors) are clone with
# CLONE_THREAD; glibc's clone3 fails with ENOSYS so that the flags are visible.
_SUPERVISOR_ONLY = (
    _refuse("clone3", errno.ENOSYS, "glibc falls back to clone, whose flags this filter can check"),
    *(
        Rule("clone", f"a new {name[9:]} namespace", (arg_masked(0, bit, bit, name),), "kill_process")
        for name, bit in CLONE_NEW.items()
    ),
    _deny("unshare", "new namespaces"),
    _deny("setns", "enter another process's namespaces"),
    _deny("mount", "mounts: the supervisor's view of the host must not change"),
    _deny("umount2", "mounts"),
    _deny("pivot_root", "mounts"),
    _deny("chroot", "mounts (the jailer chroots before it execs embervm)"),
    _deny("move_mount", "the new mount API"),
    _deny("open_tree", "the new mount API"),
    _deny("fsopen", "the new mount API"),
    _deny("fsmount", "the new mount API"),
    _deny("fsconfig", "the new mount API"),
    _deny("fspick", "the new mount API"),
    _deny("mount_setattr", "the new mount API"),
    _deny("setuid", "change uid: the supervisor keeps the one it was started with"),
    _deny("setgid", "change gid"),
    _deny("setreuid", "change uid"),
    _deny("setregid", "change gid"),
    _deny("setresuid", "change uid"),
    _deny("setresgid", "change gid"),
    _deny("setgroups", "change supplementary groups"),
    _deny("setfsuid", "change the uid used for file access"),
    _deny("setfsgid", "change the gid used for file access"),
    _refuse("execve", errno.EACCES, "run another program: refused, not killed (a library probing a tool fails)"),
    _refuse("execveat", errno.EACCES, "run another program"),
)
SUPERVISOR = Filter(_WEAPONS + _SUPERVISOR_ONLY, default_action="allow", filter_action="kill_process")

# Capabilities the supervisor keeps after set-up (when started with any): what the API
# can still ask of it. Every other capability leaves even its bounding set.
SUPERVISOR_CAPABILITIES = {
    prctl.CAP_NET_ADMIN: "TUNSETIFF: attach a network interface's TAP (PUT /network-interfaces, then InstanceStart)",
    prctl.CAP_DAC_OVERRIDE: "open the kernel, drives, log and metrics files the API names, as root could before",
    prctl.CAP_DAC_READ_SEARCH: "reach those files through directories root may search",
    prctl.CAP_KILL: "SIGKILL a hung or misbehaving worker, which may run under a uid of its own",
}


# Capabilities the zygote gives up for good (bounding, permitted, effective): none has a use
# in forking workers or in building their namespaces and uid (which needs CAP_SYS_ADMIN,
# CAP_SETUID, CAP_SETGID, CAP_SETPCAP, CAP_SYS_RESOURCE and the like: kept). Workers drop
# every capability themselves (shared.confine.drop_privileges).
ZYGOTE_DROPPED_CAPABILITIES = {
    prctl.CAP_SYS_MODULE: "load kernel modules",
    prctl.CAP_SYS_RAWIO: "raw I/O, /dev/mem",
    prctl.CAP_SYS_BOOT: "reboot, kexec",
    prctl.CAP_SYS_TIME: "the host's clock",
    prctl.CAP_SYS_PTRACE: "trace any process",
    prctl.CAP_SYS_PACCT: "process accounting",
    prctl.CAP_SYSLOG: "the kernel log",
    prctl.CAP_SYS_TTY_CONFIG: "vhangup, terminals",
    prctl.CAP_MAC_ADMIN: "LSM policy",
    prctl.CAP_MAC_OVERRIDE: "LSM policy",
    prctl.CAP_AUDIT_CONTROL: "the audit system",
    prctl.CAP_AUDIT_READ: "the audit log",
    prctl.CAP_AUDIT_WRITE: "the audit log",
    prctl.CAP_BPF: "BPF programs",
    prctl.CAP_PERFMON: "perf events",
    prctl.CAP_LINUX_IMMUTABLE: "immutable files",
    prctl.CAP_WAKE_ALARM: "wake-up alarms",
    prctl.CAP_BLOCK_SUSPEND: "block system suspend",
    prctl.CAP_NET_RAW: "raw and packet sockets",
    prctl.CAP_NET_BIND_SERVICE: "privileged ports",
    prctl.CAP_NET_BROADCAST: "broadcast",
    prctl.CAP_LEASE: "file leases",
}


def drop_zygote_capabilities() -> None:
    """Give up ZYGOTE_DROPPED_CAPABILITIES (call while single-threaded). A zygote without
    capabilities (embervm not run as root, or jailed) is left as it is."""
    dropped = [cap for cap in ZYGOTE_DROPPED_CAPABILITIES if cap <= LAST_CAP]
    try:
        if prctl.cap_effective.setpcap:
            for cap in dropped:
                if prctl.capbset_read(cap):
                    prctl.capbset_drop(cap)
        clear_ambient_capabilities()
        every_set = [prctl.CAP_EFFECTIVE, prctl.CAP_PERMITTED, prctl.CAP_INHERITABLE]
        prctl.set_caps((dropped, every_set, False))
    except OSError as e:
        raise ConfineError(f"cannot drop the zygote's capabilities: {e}") from None


def drop_supervisor_capabilities(keep: dict[int, str] | None = None) -> None:
    """Keep only `keep` (SUPERVISOR_CAPABILITIES) in the permitted and effective sets and
    the bounding set; empty the inheritable and ambient sets. Call while single-threaded:
    capabilities are per thread. A process without capabilities is left as it is."""
    caps = set(SUPERVISOR_CAPABILITIES if keep is None else keep)
    try:
        if prctl.cap_effective.setpcap:  # dropping from the bounding set needs CAP_SETPCAP
            for cap in range(LAST_CAP + 1):
                if cap not in caps and prctl.capbset_read(cap):
                    prctl.capbset_drop(cap)
        clear_ambient_capabilities()
        prctl.cap_inheritable.limit()
        prctl.cap_effective.limit(*caps)
        prctl.cap_permitted.limit(*caps)
    except OSError as e:
        raise ConfineError(f"cannot drop the supervisor's capabilities: {e}") from None


def confine_supervisor(no_seccomp: bool) -> None:
    """The end of the supervisor's set-up (the zygote is forked): drop the capabilities it
    no longer needs and, unless --no-seccomp, set no_new_privs and load SUPERVISOR."""
    drop_supervisor_capabilities()
    if not no_seccomp:
        load_process_filter(SUPERVISOR)
