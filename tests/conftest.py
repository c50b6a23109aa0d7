"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from guest.build import GuestImages, build_guest


@pytest.fixture(scope="session")
def guest_images() -> GuestImages:
    """The test guest, built once per run into build/guest (rebuilt only when sources change)."""
    return build_guest()


@pytest.fixture(scope="session", autouse=True)
def launcher() -> Iterator[object]:
    """One worker zygote for the session, forked at the very start, before any test starts
    threads of its own (the zygote refuses to fork from a threaded process)."""
    from controlplane.launcher import Launcher

    launcher = Launcher.start()
    yield launcher
    launcher.shutdown()


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
