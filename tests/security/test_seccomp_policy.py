"""The default policies as data: what they allow, how they serialize, how user files are checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devices.balloon.backend import PUNCH_HOLE_MODE
from devices.balloon.policy import POLICY as BALLOON_POLICY
from devices.balloon.policy import balloon_policy
from devices.block.policy import POLICY as BLOCK_POLICY
from devices.net.policy import POLICY as NET_POLICY
from devices.net.tap import TUNSETOFFLOAD
from devices.rng.policy import POLICY as ENTROPY_POLICY
from devices.vsock.policy import POLICY as VSOCK_POLICY
from shared import kvm_abi as abi
from shared.confine import SeccompSettings, settings_for
from shared.seccomp import (
    AT_EMPTY_PATH,
    COMMON,
    F_GETFL,
    F_SETFL,
    O_ASYNC,
    Filter,
    PolicyError,
    Rule,
    compile_filter,
    filter_from_json,
    load_filter_file,
    syscall_name,
)
from vcpu_worker.policy import POLICY as VCPU_POLICY

DEFAULT_POLICIES = {
    "vcpu": VCPU_POLICY,
    "block": BLOCK_POLICY,
    "net": NET_POLICY,
    "vsock": VSOCK_POLICY,
    "balloon": BALLOON_POLICY,
    "entropy": ENTROPY_POLICY,
}
NEVER_ALLOWED = {"execve", "execveat", "fork", "vfork", "open", "openat", "openat2", "ptrace", "kill", "bpf", "mount"}
NEVER_ALLOWED |= {"bind", "listen", "socketpair", "pipe", "pipe2", "memfd_create", "unshare", "setns", "io_uring_setup"}
# Every x86-64 syscall that takes a path (seccomp cannot see the string; none may be allowed).
PATH_SYSCALLS = {
    "open", "openat", "openat2", "creat", "stat", "lstat", "statx", "access", "faccessat", "faccessat2",
    "readlink", "readlinkat", "unlink", "unlinkat", "mkdir", "mkdirat", "rmdir", "rename", "renameat",
    "renameat2", "link", "linkat", "symlink", "symlinkat", "chmod", "fchmodat", "chown", "lchown", "fchownat",
    "truncate", "utime", "utimes", "utimensat", "futimesat", "mknod", "mknodat", "chdir", "chroot", "statfs",
    "getxattr", "lgetxattr", "setxattr", "lsetxattr", "listxattr", "llistxattr", "removexattr", "lremovexattr",
    "inotify_add_watch", "fanotify_mark", "name_to_handle_at", "execve", "execveat", "mount", "umount2",
    "pivot_root", "swapon", "swapoff", "acct", "uselib", "quotactl", "newfstatat", "open_tree", "move_mount",
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(DEFAULT_POLICIES))
def test_default_policy_allows_no_exec_open_fork_or_ptrace(kind: str) -> None:
    allowed = {r.syscall for r in DEFAULT_POLICIES[kind].rules if r.action is None}

    assert not allowed & NEVER_ALLOWED


@pytest.mark.parametrize("kind", sorted(DEFAULT_POLICIES))
def test_every_rule_names_its_caller(kind: str) -> None:
    assert [r.syscall for r in DEFAULT_POLICIES[kind].rules if len(r.comment) < 10] == []


@pytest.mark.parametrize("kind", sorted(DEFAULT_POLICIES))
def test_default_policy_kills_the_process_on_a_miss(kind: str) -> None:
    assert DEFAULT_POLICIES[kind].default_action == "kill_process"


def allowed(flt: Filter, syscall: str) -> list[Rule]:
    return [r for r in flt.rules if r.syscall == syscall and r.action is None]


def conditions(rule: Rule) -> list[tuple[int, str, int | None, int]]:
    return [(c.index, c.op, c.mask, c.value) for c in rule.args]


def test_vcpu_ioctls_are_pinned_to_the_few_kvm_requests_a_running_guest_needs() -> None:
    """Running the guest, and reading (never setting) its state for a snapshot
    (vcpu_worker.vm_state: a restore sets it before the filter is loaded)."""
    ioctls = allowed(VCPU_POLICY, "ioctl")
    snapshot_reads = {
        getattr(abi, name)
        for name in (
            "KVM_GET_MSR_INDEX_LIST KVM_GET_CPUID2 KVM_GET_MSRS KVM_GET_FPU KVM_GET_XSAVE KVM_GET_XSAVE2 "
            "KVM_CHECK_EXTENSION KVM_GET_XCRS KVM_GET_DEBUGREGS KVM_GET_LAPIC KVM_GET_MP_STATE "
            "KVM_GET_VCPU_EVENTS KVM_GET_TSC_KHZ KVM_GET_IRQCHIP KVM_GET_PIT2 KVM_GET_CLOCK KVM_GET_DIRTY_LOG"
        ).split()
    }

    assert all(len(r.args) == 1 and r.args[0].index == 1 and r.args[0].op == "eq" for r in ioctls)
    assert {r.args[0].value for r in ioctls} == {
        abi.KVM_RUN,
        abi.KVM_IRQ_LINE,
        abi.KVM_GET_REGS,
        abi.KVM_GET_SREGS,
        *snapshot_reads,
    }


def test_net_worker_may_ioctl_tunsetoffload_only() -> None:
    assert [conditions(r) for r in allowed(NET_POLICY, "ioctl")] == [[(1, "eq", None, TUNSETOFFLOAD)]]


@pytest.mark.parametrize("kind", ["block", "vsock"])
def test_block_and_vsock_workers_may_not_ioctl(kind: str) -> None:
    assert "ioctl" not in DEFAULT_POLICIES[kind].syscalls()


@pytest.mark.parametrize("kind", sorted(DEFAULT_POLICIES))
def test_every_ioctl_request_is_pinned_and_labelled_with_its_name_and_number(kind: str) -> None:
    for rule in allowed(DEFAULT_POLICIES[kind], "ioctl"):
        (cond,) = rule.args
        assert (cond.index, cond.op) == (1, "eq")
        assert cond.comment.endswith(f"({cond.value:#x})") and cond.comment.split()[0].isupper()


@pytest.mark.parametrize("kind", sorted(DEFAULT_POLICIES))
def test_fcntl_is_limited_to_reading_flags_and_setting_them_without_o_async(kind: str) -> None:
    rules = allowed(DEFAULT_POLICIES[kind], "fcntl")

    assert sorted(conditions(r) for r in rules) == [
        [(1, "eq", None, F_GETFL)],
        [(1, "eq", None, F_SETFL), (2, "masked_eq", O_ASYNC, 0)],
    ]


@pytest.mark.parametrize("kind", ["block", "net"])
def test_device_workers_may_not_create_or_connect_sockets(kind: str) -> None:
    assert not DEFAULT_POLICIES[kind].syscalls() & {"socket", "connect", "socketpair", "bind", "listen"}


@pytest.mark.parametrize("kind", sorted(DEFAULT_POLICIES))
def test_no_worker_creates_a_socket_or_connects_after_set_up(kind: str) -> None:
    # Every channel is an fd the supervisor made; it connects for the vsock worker.
    assert not {r.syscall for r in DEFAULT_POLICIES[kind].rules if r.action is None} & {"socket", "connect", "bind"}


@pytest.mark.parametrize("kind", sorted(DEFAULT_POLICIES))
def test_no_path_taking_syscall_is_allowed_but_fstat_of_an_fd(kind: str) -> None:
    flt = DEFAULT_POLICIES[kind]
    paths = {r.syscall for r in flt.rules if r.action is None} & PATH_SYSCALLS

    assert paths <= {"newfstatat"}
    assert [conditions(r) for r in allowed(flt, "newfstatat")] in ([], [[(3, "eq", None, AT_EMPTY_PATH)]])
    (refused,) = [r for r in flt.rules if r.syscall == "newfstatat" and r.action is not None]
    assert refused.action == {"errno": 13} and conditions(refused) == [(3, "masked_eq", AT_EMPTY_PATH, 0)]


def test_clone3_fails_with_enosys_so_glibc_uses_clone_with_visible_flags() -> None:
    (clone3,) = [r for r in COMMON.rules if r.syscall == "clone3"]
    (clone,) = [r for r in COMMON.rules if r.syscall == "clone"]

    assert clone3.action == {"errno": 38}
    assert [(c.index, c.op, c.mask, c.value) for c in clone.args] == [(0, "masked_eq", 0x10000, 0x10000)]


def test_memory_can_never_be_made_executable() -> None:
    for name in ("mmap", "mprotect"):
        (rule,) = [r for r in COMMON.rules if r.syscall == name]
        assert [(c.index, c.mask, c.value) for c in rule.args] == [(2, 4, 0)]


@pytest.mark.parametrize("kind", sorted(DEFAULT_POLICIES))
def test_policy_survives_a_round_trip_through_firecrackers_json_format(kind: str) -> None:
    as_json = json.loads(json.dumps(DEFAULT_POLICIES[kind].to_json()))

    assert filter_from_json(as_json) == DEFAULT_POLICIES[kind]


@pytest.mark.parametrize("kind", sorted(DEFAULT_POLICIES))
def test_policy_compiles_with_libseccomp(kind: str) -> None:
    compile_filter(DEFAULT_POLICIES[kind])


def test_firecracker_style_filter_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "filters.json"
    path.write_text(
        json.dumps(
            {
                "vcpu": {
                    "default_action": "trap",
                    "filter_action": "allow",
                    "filter": [
                        {"syscall": "read"},
                        {
                            "syscall": "ioctl",
                            "comment": "KVM_RUN only",
                            "args": [{"index": 1, "type": "dword", "op": "eq", "val": 44672, "comment": "KVM_RUN"}],
                        },
                        {"syscall": "fcntl", "args": [{"index": 1, "type": "dword", "op": {"masked_eq": 3}, "val": 2}]},
                        {"syscall": "openat", "action": {"errno": 2}},
                    ],
                }
            }
        )
    )

    (flt,) = load_filter_file(path).values()

    assert flt.default_action == "trap"
    assert [r.syscall for r in flt.rules] == ["read", "ioctl", "fcntl", "openat"]
    assert flt.rules[1].args[0].value == abi.KVM_RUN
    assert (flt.rules[2].args[0].op, flt.rules[2].args[0].mask) == ("masked_eq", 3)
    assert flt.rules[3].action == {"errno": 2}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not valid JSON"),
        ("[]", "must map worker kinds"),
        ('{"vcpu": {"filter": []}}', "needs 'default_action'"),
        (
            '{"vcpu": {"default_action": "allow", "filter_action": "allow", "filter": [{"syscall": "nope"}]}}',
            "unknown syscall",
        ),
        ('{"vcpu": {"default_action": "explode", "filter_action": "allow", "filter": []}}', "unknown action"),
        (
            '{"vcpu": {"default_action": "kill", "filter_action": "allow", "filter": '
            '[{"syscall": "read", "args": [{"index": 9, "op": "eq", "val": 1}]}]}}',
            "'index' must be 0..5",
        ),
        (
            '{"vcpu": {"default_action": "kill", "filter_action": "allow", "filter": '
            '[{"syscall": "read", "args": [{"index": 0, "op": "approx", "val": 1}]}]}}',
            "unknown op",
        ),
    ],
)
def test_malformed_filter_file_is_refused_with_the_reason(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "filters.json"
    path.write_text(content)

    with pytest.raises(PolicyError, match=message):
        load_filter_file(path)


def test_missing_filter_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read seccomp filter file"):
        load_filter_file(tmp_path / "absent.json")


def test_settings_for_a_kind_the_user_file_lacks_is_refused() -> None:
    user = {"vcpu": Filter(())}

    with pytest.raises(PolicyError, match="no filter for worker kind 'block'"):
        settings_for("block", no_seccomp=False, user_filters=user)


def test_settings_travel_as_plain_values() -> None:
    user = {"vcpu": VCPU_POLICY}
    settings = settings_for("vcpu", no_seccomp=False, user_filters=user, test_hooks=True)

    assert SeccompSettings.from_args({"seccomp": json.loads(json.dumps(settings.to_arg()))}) == settings
    assert settings_for("vcpu", no_seccomp=True, user_filters=user).mode == "off"
    assert settings_for("vcpu", no_seccomp=False, user_filters=None).mode == "default"


def test_syscall_numbers_are_named() -> None:
    assert (syscall_name(59), syscall_name(41), syscall_name(257)) == ("execve", "socket", "openat")


def test_balloon_fallocate_is_pinned_to_the_memfd_and_punch_hole_mode() -> None:
    rules = [r for r in balloon_policy(17).rules if r.syscall == "fallocate"]
    assert len(rules) == 1
    conditions = {(cond.index, cond.op, cond.value) for cond in rules[0].args}
    assert conditions == {(0, "eq", 17), (1, "eq", PUNCH_HOLE_MODE)}
    assert "fallocate" not in {r.syscall for r in COMMON.rules}
    assert "fallocate" not in {r.syscall for kind, p in DEFAULT_POLICIES.items() if kind != "balloon" for r in p.rules}


def test_entropy_worker_may_getrandom_without_flags_only() -> None:
    (rule,) = [r for r in ENTROPY_POLICY.rules if r.syscall == "getrandom"]
    assert [(cond.index, cond.value) for cond in rule.args] == [(2, 0)]


@pytest.mark.parametrize(
    ("mode", "same_fd", "allowed"),
    [(PUNCH_HOLE_MODE, True, True), (0, True, False), (0x10, True, False), (PUNCH_HOLE_MODE, False, False)],
    ids=["punch-hole", "allocate", "zero-range", "other-fd"],
)
def test_balloon_filter_kills_any_other_fallocate(mode: int, same_fd: bool, allowed: bool) -> None:
    """The compiled filter, loaded in a child: only PUNCH_HOLE|KEEP_SIZE on the memfd passes."""
    import ctypes
    import os
    import signal

    from shared.confine import load_process_filter
    from shared.memory import create_guest_memfd

    memfd = create_guest_memfd(1 << 20)
    other = create_guest_memfd(1 << 20)
    libc = ctypes.CDLL(None, use_errno=True)
    fallocate = libc.fallocate
    fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            load_process_filter(balloon_policy(memfd))
            fallocate(memfd if same_fd else other, mode, 0, 4096)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    os.close(memfd)
    os.close(other)
    if allowed:
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    else:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS
