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
        assert os.read(r, 100) == f"hello {pid}".encode()
    finally:
        os.close(r)


def test_unknown_worker_kind_is_refused(launcher):
    with pytest.raises(ZygoteError, match="unknown worker kind"):
        launcher.zygote.spawn("format-disk", "x", {}, [])
