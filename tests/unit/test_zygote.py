"""The zygote forks workers holding exactly the fds they were given, and reports exits."""

from __future__ import annotations

import os

import pytest

from controlplane.zygote import Zygote, ZygoteError


def test_spawned_worker_runs_with_passed_fd_and_reports_exit_status(launcher):
    zygote: Zygote = launcher.zygote
    r, w = os.pipe()
    try:
        pid = zygote.spawn("test", "t", {"text": "hello", "code": 7}, [w])
        os.close(w)

        status = zygote.wait_exit(pid, timeout=10)

        assert status is not None and os.WEXITSTATUS(status) == 7
        assert os.read(r, 100) == f"hello {pid} 1".encode()  # pid 1 of its own PID namespace
    finally:
        os.close(r)


def test_unknown_worker_kind_is_refused(launcher):
    with pytest.raises(ZygoteError, match="unknown worker kind"):
        launcher.zygote.spawn("format-disk", "x", {}, [])


NAMESPACES = ("mnt", "net", "ipc", "pid")


def _namespaces(pid: int | str) -> dict[str, str]:
    return {ns: os.readlink(f"/proc/{pid}/ns/{ns}") for ns in NAMESPACES}


def test_a_worker_lives_in_namespaces_of_its_own_with_only_its_fds_and_no_stdio(launcher):
    out_r, out_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = launcher.zygote.spawn("test", "t", {"text": "held"}, [out_w, hold_r])
    os.close(out_w)
    os.close(hold_r)
    try:
        assert os.read(out_r, 100).startswith(b"held")

        ours, theirs = _namespaces("self"), _namespaces(pid)
        fds = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    finally:
        os.close(hold_w)
        launcher.zygote.wait_exit(pid, timeout=10)
        os.close(out_r)

    assert all(ours[ns] != theirs[ns] for ns in NAMESPACES), (ours, theirs)
    assert fds[0] == fds[1] == fds[2] == "/dev/null"  # nothing of embervm's own stdio
    assert len(fds) == 5 and all(target.startswith("pipe:") for fd, target in fds.items() if fd > 2)


def test_without_namespaces_a_worker_shares_the_hosts(launcher):
    r, w = os.pipe()
    pid = launcher.zygote.spawn("test", "t", {"text": "plain"}, [w], namespaces=False)
    os.close(w)
    launcher.zygote.wait_exit(pid, timeout=10)
    with os.fdopen(r, "rb") as f:
        assert f.read() == f"plain {pid} {pid}".encode()
