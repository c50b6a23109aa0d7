"""The real thing: `embervm` as a process, booting the test guest through the Firecracker API,
and the same guest through `--config-file --no-api`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from guest.build import GuestImages
from shared import exitcodes
from tests.support.api_client import ApiClient, assert_no_content, fault
from tests.support.console import ConsoleCapture

REPO = Path(__file__).resolve().parents[2]
MEM_MIB = 64


class Embervm:
    """An embervm process whose stdout (the guest console) is captured."""

    def __init__(self, *args: str, stdin: int = subprocess.DEVNULL) -> None:
        """`stdin` is the guest's serial input (by default none: not the terminal pytest runs in)."""
        command = [sys.executable, "-c", "import sys; from controlplane.cli import main; main(sys.argv[1:])", *args]
        self.proc = subprocess.Popen(command, cwd=REPO, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.console = ConsoleCapture()
        self.stderr = ConsoleCapture()
        self.pumps = [
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
            for stream, sink in ((self.proc.stdout, self.console), (self.proc.stderr, self.stderr))
        ]
        for pump in self.pumps:
            pump.start()

    @staticmethod
    def _pump(stream, sink: ConsoleCapture) -> None:
        with stream:
            for chunk in iter(lambda: stream.read1(4096), b""):
                sink.write(chunk)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"embervm did not exit; stderr:\n{self.stderr.text}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pump in self.pumps:
            pump.join(timeout=10)


def wait_connectable(path: str, proc: Embervm, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(path)
            return
        except OSError:
            assert proc.proc.poll() is None, f"embervm exited early:\n{proc.stderr.text}"
            assert time.monotonic() < deadline, "API socket never came up"
            time.sleep(0.02)
        finally:
            probe.close()


@pytest.fixture
def embervm_api(tmp_path: Path):
    started: list[tuple[Embervm, ApiClient]] = []

    def start(*extra: str) -> tuple[Embervm, ApiClient]:
        sock = str(tmp_path / f"fc{len(started)}.sock")
        proc = Embervm("--api-sock", sock, *extra)
        wait_connectable(sock, proc)
        started.append((proc, ApiClient(sock)))
        return started[-1]

    yield start
    for proc, client in started:
        client.close()
        proc.close()


def configure(client: ApiClient, kernel: Path, boot_args: str) -> None:
    assert_no_content(client.put("/machine-config", json={"vcpu_count": 1, "mem_size_mib": MEM_MIB}))
    assert_no_content(client.put("/boot-source", json={"kernel_image_path": str(kernel), "boot_args": boot_args}))


def test_full_boot_through_the_api_exits_with_the_guest(embervm_api, guest_images: GuestImages, tmp_path: Path):
    proc, client = embervm_api("--id", "api-boot")
    configure(client, guest_images.elf, "console=ttyS0 test=boot")
    assert client.get("/").json()["state"] == "Not started"
    assert_no_content(client.put("/actions", json={"action_type": "InstanceStart"}))

    assert proc.wait() == exitcodes.OK  # the guest resets through the i8042: exit 0, as Firecracker
    assert "embervm-guest: ok" in proc.console.text
    assert "cmdline: console=ttyS0 test=boot" in proc.console.text
    assert not Path(client.socket_path).exists(), "the socket is removed on exit"
    assert "[api-boot:main] Successfully started microvm" in proc.stderr.text


def test_running_guest_pause_resume_metrics_and_post_boot_rules(embervm_api, guest_images, tmp_path: Path):
    metrics_path = tmp_path / "metrics.json"
    proc, client = embervm_api("--metrics-path", str(metrics_path))
    configure(client, guest_images.elf, "console=ttyS0 test=loop ticks_every=100000")
    assert_no_content(client.put("/actions", json={"action_type": "InstanceStart"}))
    proc.console.wait_for("tick 3")

    info = client.get("/").json()
    assert info["state"] == "Running"
    assert set(info) == {"id", "state", "vmm_version", "app_name"}  # exactly Firecracker's InstanceInfo
    workers = client.get("/embervm").json()["workers"]
    assert any(worker["name"] == "vcpu" and worker["alive"] for worker in workers)
    assert "after starting the microVM" in fault(client.put("/boot-source", json={"kernel_image_path": "/k"}))

    assert_no_content(client.patch("/vm", json={"state": "Paused"}))
    assert client.get("/").json()["state"] == "Paused"
    assert_no_content(client.patch("/vm", json={"state": "Resumed"}))
    assert client.get("/").json()["state"] == "Running"

    assert_no_content(client.put("/actions", json={"action_type": "FlushMetrics"}))
    lines = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    assert sum(line["uart"]["write_count"] for line in lines) > 0, "the guest's serial output is counted"
    assert lines[-1]["latencies_us"]["pause_vm"] > 0

    os.kill(proc.proc.pid, signal.SIGTERM)
    assert proc.wait() == 128 + signal.SIGTERM
    assert not Path(client.socket_path).exists()


def test_config_file_no_api_is_equivalent_to_the_api_boot(embervm_api, guest_images, tmp_path: Path):
    args = "console=ttyS0 test=boot marker=same"
    api_proc, client = embervm_api()
    configure(client, guest_images.elf, args)
    assert_no_content(client.put("/actions", json={"action_type": "InstanceStart"}))
    assert api_proc.wait() == exitcodes.OK

    config = {
        "boot-source": {"kernel_image_path": str(guest_images.elf), "boot_args": args},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": MEM_MIB},
    }
    config_path = tmp_path / "vm.json"
    config_path.write_text(json.dumps(config))
    no_api = Embervm("--no-api", "--config-file", str(config_path))
    try:
        assert no_api.wait() == exitcodes.OK
    finally:
        no_api.close()

    def guest_lines(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith(("cmdline:", "BIOS-e820", "embervm-guest"))]

    assert guest_lines(no_api.console.text) == guest_lines(api_proc.console.text)
    assert "embervm-guest: ok" in no_api.console.text


def test_no_api_exit_code_follows_a_guest_crash(guest_images, tmp_path: Path):
    config = {
        "boot-source": {"kernel_image_path": str(guest_images.elf), "boot_args": "test=triple"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": MEM_MIB},
    }
    config_path = tmp_path / "vm.json"
    config_path.write_text(json.dumps(config))
    proc = Embervm("--no-api", "--config-file", str(config_path))
    try:
        assert proc.wait() == exitcodes.GENERIC_ERROR
    finally:
        proc.close()
    assert "triple-faulting" in proc.console.text
