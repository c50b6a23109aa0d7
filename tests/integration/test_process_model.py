"""Firecracker's process model, with the fork server and without (the cold path).

The process an orchestrator starts is the VMM in every way it relies on: its exit status is
the guest's, its stdin/stdout are the serial console, SIGTERM/SIGINT/SIGKILL stop the
microVM, killing it leaves no microVM behind and the reverse, and the VMM runs in exactly
the context it was given (namespaces, cgroups, root, uid/gid/groups, rlimits, umask,
capabilities), checked in /proc against what the launcher asked for.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.forkserver import REAPER_NAME, SPARE_NAME
from guest.build import GuestImages
from shared import exitcodes
from tests.support.api_client import ApiClient

BIN = Path(sys.executable).parent
EMBERVM = str(BIN / "embervm")
pytestmark = pytest.mark.kvm


class Server:
    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "forkserver.sock")
        self.proc = subprocess.Popen(
            [str(BIN / "embervm-forkserver"), "--socket", self.path],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()  # "listening on ..." once preloaded
        assert "listening" in line, line

    def reapers(self) -> list[int]:
        return [pid for pid in children(self.proc.pid) if _comm(pid) == REAPER_NAME]

    def spare(self, timeout: float = 30) -> int:
        """The reaper the server forked ahead for its next request."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pid in children(self.proc.pid):
                if _comm(pid) == SPARE_NAME:
                    return pid
            time.sleep(0.02)
        raise AssertionError("the server has no spare reaper")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("forkserver"))
    yield srv
    srv.close()


@pytest.fixture(params=["cold", "fork-server"])
def mode(request: pytest.FixtureRequest, server: Server) -> Iterator[Launch]:
    launch = Launch(server if request.param == "fork-server" else None)
    yield launch
    launch.close()


class Launch:
    """How a test starts `embervm`: with `EMBERVM_FORK_SERVER` at the server, or off."""

    def __init__(self, server: Server | None) -> None:
        self.server = server
        self.started: list[subprocess.Popen[bytes]] = []

    def env(self) -> dict[str, str]:
        return {**os.environ, "EMBERVM_FORK_SERVER": self.server.path if self.server else "off"}

    def popen(self, args: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([EMBERVM, *args], env=self.env(), **kwargs)  # type: ignore[call-overload]
        self.started.append(proc)
        return proc  # type: ignore[no-any-return]

    def close(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()

    def vm_processes(self, started: int) -> list[int]:
        """Every process of the microVM: the started one and its descendants and, with a
        server, the reaper and VMM whose client is `started`."""
        pids = descendants(started)
        if self.server is not None:
            for reaper in self.server.reapers():
                pids += descendants(reaper)
        return [p for p in pids if Path(f"/proc/{p}").exists()]

    def vmm(self, started: int, timeout: float = 30) -> int:
        """The VMM's pid (on the host): the started process when cold, else the reaper's child."""
        if self.server is None:
            return started
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for reaper in self.server.reapers():
                for child in children(reaper):
                    if _ns(child, "mnt") == _ns(started, "mnt") and _ns(child, "pid") == _ns_children(started):
                        return child
            time.sleep(0.02)
        raise AssertionError("no VMM found for the client")


def children(pid: int) -> list[int]:
    try:
        return [int(c) for t in Path(f"/proc/{pid}/task").glob("*/children") for c in t.read_text().split()]
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children(current))
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _ns(pid: int, name: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{name}").st_ino


def _ns_children(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/pid_for_children").st_ino


def wait_gone(pids: list[int], timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.02)
    return [p for p in pids if _alive(p)]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def config(tmp_path: Path, kernel: Path, test: str) -> str:
    path = tmp_path / f"{test}.json"
    path.write_text(
        json.dumps(
            {
                "boot-source": {"kernel_image_path": str(kernel), "boot_args": f"console=ttyS0 test={test}"},
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
            }
        )
    )
    return str(path)


def read_until(proc: subprocess.Popen[bytes], text: bytes, timeout: float = 30) -> bytes:
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while text not in seen:
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not seen in {seen[-300:]!r}")
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            raise AssertionError(f"EOF before {text!r}: {seen[-300:]!r}")
        seen += chunk
    return seen


# --- exit status, stdin and stdout ---------------------------------------------------------------
def test_exit_status_and_stdout_are_the_guests(mode: Launch, guest_images: GuestImages, tmp_path: Path) -> None:
    proc = mode.popen(["--config-file", config(tmp_path, guest_images.elf, "boot"), "--no-api"], stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert b"embervm-guest: hello" in out and b"embervm-guest: ok" in out


def test_a_guest_crash_is_the_exit_status(mode: Launch, guest_images: GuestImages, tmp_path: Path) -> None:
    proc = mode.popen(
        ["--config-file", config(tmp_path, guest_images.elf, "triple"), "--no-api"], stdout=subprocess.DEVNULL
    )
    assert proc.wait(60) == exitcodes.GENERIC_ERROR


def test_a_configuration_error_is_the_exit_status(mode: Launch, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"boot-source": {"kernel_image_path": "/nonexistent"}}')
    proc = mode.popen(["--config-file", str(bad), "--no-api"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == exitcodes.GENERIC_ERROR, err  # Firecracker: BuildMicroVMFromJson
    assert b"kernel file cannot be opened" in err


def test_stdin_is_the_serial_console(mode: Launch, guest_images: GuestImages, tmp_path: Path) -> None:
    proc = mode.popen(
        ["--config-file", config(tmp_path, guest_images.elf, "echo"), "--no-api"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        read_until(proc, b"echo ready")
        assert proc.stdin is not None
        proc.stdin.write(b"through stdin\n")
        proc.stdin.flush()
        read_until(proc, b"echo: through stdin")
    finally:
        proc.kill()
        proc.wait()


# --- signals, and the lives of the two processes ------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_the_microvm(
    mode: Launch, guest_images: GuestImages, tmp_path: Path, sig: signal.Signals
) -> None:
    proc = mode.popen(["--config-file", config(tmp_path, guest_images.elf, "loop"), "--no-api"], stdout=subprocess.PIPE)
    read_until(proc, b"tick 1")
    vm = mode.vm_processes(proc.pid)
    assert len(vm) >= 3  # the VMM, its zygote, the vCPU worker (and with a server: client, reaper)
    proc.send_signal(sig)
    assert proc.wait(30) == 128 + sig
    assert wait_gone(vm) == []


def test_sigkill_of_the_started_process_leaves_no_microvm(
    mode: Launch, guest_images: GuestImages, tmp_path: Path
) -> None:
    proc = mode.popen(["--config-file", config(tmp_path, guest_images.elf, "loop"), "--no-api"], stdout=subprocess.PIPE)
    read_until(proc, b"tick 1")
    vm = mode.vm_processes(proc.pid)
    proc.kill()
    assert proc.wait(30) == -signal.SIGKILL
    assert wait_gone(vm) == []


def test_a_request_is_served_by_the_reaper_forked_ahead_of_it(
    server: Server, guest_images: GuestImages, tmp_path: Path
) -> None:
    """The fork off a request's path: the spare waiting before it becomes its reaper (the
    VMM's parent), and the server forks the next spare."""
    spare = server.spare()
    launch = Launch(server)
    try:
        proc = launch.popen(
            ["--config-file", config(tmp_path, guest_images.elf, "loop"), "--no-api"], stdout=subprocess.PIPE
        )
        read_until(proc, b"tick 1")
        vmm = launch.vmm(proc.pid)
        assert _comm(spare) == REAPER_NAME
        assert vmm in children(spare)
        assert server.spare() != spare
    finally:
        launch.close()


def test_a_spare_killed_while_waiting_is_replaced(server: Server, guest_images: GuestImages, tmp_path: Path) -> None:
    os.kill(server.spare(), signal.SIGKILL)
    launch = Launch(server)
    try:
        proc = launch.popen(
            ["--config-file", config(tmp_path, guest_images.elf, "echo"), "--no-api"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        read_until(proc, b"echo ready")
        assert launch.vmm(proc.pid) != proc.pid  # forked by the server, not started cold
    finally:
        launch.close()


def test_the_spare_ends_with_the_server(tmp_path: Path) -> None:
    own = Server(tmp_path)
    spare = own.spare()
    own.close()
    assert wait_gone([spare]) == []


def test_the_started_process_ends_with_the_vmm(mode: Launch, guest_images: GuestImages, tmp_path: Path) -> None:
    """The reverse: the VMM killed (as by the OOM killer) ends the started process the same way."""
    proc = mode.popen(["--config-file", config(tmp_path, guest_images.elf, "loop"), "--no-api"], stdout=subprocess.PIPE)
    read_until(proc, b"tick 1")
    vm = mode.vm_processes(proc.pid)
    os.kill(mode.vmm(proc.pid), signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    assert wait_gone(vm) == []


def test_the_api_socket_is_created_by_the_vmm(mode: Launch, tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    proc = mode.popen(["--api-sock", str(sock), "--id", "pm-api"], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        assert sock.stat().st_uid == os.getuid()
        with ApiClient(str(sock)) as api:  # serving: uvicorn has its signal handlers
            assert api.get("/").status_code == 200
        proc.terminate()
        assert proc.wait(30) == 128 + signal.SIGTERM
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_signal_as_soon_as_the_api_socket_exists_stops_the_vmm(mode: Launch, tmp_path: Path) -> None:
    """The socket may exist before the server serves (a VMM of the fork server binds it first):
    a SIGTERM sent at once still stops the microVM as one sent later does."""
    sock = tmp_path / "api.sock"
    proc = mode.popen(["--api-sock", str(sock), "--id", "pm-early"], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.001)
        proc.terminate()
        assert proc.wait(30) == 128 + signal.SIGTERM
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_api_socket_in_use_is_refused(mode: Launch, tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(path))
    other.listen(1)
    try:
        proc = mode.popen(
            ["--api-sock", str(path), "--id", "pm-in-use"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == exitcodes.GENERIC_ERROR
        assert b"already in use by another process" in err
        assert path.exists()  # the other process's socket is left alone
    finally:
        other.close()


# --- the context the VMM runs in -----------------------------------------------------------------
ASKED = {
    "rlimit_nofile": (700, 900),
    "rlimit_core": (0, 0),
    "umask": 0o027,
    "gids": (4243, 4243, 4243),
    "groups": [4242, 4245],
    "dropped_cap": 25,  # CAP_SYS_TIME, from the bounding set
}

# Runs as root: a cgroup of its own (v1 pids hierarchy and v2), new mount, UTS, IPC, network
# and pid namespaces, a root of its own (a tmpfs with the host's top-level directories bound
# in, and a marker file), rlimits, umask, gids, groups and a smaller bounding set;
# then execs `embervm` (pid 1 of its pid namespace) and reports that process's host pid.
LAUNCHER = textwrap.dedent(
    """
    import ctypes, os, resource, sys, json
    import prctl
    asked, cgroups = json.loads(sys.argv[1]), sys.argv[2].split(",")
    root, pidfile, argv = sys.argv[3], sys.argv[4], sys.argv[5:]
    libc = ctypes.CDLL(None, use_errno=True)
    def check(ret, what):
        if ret != 0:
            raise OSError(ctypes.get_errno(), what)
    for cg in cgroups:
        with open(os.path.join(cg, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    check(libc.unshare(0x00020000 | 0x04000000 | 0x08000000 | 0x40000000 | 0x20000000), "unshare")
    check(libc.mount(b"none", b"/", None, (1 << 14) | (1 << 18), None), "make / private")
    check(libc.mount(b"tmpfs", root.encode(), b"tmpfs", 0, b"mode=755"), "tmpfs root")
    for name in os.listdir("/"):
        src = "/" + name
        if os.path.isdir(src) and not os.path.islink(src):
            os.mkdir(os.path.join(root, name))
            check(libc.mount(src.encode(), os.path.join(root, name).encode(), None, 4096 | (1 << 14), None), src)
        elif os.path.islink(src):
            os.symlink(os.readlink(src), os.path.join(root, name))
    open(os.path.join(root, ".embervm-test-root"), "w").close()
    resource.setrlimit(resource.RLIMIT_NOFILE, tuple(asked["rlimit_nofile"]))
    resource.setrlimit(resource.RLIMIT_CORE, tuple(asked["rlimit_core"]))
    pid = os.fork()
    if pid:
        with open(pidfile, "w") as f:
            f.write(str(pid))
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    os.chdir(root)
    os.chroot(".")
    os.chdir("/tmp")
    os.umask(asked["umask"])
    prctl.capbset_drop(asked["dropped_cap"])
    os.setgroups(asked["groups"])
    os.setresgid(*asked["gids"])
    os.execv(argv[0], argv)
    """
)


def _status(pid: int) -> dict[str, str]:
    return {
        k: v.strip() for k, _, v in (ln.partition(":") for ln in Path(f"/proc/{pid}/status").read_text().splitlines())
    }


def _limit(pid: int, name: str) -> tuple[int, int]:
    """From /proc/<pid>/limits (prlimit on a process of other gids needs CAP_SYS_RESOURCE)."""
    row = {"RLIMIT_NOFILE": "Max open files", "RLIMIT_CORE": "Max core file size"}[name]
    line = next(ln for ln in Path(f"/proc/{pid}/limits").read_text().splitlines() if ln.startswith(row))
    soft, hard = line[len(row) :].split()[:2]
    return int(soft), int(hard)


@pytest.fixture
def test_cgroups() -> Iterator[list[str]]:
    made = []
    for base in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if not os.path.exists(f"{base}/cgroup.procs") or any(m.startswith(base + "/") for m in made):
            continue
        path = f"{base}/embervm-pm-{uuid.uuid4().hex[:8]}"
        try:
            os.mkdir(path)
        except OSError:
            continue
        made.append(path)
    if not made:
        pytest.skip("no cgroup hierarchy to make a test cgroup in")
    yield made
    for path in made:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.rmdir(path)
                break
            except OSError:
                time.sleep(0.05)


@pytest.mark.skipif(os.geteuid() != 0, reason="the launcher needs root for namespaces, cgroups and chroot")
def test_the_vmm_runs_in_the_context_it_was_given(mode: Launch, tmp_path: Path, test_cgroups: list[str]) -> None:
    root = tmp_path / "root"
    root.mkdir()
    pidfile = tmp_path / "pid"
    errors = tmp_path / "stderr"
    sock = f"{tmp_path}/ctx-api.sock"  # under /tmp, which the launcher binds into its root
    with errors.open("wb") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, json.dumps(ASKED), ",".join(test_cgroups), str(root), str(pidfile),
             EMBERVM, "--api-sock", sock, "--id", "pm-context"],
            env=mode.env(),
            stdout=subprocess.DEVNULL,
            stderr=err_file,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 90  # generous: a loaded host has taken over 30 s here
        while not (pidfile.exists() and pidfile.read_text() and os.path.exists(sock)):
            assert proc.poll() is None, errors.read_text()
            assert time.monotonic() < deadline, "embervm did not create its API socket"
            time.sleep(0.02)
        started = int(pidfile.read_text())
        try:
            vmm = mode.vmm(started, timeout=30)
        except AssertionError:
            raise AssertionError(errors.read_text()) from None
        if mode.server is not None:
            assert vmm != started and _status(vmm)["PPid"] != str(started)

        for name in ("mnt", "uts", "ipc", "net", "cgroup", "user", "time"):
            assert _ns(vmm, name) == _ns(started, name), name
        for name in ("mnt", "uts", "ipc", "net"):
            assert _ns(vmm, name) != _ns(os.getpid(), name), name
        assert _ns(vmm, "pid") == _ns(started, "pid") != _ns(os.getpid(), "pid")
        cgroups = Path(f"/proc/{vmm}/cgroup").read_text()
        assert cgroups == Path(f"/proc/{started}/cgroup").read_text()
        for path in test_cgroups:
            assert f"/{os.path.basename(path)}\n" in cgroups  # e.g. "8:pids:/embervm-pm-1234abcd"
        assert os.path.exists(f"/proc/{vmm}/root/.embervm-test-root")
        assert os.readlink(f"/proc/{vmm}/cwd") == os.readlink(f"/proc/{started}/cwd")
        status = _status(vmm)
        assert status["Uid"] == _status(started)["Uid"]  # root: the server serves its owner or root
        assert status["Gid"].split()[:3] == [str(g) for g in ASKED["gids"]]
        assert sorted(int(g) for g in status["Groups"].split()) == sorted(ASKED["groups"])
        assert int(status["Umask"], 8) == ASKED["umask"]
        assert not int(status["CapBnd"], 16) >> int(ASKED["dropped_cap"]) & 1
        assert int(status["CapBnd"], 16) & ~int(_status(started)["CapBnd"], 16) == 0  # gained nothing
        assert _limit(vmm, "RLIMIT_NOFILE") == tuple(ASKED["rlimit_nofile"])
        assert _limit(vmm, "RLIMIT_CORE") == tuple(ASKED["rlimit_core"])
        vm = mode.vm_processes(started)
        os.kill(started, signal.SIGTERM)  # the started process (the launcher only waits for it)
        assert proc.wait(30) == 128 + signal.SIGTERM
        assert wait_gone(vm) == []
    finally:
        with contextlib.suppress(ProcessLookupError, ValueError, OSError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
