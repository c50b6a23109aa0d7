"""Fixtures: a short socket directory (sun_path holds 108 bytes) and an in-process vsock rig."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator

import pytest

from devices.vsock.testing import VsockRig


@pytest.fixture
def sock_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="vs", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def rig(sock_dir: str) -> Iterator[VsockRig]:
    with VsockRig(f"{sock_dir}/v.sock") as r:
        yield r


@pytest.fixture
def host_listener(sock_dir: str) -> Iterator[socket.socket]:
    """A host process listening for guest connections to host port 53."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(f"{sock_dir}/v.sock_53")
    sock.listen(128)
    sock.settimeout(5)
    yield sock
    sock.close()
