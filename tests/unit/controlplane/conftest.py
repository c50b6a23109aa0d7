"""An API server with a fake launcher on a temporary Unix socket, one per test."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controlplane.api import create_app
from controlplane.logger import FcLogger
from controlplane.metrics import Metrics
from controlplane.mmds_store import MmdsStore
from controlplane.server import ApiServer
from controlplane.state import Vmm
from tests.support import netns
from tests.support.api_client import ApiClient
from tests.unit.controlplane.fakes import SPEC_TYPES, FakeLauncher


@dataclass
class Harness:
    client: ApiClient
    vmm: Vmm
    launcher: FakeLauncher
    metrics: Metrics
    logger: FcLogger
    tmp: Path
    exits: list[tuple[int, str]]

    @property
    def vm(self):  # the fake MicroVm started by InstanceStart
        return self.launcher.vms[-1]


def serve(app, socket_path: str) -> tuple[ApiServer, threading.Thread]:
    server = ApiServer(app, socket_path)
    thread = threading.Thread(target=server.serve, name="test-api", daemon=True)
    thread.start()
    return server, thread


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """A kernel, an initrd and two drive images that exist (contents do not matter here)."""
    paths = {}
    for name in ("vmlinux", "initrd", "rootfs", "scratch"):
        path = tmp_path / name
        path.write_bytes(b"\0" * 512)
        paths[name] = str(path)
    return paths


def make_harness(tmp_path: Path, max_payload: int = 51200, mmds_limit: int = 51200) -> Iterator[Harness]:
    launcher = FakeLauncher()
    metrics = Metrics()
    logger = FcLogger()
    exits: list[tuple[int, str]] = []
    vmm = Vmm(
        launcher,
        console_out=io.BytesIO(),
        mmds=MmdsStore(mmds_limit),
        metrics=metrics,
        logger=logger,
        on_exit=lambda code, reason: exits.append((code, reason)),
    )
    vmm.spec_types = SPEC_TYPES
    socket_path = str(tmp_path / "api.sock")
    with netns.private():  # the TAPs that PUT /network-interfaces attaches (and creates) stay in it
        server, thread = serve(create_app(vmm, max_payload), socket_path)
        client = ApiClient(socket_path)
        try:
            yield Harness(client, vmm, launcher, metrics, logger, tmp_path, exits)
        finally:
            client.close()
            server.stop()
            thread.join(timeout=10)
            vmm.close_backends()
            logger.close()
            metrics.close()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Harness]:
    yield from make_harness(tmp_path)
