"""`embervm-jailer` for real: a microVM running jailed as a non-root uid/gid, in its chroot,
cgroup and network namespace, reached through its API socket under the chroot."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from guest.build import GuestImages
from jailer.cgroups import CgroupError, v1_mount, v2_mount
from tests.support.api_client import ApiClient, assert_no_content
from tests.support.console import ConsoleCapture

REPO = Path(__file__).resolve().parents[2]
EXEC_FILE = Path(sys.executable).parent / "embervm"
UID = GID = 12345

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the jailer needs root")


def jailer_command(*args: str) -> list[str]:
    return [sys.executable, "-c", "from jailer.cli import main; main()", *args]


@dataclass
class Jailed:
    proc: subprocess.Popen[bytes]
    chroot: Path
    console: ConsoleCapture

    def supervisor_pid(self) -> int:
        return self.proc.pid  # the jailer execs embervm in place


def _pump(stream, sink: ConsoleCapture) -> None:
    with stream:
        for chunk in iter(lambda: stream.read1(4096), b""):
            sink.write(chunk)


@contextlib.contextmanager
def jailed(base: Path, vm_id: str, *args: str) -> Iterator[Jailed]:
    command = jailer_command(
        "--id", vm_id, "--exec-file", str(EXEC_FILE), "--uid", str(UID), "--gid", str(GID),
        "--chroot-base-dir", str(base), *args, "--", "--api-sock", "/run/api.sock",
    )  # fmt: skip
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    console = ConsoleCapture()
    threading.Thread(target=_pump, args=(proc.stdout, console), daemon=True).start()
    try:
        yield Jailed(proc, base / "embervm" / vm_id / "root", console)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(path: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def boot(jail: Jailed, kernel: Path) -> ApiClient:
    """Configure and start the test guest through the API socket under the chroot."""
    wait_for(jail.chroot / "run/api.sock")
    shutil.copy(kernel, jail.chroot / "guest.elf")  # the jailed process can only see files in its chroot
    api = ApiClient(str(jail.chroot / "run/api.sock"))
    assert_no_content(api.put("/boot-source", json={"kernel_image_path": "/guest.elf", "boot_args": "test=echo"}))
    assert_no_content(api.put("/machine-config", json={"vcpu_count": 1, "mem_size_mib": 64}))
    assert_no_content(api.put("/actions", json={"action_type": "InstanceStart"}))
    return api


def status(pid: int) -> dict[str, list[str]]:
    """/proc/<pid>/status, each value split into words."""
    with open(f"/proc/{pid}/status") as f:
        return {k: v.split() for k, v in (line.split(":", 1) for line in f)}


@pytest.fixture
def netns() -> Iterator[Path]:
    name = f"embervm-jail-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield Path("/run/netns") / name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def _remove_cgroups(paths: list[Path]) -> None:
    for path in paths:
        for level in (path, path.parent):
            with contextlib.suppress(OSError):
                level.rmdir()


def cgroup_case(version: int) -> tuple[str, str, Path]:
    """(--cgroup argument, expected value, hierarchy root), or skip when this host lacks it."""
    try:
        if version == 1:
            return "pids.max=64", "64", v1_mount("pids")
        return "cgroup.max.descendants=4", "4", v2_mount()
    except CgroupError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("version", [1, 2])
def test_jailed_microvm_runs_as_uid_gid_in_its_chroot_cgroup_and_netns(
    tmp_path: Path, guest_images: GuestImages, netns: Path, version: int
) -> None:
    setting, value, hierarchy = cgroup_case(version)
    vm_id = f"jail-v{version}-{uuid.uuid4().hex[:6]}"
    cgroup = hierarchy / "embervm" / vm_id
    try:
        with jailed(tmp_path, vm_id, "--cgroup", setting, "--cgroup-version", str(version), "--netns", str(netns)) as j:
            with boot(j, guest_images.elf) as api:
                j.console.wait_for("echo ready")
                workers = api.get("/embervm").json()["workers"]
            pid = j.supervisor_pid()
            processes = [pid, *(int(w["pid"]) for w in workers)]

            for p in processes:
                assert status(p)["Uid"] == status(p)["Gid"] == [str(UID)] * 4
                assert not os.path.exists(f"/proc/{p}/root/etc/passwd")
                assert os.readlink(f"/proc/{p}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
                assert str(p) in (cgroup / ("tasks" if version == 1 else "cgroup.procs")).read_text().split()
            assert os.stat(f"/proc/{pid}/root/run/api.sock").st_ino == os.stat(j.chroot / "run/api.sock").st_ino
            assert os.readlink(f"/proc/{pid}/ns/net") == f"net:[{os.stat(netns).st_ino}]"
            for w in workers:  # each in an empty world of its own inside the jail (user namespace: not root)
                p = int(w["pid"])
                assert not os.path.exists(f"/proc/{p}/root/run/api.sock")
                assert os.readlink(f"/proc/{p}/ns/net") != f"net:[{os.stat(netns).st_ino}]"
                assert os.readlink(f"/proc/{p}/ns/user") != os.readlink(f"/proc/{pid}/ns/user")
            assert (cgroup / setting.split("=")[0]).read_text().strip() == value
            assert [int(status(p)["CapBnd"][0], 16) for p in processes] == [0] * len(processes)
            assert status(int(workers[0]["pid"]))["Seccomp"] == ["2"]
            assert_proc_shows_pids_only(pid)
    finally:
        _remove_cgroups([cgroup])


def test_daemonized_jailer_in_a_new_pid_namespace_writes_the_pid_file(tmp_path: Path) -> None:
    vm_id = f"jail-pidns-{uuid.uuid4().hex[:6]}"
    with jailed(tmp_path, vm_id, "--daemonize", "--new-pid-ns") as j:
        assert j.proc.wait(timeout=15) == 0  # the jailer's parent half exits once the pid is written
        pid_file = j.chroot / "embervm.pid"
        wait_for(pid_file)
        pid = int(pid_file.read_text())
        try:
            wait_for(j.chroot / "run/api.sock")

            assert status(pid)["NSpid"] == [str(pid), "1"]
            assert_proc_shows_pids_only(pid)
            jail_pids = {int(n) for n in os.listdir(f"/proc/{pid}/root/proc") if n.isdigit()}
            assert 1 in jail_pids and len(jail_pids) < 10  # the jail's PID namespace: embervm and its workers
            assert os.readlink(f"/proc/{pid}/fd/1") == "/dev/null"
            assert status(pid)["Uid"] == [str(UID)] * 4
        finally:
            os.kill(pid, signal.SIGKILL)


def assert_proc_shows_pids_only(pid: int) -> None:
    """The jail's /proc: per-process directories only (subset=pid), other uids hidden."""
    [line] = [ln for ln in Path(f"/proc/{pid}/mountinfo").read_text().splitlines() if ln.split()[4] == "/proc"]
    options = line.split(" - ")[1].split()[2].split(",")
    assert "subset=pid" in options and "hidepid=invisible" in options, line
    assert not os.path.exists(f"/proc/{pid}/root/proc/sys")


def run_jailer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(jailer_command(*args), cwd=REPO, capture_output=True, text=True, timeout=30, check=False)


def base_args(base: Path, vm_id: str = "bad-args") -> list[str]:
    return ["--id", vm_id, "--exec-file", str(EXEC_FILE), "--uid", str(UID), "--gid", str(GID),
            "--chroot-base-dir", str(base)]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--exec-file": "/nonexistent/embervm"}, "is not an absolute path to an executable file"),
        ({"--id": "bad/id"}, "invalid --id 'bad/id'"),
        ({"--id": "x" * 65}, "invalid --id"),
        ({"--uid": "-1"}, "invalid --uid '-1'"),
        ({"--gid": "root"}, "invalid --gid 'root'"),
        ({"--chroot-base-dir": "relative/dir"}, "must be an absolute path"),
    ],
)
def test_bad_arguments_are_refused_before_anything_changes(tmp_path: Path, change: dict[str, str], message: str):
    args = base_args(tmp_path)
    for flag, value in change.items():
        args[args.index(flag) + 1] = value

    result = run_jailer(*args)

    assert result.returncode == 1
    assert message in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_unknown_cgroup_controller_is_refused_before_anything_changes(tmp_path: Path):
    result = run_jailer(*base_args(tmp_path), "--cgroup", "nosuchctl.max=1")

    assert (result.returncode, result.stderr.strip()) == (
        1,
        "embervm-jailer: no cgroup v1 hierarchy has the 'nosuchctl' controller mounted",
    )
    assert list(tmp_path.iterdir()) == []


def test_cgroup_file_that_cannot_be_written_is_an_error(tmp_path: Path):
    _, _, hierarchy = cgroup_case(1)
    vm_id = f"jail-cg-{uuid.uuid4().hex[:6]}"
    try:
        result = run_jailer(*base_args(tmp_path, vm_id), "--cgroup", "pids.nosuchfile=1")

        assert result.returncode == 1
        assert f"cannot write '1' to {hierarchy}/embervm/{vm_id}/pids.nosuchfile: No such file" in result.stderr
    finally:
        _remove_cgroups([hierarchy / "embervm" / vm_id])


def test_existing_chroot_is_refused(tmp_path: Path):
    (tmp_path / "embervm" / "taken" / "root").mkdir(parents=True)

    result = run_jailer(*base_args(tmp_path, "taken"))

    assert result.returncode == 1
    assert f"the jail {tmp_path}/embervm/taken/root already exists" in result.stderr
