"""A fresh machine's first run: the kernel fetch and the e2e environment build from an empty
cache (issue: a leak that only the first download hit stayed hidden behind warm caches).

It runs in this process, with EMBERVM_CACHE pointing at an empty directory, so the suite's
`filterwarnings = error` and pytest's unraisable-exception hook turn any leaked file, pipe or
subprocess on the cold path into a failure, as they would for a new user.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.e2e import environment
from tests.support import linux_kernel

pytestmark = pytest.mark.e2e


def test_an_empty_cache_fetches_the_kernel_and_builds_the_environment(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("EMBERVM_CACHE", str(tmp_path))
    assert not any(tmp_path.iterdir())

    env = environment.prepare()

    assert env.kernel.vmlinux.is_relative_to(tmp_path) and env.kernel.vmlinux.stat().st_size > 0
    assert env.kernel.bzimage.is_relative_to(tmp_path) and env.kernel.config is not None
    for built in (env.outer_initramfs, env.inner_initramfs, env.rootfs):
        assert built.is_relative_to(environment.cache_root()) and built.stat().st_size > 0
    assert linux_kernel.cache_dir() == tmp_path / "linux"


def test_the_tools_the_environment_uses_are_installed_before_any_test_runs():
    # scripts/setup --tests installs them: no test may be skipped or fail for their absence.
    for package, command in environment.HOST_PACKAGES.items():
        assert shutil.which(command), f"{command} ({package}) is missing: scripts/setup --tests installs it"
