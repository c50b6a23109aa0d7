"""vsock through the Firecracker API of a real `embervm` process: PUT /vsock before boot, the
vsock worker in GET /, a host connection through uds_path to the guest's echo server."""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

from devices.vsock.testing import read_line
from guest.build import GuestImages
from tests.integration.test_api_boot import Embervm, wait_connectable
from tests.integration.test_vsock_vm import recv_all
from tests.support.api_client import ApiClient, assert_no_content


def test_put_vsock_then_boot_serves_the_guest_port_on_uds_path(guest_images: GuestImages) -> None:
    workdir = tempfile.mkdtemp(prefix="vs", dir="/tmp")
    api_sock, uds = f"{workdir}/fc.sock", f"{workdir}/v.sock"
    proc = Embervm("--api-sock", api_sock)
    client = ApiClient(api_sock)
    try:
        wait_connectable(api_sock, proc)
        assert_no_content(client.put("/machine-config", json={"vcpu_count": 1, "mem_size_mib": 64}))
        boot = {"kernel_image_path": str(guest_images.elf), "boot_args": "test=vsock vsock.host_port=0"}
        assert_no_content(client.put("/boot-source", json=boot))
        assert_no_content(client.put("/vsock", json={"guest_cid": 7, "uds_path": uds}))
        assert_no_content(client.put("/actions", json={"action_type": "InstanceStart"}))
        proc.console.wait_for("vsock: listening on port 52", timeout=30)
        assert "vsock: cid 7" in proc.console.text

        workers = client.get("/embervm").json()["workers"]
        assert [w["alive"] for w in workers if w["kind"] == "vsock"] == [True]
        host = socket.socket(socket.AF_UNIX)
        host.settimeout(30)
        host.connect(uds)
        host.sendall(b"CONNECT 52\n")
        assert read_line(host).startswith(b"OK ")
        host.sendall(b"through the API")
        host.shutdown(socket.SHUT_WR)
        assert recv_all(host) == b"through the API"
        host.close()

        proc.console.wait_for("vsock: done", timeout=30)
        assert proc.wait() == 0
        assert not Path(uds).exists()
        assert "Configured vsock is validated and stored but not applied" not in proc.stderr.text
    finally:
        client.close()
        proc.close()
        shutil.rmtree(workdir, ignore_errors=True)
