"""The red team: a worker taken over by a hostile guest must reach nothing but its own fds.

Every attack runs inside a real worker of a real `embervm` (tests/security/redteam_target.py:
one microVM with a vCPU, a block, a net and a vsock worker, spawned by the real zygote under
their production confinement), through the test-only attack catalog `shared.redteam`.
Each test asserts that the attack is blocked; the terminal summary lists every attack
tried and its outcome (tests/security/conftest.py). docs/security.md is the threat model
these attacks probe.

A worker killed by its seccomp filter counts as blocked: the supervisor replaces a device
worker at once, and a new `embervm` is started after the vCPU worker dies.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from guest.build import GuestImages
from shared.redteam import FORGED_METRIC, SYSCALLS
from tests.security.redteam_target import TAP, WORKERS, Host, RedTeamVmm, victim
from tests.support import netns

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
    pytest.mark.skipif(not netns.available(), reason="needs root, iproute2 and /dev/net/tun (the net worker's TAP)"),
]

KINDS = list(WORKERS)
NAMESPACES = ("mnt", "net", "ipc", "pid")
# (worker, what was tried, "blocked" or "REACHED", outcome): the terminal summary (conftest.py)
RESULTS: list[tuple[str, str, str, str]] = []
EMBERVM_LAUNCHES: list[int] = []  # embervm processes started (a new one after each vCPU worker death)


def stopped_for_the_attack(attack: str, outcome: str) -> bool:
    """A seccomp kill counts only when it is for a syscall the attack is about (or unnamed)."""
    killed = re.search(r"seccomp \(syscall \d+, (\w+)\)", outcome)
    return killed is None or killed.group(1) in SYSCALLS[attack]


def assert_stopped_for_the_attack(attack: str, outcome: str) -> None:
    assert stopped_for_the_attack(attack, outcome), f"{attack}: the filter stopped its plumbing: {outcome}"


def record(worker: str, what: str, outcome: str, blocked: bool | None = None) -> str:
    """Note an attack's outcome for the summary (`blocked` defaults to what the outcome says)."""
    verdict = outcome.startswith("blocked") if blocked is None else blocked
    RESULTS.append((worker, what, "blocked" if verdict else "REACHED", outcome))
    return outcome


@pytest.fixture(scope="module")
def vmm(guest_images: GuestImages) -> Iterator[RedTeamVmm]:
    ns = netns.NetNs(f"embervm-redteam-{os.getpid()}")
    host: Host | None = None
    target: RedTeamVmm | None = None
    try:
        ns.add_tap(TAP, "169.254.12.1/24")
        host = Host(ns)
        target = RedTeamVmm(host, ns, guest_images.elf)
        target.ensure()
        yield target
    finally:
        if target is not None:
            target.stop()
            EMBERVM_LAUNCHES.append(target.launches)
        if host is not None:
            host.close()
        ns.delete()


def other_worker(kind: str) -> str:
    """A sibling worker to attack: same zygote, same uid today."""
    return WORKERS["block"] if kind == "vcpu" else WORKERS["vcpu"]


# --- one attack, one outcome ---------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    attack: str
    target: str = ""  # what the argument names, see `argument`
    label: str = ""

    @property
    def id(self) -> str:
        return self.label or self.attack


CASES = [
    # host files
    Case("open_host_file", "secret"),
    Case("stat_host_path", "secret"),
    Case("stat_host_path_with_empty_path_flag", "secret"),
    Case("list_root"),
    # sockets: the API, other Unix sockets, new sockets
    Case("connect_api_socket", "api_socket"),
    Case("connect_unix_socket", "root_socket"),
    Case("connect_abstract_socket", "abstract_socket"),
    Case("socket_inet"),
    Case("socket_unix"),
    Case("socket_netlink"),
    # signals and other processes
    Case("kill_process", "victim"),
    Case("tgkill_process", "victim"),
    Case("kill_every_process"),
    Case("probe_pid", "victim"),
    Case("list_proc"),
    Case("ptrace_attach", "sibling"),
    Case("process_vm_readv", "sibling", "process_vm_readv_sibling"),
    Case("process_vm_readv", "supervisor", "process_vm_readv_supervisor"),
    # exec, executable memory, namespaces
    Case("execve_host_file", "not_executable"),
    Case("mmap_exec"),
    Case("mprotect_exec"),
    Case("unshare_net"),
    Case("setns_into_pid", "supervisor"),
    Case("clone_new_namespaces"),
]


def argument(case: Case, vmm: RedTeamVmm, kind: str, victim_pid: int) -> str:
    vmm.ensure()  # the pids and paths below are the running embervm's
    host = vmm.host
    values: dict[str, Callable[[], object]] = {
        "": lambda: "",
        "secret": lambda: host.secret,
        "not_executable": lambda: host.not_executable,
        "api_socket": lambda: vmm.api_sock,
        "root_socket": lambda: host.root_socket,
        "abstract_socket": lambda: host.abstract_name,
        "victim": lambda: victim_pid,
        "sibling": lambda: vmm.pid(other_worker(kind)),
        "supervisor": lambda: vmm.supervisor_pid,
    }
    return str(values[case.target]())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_attack_is_blocked(vmm: RedTeamVmm, case: Case, kind: str) -> None:
    worker = WORKERS[kind]
    with victim() as bystander:
        arg = argument(case, vmm, kind, bystander.pid)
        outcome = vmm.attack(worker, case.attack, arg)
        time.sleep(0.05 if case.target == "victim" else 0)
        bystander_alive = bystander.poll() is None
    blocked = outcome.startswith("blocked") and stopped_for_the_attack(case.attack, outcome) and bystander_alive
    record(worker, f"{case.id} {arg}".strip(), outcome, blocked)

    assert outcome.startswith("blocked"), f"{worker}: {case.id}: {outcome}"
    assert_stopped_for_the_attack(case.attack, outcome)
    assert bystander_alive, f"{worker}: {case.id} killed the victim"


# --- signals through SIGIO -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_sigio_cannot_signal_another_process(vmm: RedTeamVmm, kind: str) -> None:
    """fcntl(F_SETOWN victim) + F_SETSIG(SIGKILL) + O_ASYNC on every fd the worker holds; the
    next control message to arrive (the disarm request) makes its control socket readable."""
    worker = WORKERS[kind]
    with victim() as bystander:
        armed = vmm.attack(worker, "sigio_arm", bystander.pid)
        if not armed.startswith("blocked"):
            vmm.attack(worker, "sigio_disarm")
        time.sleep(0.2)
        survived = bystander.poll() is None
    what = "sigio: F_SETOWN victim, F_SETSIG SIGKILL, O_ASYNC, then a message arrives"
    record(
        worker,
        what,
        f"{armed}; the victim {'survived' if survived else 'WAS KILLED'}",
        survived and armed.startswith("blocked"),
    )

    assert survived, f"{worker}: SIGIO killed an unrelated process ({armed})"
    assert armed.startswith("blocked"), f"{worker}: {armed}"
    assert_stopped_for_the_attack("sigio_arm", armed)


# --- the standard fds ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_worker_cannot_read_embervms_stdin(vmm: RedTeamVmm, kind: str) -> None:
    worker = WORKERS[kind]
    vmm.ensure()
    assert vmm.proc is not None and vmm.proc.stdin is not None
    vmm.proc.stdin.write(b"typed at embervm's terminal\n")
    vmm.proc.stdin.flush()

    outcome = record(worker, "read fd 0 (embervm's stdin holds a line)", vmm.attack(worker, "read_stdin"))

    assert outcome.startswith("blocked"), f"{worker}: {outcome}"
    assert_stopped_for_the_attack("read_stdin", outcome)


def unattributed(vmm: RedTeamVmm, token: str, worker: str) -> list[str]:
    """Lines of embervm's output (console, stderr, log) holding `token` without the worker's
    name before it: lines a reader would take for the supervisor's (or the guest's) own."""
    lines = [line for text in (vmm.console.text, vmm.stderr.text, vmm.log_text()) for line in text.splitlines()]
    return [line for line in lines if token in line and worker not in line[: line.index(token)]]


@pytest.mark.parametrize("kind", KINDS)
def test_worker_output_cannot_pass_for_embervms(vmm: RedTeamVmm, kind: str) -> None:
    worker = WORKERS[kind]
    token = f"forged-stdio-{kind}-{time.monotonic_ns()}"

    sent = vmm.attack(worker, "write_stdio", token)
    time.sleep(0.3)  # a log pipe, if any, is read by the supervisor's loop
    forged = unattributed(vmm, token, worker)
    what = "write fds 1 and 2 imitating the supervisor's exit line"
    record(worker, what, f"{sent}; unattributed lines: {len(forged)}", not forged)

    assert not forged, f"{worker}: its writes appear as embervm's own output: {forged}"


# --- where the worker lives -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_worker_has_its_own_namespaces_and_uid(vmm: RedTeamVmm, kind: str) -> None:
    """Read from outside: /proc/<worker>/ns/* against the supervisor's, and the worker's uid."""
    worker = WORKERS[kind]
    vmm.ensure()
    pid, supervisor = vmm.pid(worker), vmm.supervisor_pid
    shared = [
        ns for ns in NAMESPACES if os.readlink(f"/proc/{pid}/ns/{ns}") == os.readlink(f"/proc/{supervisor}/ns/{ns}")
    ]

    def uids(p: int) -> list[str]:
        (line,) = [s for s in Path(f"/proc/{p}/status").read_text().splitlines() if s.startswith("Uid:")]
        return line.split()[1:]

    same_uid = os.geteuid() == 0 and uids(pid)[0] == uids(supervisor)[0]
    outcome = "blocked: own namespaces and uid"
    if shared or same_uid:
        outcome = f"REACHED: shares the supervisor's namespaces {shared}" + (" and its uid" if same_uid else "")
    record(worker, "namespaces (mnt, net, ipc, pid) and uid, seen from the host", outcome)

    assert not shared, f"{worker} shares the supervisor's namespaces: {shared}"
    assert not same_uid, f"{worker} runs as the supervisor's uid {uids(pid)}"


# --- hostile messages to the supervisor ----------------------------------------------------------------
def assert_supervisor_still_restarts_workers(vmm: RedTeamVmm) -> None:
    """The supervisor still watches its workers: a device worker killed from outside is replaced."""
    assert vmm.proc is not None and vmm.proc.poll() is None, "embervm exited"
    old = vmm.pid(WORKERS["block"])
    os.kill(old, 9)
    vmm.wait_replaced(WORKERS["block"], old)


@pytest.mark.parametrize("kind", KINDS)
def test_worker_log_lines_cannot_pass_for_the_supervisors(vmm: RedTeamVmm, kind: str) -> None:
    worker = WORKERS[kind]
    token = f"forged-log-{kind}-{time.monotonic_ns()}"

    sent = vmm.attack(worker, "zmq_fake_log", token)
    time.sleep(0.3)
    forged = unattributed(vmm, token, worker)
    what = "Log messages imitating the supervisor's exit line"
    record(worker, what, f"{sent}; unattributed lines: {len(forged)}", not forged)

    assert not forged, f"{worker}: a Log message produced a line that looks like the supervisor's: {forged}"
    assert_supervisor_still_restarts_workers(vmm)


def test_metrics_for_another_workers_group_are_refused(vmm: RedTeamVmm) -> None:
    """The net worker reports counters for the block device's group, then exits (a dead
    worker's last counters are kept for good)."""
    forger = WORKERS["net"]
    sent = vmm.attack(forger, "zmq_foreign_metrics", WORKERS["block"])
    assert vmm.client is not None
    scraped = text_string_to_metric_families(vmm.client.get("/metrics/prometheus").text)
    accepted = any(sample.value >= FORGED_METRIC for family in scraped for sample in family.samples)
    record(
        forger, "Metrics for block_rootfs's group", f"{sent}; {'counted' if accepted else 'not counted'}", not accepted
    )

    assert not accepted, "the supervisor counted metrics a worker sent for another worker's device"
    assert_supervisor_still_restarts_workers(vmm)


def test_update_results_the_supervisor_did_not_ask_for_are_refused(vmm: RedTeamVmm) -> None:
    """The net worker answers run-time updates in advance (request ids are sequential): the
    drive's next PATCH must not take its forged answer for the block worker's."""
    forger = WORKERS["net"]
    sent = vmm.attack(forger, "zmq_forged_update_results", 200)
    assert vmm.client is not None
    limiter = {"bandwidth": {"size": 1 << 20, "refill_time": 100}}
    answer = vmm.client.patch("/drives/rootfs", json={"drive_id": "rootfs", "rate_limiter": limiter})
    outcome = f"{sent}; PATCH /drives/rootfs answered {answer.status_code} {answer.text[:80]}"
    record(forger, "UpdateResult for request ids 1..200 sent to other workers", outcome, answer.status_code == 204)

    assert answer.status_code == 204, f"a forged UpdateResult decided the block worker's update: {answer.text}"
    assert_supervisor_still_restarts_workers(vmm)


def test_oversized_message_gets_its_worker_replaced(vmm: RedTeamVmm) -> None:
    """8 MiB, eight times the protocol's limit: libzmq must refuse it (ZMQ_MAXMSGSIZE), and
    the supervisor replace the worker that sent it."""
    worker = WORKERS["block"]
    old = vmm.pid(worker)
    sent = vmm.attack(worker, "zmq_oversized", 8)
    replaced = _replaced_within(vmm, worker, old, 5.0)
    record(worker, "an 8 MiB control message", f"{sent}; worker {'replaced' if replaced else 'kept'}", replaced)

    assert replaced, "the supervisor let a worker that sent an oversized message go on"
    assert_supervisor_still_restarts_workers(vmm)


def test_three_frame_message_leaves_the_supervisor_working(vmm: RedTeamVmm) -> None:
    """Last: on a supervisor that trusts the frame count this kills its monitor thread."""
    worker = WORKERS["vsock"]
    old = vmm.pid(worker)
    sent = vmm.attack(worker, "zmq_three_frames")
    replaced = _replaced_within(vmm, worker, old, 5.0)
    try:
        assert_supervisor_still_restarts_workers(vmm)
        alive = True
    except AssertionError:
        alive = False
    vmm.broken = vmm.broken or not alive
    outcome = (
        f"{sent}; worker {'replaced' if replaced else 'kept'}; supervisor {'works' if alive else 'STOPPED WORKING'}"
    )
    record(worker, "a 3-frame control message", outcome, alive and replaced)

    assert alive, "a 3-frame message stopped the supervisor from monitoring its workers"
    assert replaced, "the supervisor let a worker that sent a malformed message go on"


def _replaced_within(vmm: RedTeamVmm, worker: str, old_pid: int, timeout: float) -> bool:
    try:
        vmm.wait_replaced(worker, old_pid, timeout)
    except AssertionError:
        return False
    return True
