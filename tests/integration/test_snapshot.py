"""Snapshots through the API of real `embervm` processes, with the test guest's `test=snap`:
a guest that counts in memory and does block I/O is paused, snapshotted, killed, and
restored in a new process, where it goes on counting with the same disk and memory."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest.build import GuestImages
from tests.integration.test_api_boot import Embervm, wait_connectable
from tests.support.api_client import ApiClient, assert_no_content, fault
from tests.support.waiting import wait_until

MEM_MIB = 64
COUNT = re.compile(r"snap: count (\d+) ok")


class Vm:
    """One embervm process and its API client."""

    def __init__(self, tmp_path: Path, name: str) -> None:
        self.sock = str(tmp_path / f"{name}.sock")
        self.proc = Embervm("--api-sock", self.sock)
        self.client = ApiClient(self.sock)
        wait_connectable(self.sock, self.proc)

    def counts(self) -> list[int]:
        return [int(m) for m in COUNT.findall(self.proc.console.text)]

    def wait_count_past(self, count: int, timeout: float = 20.0) -> int:
        ok = wait_until(lambda: any(c > count for c in self.counts()), timeout=timeout)
        assert ok, (
            f"no count past {count}; console:\n{self.proc.console.text[-2000:]}\n"
            f"stderr:\n{self.proc.stderr.text[-4000:]}"
        )
        return max(self.counts())

    def snapshot(self, tmp_path: Path, tag: str, kind: str = "Full") -> tuple[str, str]:
        paths = str(tmp_path / f"{tag}.state"), str(tmp_path / f"{tag}.mem")
        body = {"snapshot_type": kind, "snapshot_path": paths[0], "mem_file_path": paths[1]}
        assert_no_content(self.client.put("/snapshot/create", json=body))
        return paths

    def kill(self) -> None:
        self.client.close()
        if self.proc.proc.poll() is None:
            os.kill(self.proc.proc.pid, signal.SIGKILL)
        self.proc.close()


@pytest.fixture
def vms(tmp_path: Path) -> Iterator[list[Vm]]:
    started: list[Vm] = []
    yield started
    for vm in started:
        vm.kill()


def boot_counting_guest(tmp_path: Path, guest: GuestImages, vms: list[Vm], track_dirty: bool = False) -> Vm:
    (tmp_path / "disk.img").write_bytes(bytes(256 * 512))
    vm = Vm(tmp_path, "source")
    vms.append(vm)
    machine = {"vcpu_count": 1, "mem_size_mib": MEM_MIB, "track_dirty_pages": track_dirty}
    assert_no_content(vm.client.put("/machine-config", json=machine))
    boot = {"kernel_image_path": str(guest.elf), "boot_args": "test=snap snap.delay=20000"}
    assert_no_content(vm.client.put("/boot-source", json=boot))
    drive = {"drive_id": "disk", "path_on_host": str(tmp_path / "disk.img"), "is_root_device": False}
    assert_no_content(vm.client.put("/drives/disk", json=drive))
    assert_no_content(vm.client.put("/actions", json={"action_type": "InstanceStart"}))
    vm.wait_count_past(2)
    return vm


def load(tmp_path: Path, vms: list[Vm], name: str, state: str, mem: str, **extra: object) -> Vm:
    vm = Vm(tmp_path, name)
    vms.append(vm)
    body = {"snapshot_path": state, "mem_backend": {"backend_type": "File", "backend_path": mem}, "resume_vm": True}
    assert_no_content(vm.client.put("/snapshot/load", json={**body, **extra}))
    return vm


def test_create_is_refused_while_running(tmp_path, guest_images, vms):
    vm = boot_counting_guest(tmp_path, guest_images, vms)
    body = {"snapshot_type": "Full", "snapshot_path": str(tmp_path / "s"), "mem_file_path": str(tmp_path / "m")}

    message = fault(vm.client.put("/snapshot/create", json=body))

    assert "save/restore unavailable while running" in message
    assert not (tmp_path / "s").exists() and not (tmp_path / "m").exists()


def test_diff_is_refused_without_dirty_tracking(tmp_path, guest_images, vms):
    vm = boot_counting_guest(tmp_path, guest_images, vms)
    assert_no_content(vm.client.patch("/vm", json={"state": "Paused"}))
    body = {"snapshot_type": "Diff", "snapshot_path": str(tmp_path / "s"), "mem_file_path": str(tmp_path / "m")}

    message = fault(vm.client.put("/snapshot/create", json=body))

    assert message == "Diff snapshots are not allowed on uVMs with dirty page tracking disabled."


def test_full_snapshot_restores_in_a_new_process_and_goes_on_counting(tmp_path, guest_images, vms):
    source = boot_counting_guest(tmp_path, guest_images, vms)
    assert_no_content(source.client.patch("/vm", json={"state": "Paused"}))
    last = max(source.counts())
    state, mem = source.snapshot(tmp_path, "full")
    source.kill()

    restored = load(tmp_path, vms, "restored", state, mem)

    after = restored.wait_count_past(last + 2)
    text = restored.proc.console.text
    assert "FAIL" not in text, text
    assert min(restored.counts()) in (last, last + 1), (last, restored.counts()[:3])
    assert after > last + 2
    info = restored.client.get("/").json()
    assert info["state"] == "Running"
    config = restored.client.get("/vm/config").json()
    assert [d["drive_id"] for d in config["drives"]] == ["disk"]
    assert config["machine-config"]["mem_size_mib"] == MEM_MIB


def test_cli_describes_a_snapshot_and_prints_the_format_version(tmp_path, guest_images, vms):
    import subprocess
    import sys

    source = boot_counting_guest(tmp_path, guest_images, vms)
    assert_no_content(source.client.patch("/vm", json={"state": "Paused"}))
    state, _ = source.snapshot(tmp_path, "described")
    command = [sys.executable, "-c", "import sys; from controlplane.cli import main; main(sys.argv[1:])"]

    described = subprocess.run([*command, "--describe-snapshot", state], capture_output=True, text=True, timeout=60)
    version = subprocess.run([*command, "--snapshot-version"], capture_output=True, text=True, timeout=60)
    bad = subprocess.run([*command, "--describe-snapshot", str(tmp_path / "disk.img")], capture_output=True, timeout=60)

    assert described.returncode == 0 and described.stdout.strip() == "v1.0.0"
    assert version.returncode == 0 and version.stdout.strip() == "v1.0.0"
    assert bad.returncode != 0


def test_load_without_resume_stays_paused_until_resumed(tmp_path, guest_images, vms):
    source = boot_counting_guest(tmp_path, guest_images, vms)
    assert_no_content(source.client.patch("/vm", json={"state": "Paused"}))
    last = max(source.counts())
    state, mem = source.snapshot(tmp_path, "paused")
    source.kill()

    restored = load(tmp_path, vms, "restored", state, mem, resume_vm=False)

    assert restored.client.get("/").json()["state"] == "Paused"
    assert restored.counts() == []
    assert_no_content(restored.client.patch("/vm", json={"state": "Resumed"}))
    restored.wait_count_past(last + 1)
    assert "FAIL" not in restored.proc.console.text


def test_after_a_load_boot_resources_and_a_second_load_are_refused(tmp_path, guest_images, vms):
    source = boot_counting_guest(tmp_path, guest_images, vms)
    assert_no_content(source.client.patch("/vm", json={"state": "Paused"}))
    state, mem = source.snapshot(tmp_path, "once")
    source.kill()
    restored = load(tmp_path, vms, "restored", state, mem)

    boot = {"kernel_image_path": str(guest_images.elf)}
    assert "not supported after starting" in fault(restored.client.put("/boot-source", json=boot))
    body = {"snapshot_path": state, "mem_backend": {"backend_type": "File", "backend_path": mem}}
    assert "not supported after starting" in fault(restored.client.put("/snapshot/load", json=body))


def test_load_into_a_configured_process_is_refused(tmp_path, guest_images, vms):
    source = boot_counting_guest(tmp_path, guest_images, vms)
    assert_no_content(source.client.patch("/vm", json={"state": "Paused"}))
    state, mem = source.snapshot(tmp_path, "s")
    target = Vm(tmp_path, "configured")
    vms.append(target)
    assert_no_content(target.client.put("/machine-config", json={"vcpu_count": 1, "mem_size_mib": 32}))
    body = {"snapshot_path": state, "mem_backend": {"backend_type": "File", "backend_path": mem}}

    message = fault(target.client.put("/snapshot/load", json=body))

    assert message == "Loading a microVM snapshot not allowed after configuring boot-specific resources."


def test_source_resumes_after_a_snapshot(tmp_path, guest_images, vms):
    source = boot_counting_guest(tmp_path, guest_images, vms)
    assert_no_content(source.client.patch("/vm", json={"state": "Paused"}))
    last = max(source.counts())
    source.snapshot(tmp_path, "s")

    assert_no_content(source.client.patch("/vm", json={"state": "Resumed"}))

    source.wait_count_past(last + 1)
    assert "FAIL" not in source.proc.console.text


def test_diff_snapshots_on_a_base_restore_the_last_snapshot_byte_for_byte(tmp_path, guest_images, vms):
    """Full, then two Diffs; base + diff1 + diff2 (merged as Firecracker's rebase-snap does)
    equals a Full taken at the same point, byte for byte, and restores to a counting guest."""
    from shared.snapshot_memory import apply_diff

    source = boot_counting_guest(tmp_path, guest_images, vms, track_dirty=True)
    assert_no_content(source.client.patch("/vm", json={"state": "Paused"}))
    _, base_mem = source.snapshot(tmp_path, "base")
    diffs = []
    for i in range(2):
        last = max(source.counts())
        assert_no_content(source.client.patch("/vm", json={"state": "Resumed"}))
        source.wait_count_past(last + 1)
        assert_no_content(source.client.patch("/vm", json={"state": "Paused"}))
        diffs.append(source.snapshot(tmp_path, f"diff{i}", "Diff"))
    last = max(source.counts())
    # A Full at the same instant is the reference (it also clears the dirty log: harmless here).
    _, full_mem = source.snapshot(tmp_path, "reference")
    source.kill()
    merged = tmp_path / "merged.mem"
    shutil.copyfile(base_mem, merged)
    size = MEM_MIB << 20
    with open(merged, "r+b") as base:
        for _, diff_mem in diffs:
            with open(diff_mem, "rb") as diff:
                apply_diff(base.fileno(), diff.fileno(), size)
    diff_bytes = sum(os.stat(m).st_blocks * 512 for _, m in diffs)

    assert Path(merged).read_bytes() == Path(full_mem).read_bytes()
    assert diff_bytes < os.stat(full_mem).st_blocks * 512  # sparse: only the dirty pages
    restored = load(tmp_path, vms, "restored", diffs[-1][0], str(merged))
    restored.wait_count_past(last + 1)
    assert "FAIL" not in restored.proc.console.text


def descendants(pid: int) -> set[int]:
    """Every process under `pid` (the zygote and, while a microVM runs, its workers)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found


def crafted_state(state: str, **changes: object) -> bytes:
    """The state file with payload fields replaced, resealed with a valid checksum."""
    import msgpack

    from shared import snapshot_format as fmt

    payload = fmt.read(state).to_payload()
    payload.update(changes)
    return fmt.seal(msgpack.packb(payload, use_bin_type=True))


def test_bad_snapshots_are_refused_with_nothing_left_running(tmp_path, guest_images, vms):
    source = boot_counting_guest(tmp_path, guest_images, vms)
    assert_no_content(source.client.patch("/vm", json={"state": "Paused"}))
    last = max(source.counts())
    state, mem = source.snapshot(tmp_path, "good")
    source.kill()
    good = Path(state).read_bytes()
    (tmp_path / "truncated.state").write_bytes(good[: len(good) // 2])
    corrupted = bytearray(good)
    corrupted[len(good) // 3] ^= 0x40
    (tmp_path / "corrupted.state").write_bytes(bytes(corrupted))
    (tmp_path / "v9.state").write_bytes(good[:8] + (9).to_bytes(2, "little") + good[10:])
    (tmp_path / "short.mem").write_bytes(Path(mem).read_bytes()[: 1 << 20])
    (tmp_path / "badregs.state").write_bytes(crafted_state(state, vm_state=b"\x81\xa7version\x01"))
    target = Vm(tmp_path, "target")
    vms.append(target)
    before = descendants(target.proc.proc.pid)
    cases = [
        ("truncated.state", mem, "truncated"),
        ("corrupted.state", mem, "corrupted (checksum mismatch)"),
        ("v9.state", mem, "format version v9.0.0 is not supported"),
        ("good.state", str(tmp_path / "short.mem"), "holds 1048576 bytes"),
        ("good.state", str(tmp_path / "missing.mem"), "cannot open the memory file"),
        ("badregs.state", mem, "Load snapshot error"),
    ]
    for name, memory, says in cases:
        body = {"snapshot_path": str(tmp_path / name), "mem_backend": {"backend_type": "File", "backend_path": memory}}

        message = fault(target.client.put("/snapshot/load", json=body))

        assert says in message, (name, message)
        assert message.startswith("Load snapshot error"), message
        assert descendants(target.proc.proc.pid) == before, name
        assert target.client.get("/").json()["state"] == "Not started"
    os.rename(tmp_path / "disk.img", tmp_path / "gone.img")
    body = {"snapshot_path": state, "mem_backend": {"backend_type": "File", "backend_path": mem}, "resume_vm": True}
    message = fault(target.client.put("/snapshot/load", json=body))
    assert "disk" in message and "cannot open the backing file" in message, message
    assert descendants(target.proc.proc.pid) == before

    os.rename(tmp_path / "gone.img", tmp_path / "disk.img")
    assert_no_content(target.client.put("/snapshot/load", json=body))
    target.wait_count_past(last + 1)
    assert "FAIL" not in target.proc.console.text


def test_network_override_of_an_unknown_interface_is_refused(tmp_path, guest_images, vms):
    source = boot_counting_guest(tmp_path, guest_images, vms)
    assert_no_content(source.client.patch("/vm", json={"state": "Paused"}))
    state, mem = source.snapshot(tmp_path, "s")
    source.kill()
    target = Vm(tmp_path, "target")
    vms.append(target)
    body = {
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "network_overrides": [{"iface_id": "eth9", "host_dev_name": "tap9"}],
    }

    assert "unknown interface 'eth9'" in fault(target.client.put("/snapshot/load", json=body))


def test_a_loaded_microvm_survives_its_block_worker_being_killed(tmp_path, guest_images, vms):
    """The replacement worker restores from the state area the load seeded (and registers its
    mapping with the page server if memory is still being loaded)."""
    source = boot_counting_guest(tmp_path, guest_images, vms)
    assert_no_content(source.client.patch("/vm", json={"state": "Paused"}))
    state, mem = source.snapshot(tmp_path, "s")
    source.kill()
    restored = load(tmp_path, vms, "restored", state, mem)
    now = restored.wait_count_past(max(restored.counts(), default=0))
    workers = restored.client.get("/embervm").json()["workers"]
    victim = next(w for w in workers if w["kind"] == "block")

    os.kill(int(victim["pid"]), signal.SIGKILL)

    restored.wait_count_past(now + 3)
    assert "FAIL" not in restored.proc.console.text
    block = next(w for w in restored.client.get("/embervm").json()["workers"] if w["kind"] == "block")
    assert block["restarts"] == 1 and block["alive"]


def test_a_diff_of_a_loaded_microvm_is_against_the_loaded_snapshot(tmp_path, guest_images, vms):
    """Load with track_dirty_pages: the dirty log starts at the load, so base + a Diff taken
    after it equals a Full taken at the same instant."""
    from shared.snapshot_memory import apply_diff

    source = boot_counting_guest(tmp_path, guest_images, vms)
    assert_no_content(source.client.patch("/vm", json={"state": "Paused"}))
    state, base_mem = source.snapshot(tmp_path, "base")
    source.kill()
    restored = load(tmp_path, vms, "restored", state, base_mem, track_dirty_pages=True)
    restored.wait_count_past(max(restored.counts(), default=0) + 2)
    assert_no_content(restored.client.patch("/vm", json={"state": "Paused"}))
    _, diff_mem = restored.snapshot(tmp_path, "diff", "Diff")
    _, full_mem = restored.snapshot(tmp_path, "full")
    merged = tmp_path / "merged.mem"
    shutil.copyfile(base_mem, merged)
    with open(merged, "r+b") as base, open(diff_mem, "rb") as diff:
        apply_diff(base.fileno(), diff.fileno(), MEM_MIB << 20)

    assert merged.read_bytes() == Path(full_mem).read_bytes()


def test_uffd_backend_with_the_example_handler(tmp_path, guest_images, vms):
    """backend_type Uffd: embervm hands each worker's userfaultfd and regions to an external
    handler (Firecracker's protocol; examples/uffd_handler.py), which serves every fault."""
    import subprocess
    import sys

    source = boot_counting_guest(tmp_path, guest_images, vms)
    assert_no_content(source.client.patch("/vm", json={"state": "Paused"}))
    last = max(source.counts())
    state, mem = source.snapshot(tmp_path, "s")
    source.kill()
    handler_sock = str(tmp_path / "uffd.sock")
    handler = subprocess.Popen(
        [sys.executable, "examples/uffd_handler.py", handler_sock, mem], stdout=subprocess.PIPE, text=True
    )
    try:
        assert handler.stdout is not None and handler.stdout.readline().strip() == "uffd handler ready"
        restored = Vm(tmp_path, "restored")
        vms.append(restored)
        body = {
            "snapshot_path": state,
            "mem_backend": {"backend_type": "Uffd", "backend_path": handler_sock},
            "resume_vm": True,
        }
        assert_no_content(restored.client.put("/snapshot/load", json=body))

        restored.wait_count_past(last + 2)
        assert "FAIL" not in restored.proc.console.text
        assert_no_content(restored.client.patch("/vm", json={"state": "Paused"}))
        again = {"snapshot_type": "Full", "snapshot_path": str(tmp_path / "s2"), "mem_file_path": str(tmp_path / "m2")}
        assert "Uffd backend" in fault(restored.client.put("/snapshot/create", json=again))
    finally:
        handler.kill()
        handler.wait()
        if handler.stdout is not None:
            handler.stdout.close()


def test_uffd_backend_without_a_handler_is_refused(tmp_path, guest_images, vms):
    source = boot_counting_guest(tmp_path, guest_images, vms)
    assert_no_content(source.client.patch("/vm", json={"state": "Paused"}))
    state, _ = source.snapshot(tmp_path, "s")
    source.kill()
    target = Vm(tmp_path, "target")
    vms.append(target)
    before = descendants(target.proc.proc.pid)
    body = {"snapshot_path": state, "mem_backend": {"backend_type": "Uffd", "backend_path": str(tmp_path / "none")}}

    message = fault(target.client.put("/snapshot/load", json=body))

    assert "page-fault handler" in message, message
    assert descendants(target.proc.proc.pid) == before


def test_a_microvm_with_vsock_loads_without_waiting_for_its_kept_sockets(tmp_path, guest_images, vms):
    # A restoring vsock worker waits for the supervisor's list of kept host sockets before it
    # registers its guest memory; the supervisor must send it first (it used to wait for the
    # registration first: the worker gave up after 5 s and then dropped the list as unexpected).
    (tmp_path / "disk.img").write_bytes(bytes(256 * 512))
    source = Vm(tmp_path, "source")
    vms.append(source)
    assert_no_content(source.client.put("/machine-config", json={"vcpu_count": 1, "mem_size_mib": MEM_MIB}))
    boot = {"kernel_image_path": str(guest_images.elf), "boot_args": "test=snap snap.delay=20000"}
    assert_no_content(source.client.put("/boot-source", json=boot))
    drive = {"drive_id": "disk", "path_on_host": str(tmp_path / "disk.img"), "is_root_device": False}
    assert_no_content(source.client.put("/drives/disk", json=drive))
    uds = str(tmp_path / "v.sock")
    assert_no_content(source.client.put("/vsock", json={"guest_cid": 3, "uds_path": uds}))
    assert_no_content(source.client.put("/actions", json={"action_type": "InstanceStart"}))
    source.wait_count_past(2)
    assert_no_content(source.client.patch("/vm", json={"state": "Paused"}))
    last = max(source.counts())
    state, mem = source.snapshot(tmp_path, "vsock")
    source.kill()
    os.unlink(uds)  # as Firecracker, a load binds uds_path again

    restored = load(tmp_path, vms, "restored", state, mem)

    restored.wait_count_past(last + 2)
    assert "vsock_kept" not in restored.proc.stderr.text, restored.proc.stderr.text[-3000:]
    assert "kept sockets" not in restored.proc.stderr.text, restored.proc.stderr.text[-3000:]


def test_a_restored_uart_keeps_the_guests_interrupt_driven_input(tmp_path, guest_images, vms):
    # test=uartirq enables the received-data interrupt once and halts until IRQ 4, as Linux's
    # 8250 driver does: a restored UART back at IER 0 would take the typed line and never
    # interrupt, and the guest would wait for ever.
    source = Vm(tmp_path, "source")
    vms.append(source)
    assert_no_content(source.client.put("/machine-config", json={"vcpu_count": 1, "mem_size_mib": MEM_MIB}))
    boot = {"kernel_image_path": str(guest_images.elf), "boot_args": "test=uartirq"}
    assert_no_content(source.client.put("/boot-source", json=boot))
    assert_no_content(source.client.put("/actions", json={"action_type": "InstanceStart"}))
    assert wait_until(lambda: "uartirq: ready" in source.proc.console.text, timeout=20), source.proc.console.text
    assert_no_content(source.client.patch("/vm", json={"state": "Paused"}))
    state, mem = source.snapshot(tmp_path, "uart")
    source.kill()
    sock = str(tmp_path / "restored.sock")
    restored = Embervm("--api-sock", sock, stdin=subprocess.PIPE)
    try:
        wait_connectable(sock, restored)
        with ApiClient(sock) as client:
            body = {"snapshot_path": state, "mem_backend": {"backend_type": "File", "backend_path": mem}}
            assert_no_content(client.put("/snapshot/load", json={**body, "resume_vm": True}))
            assert restored.proc.stdin is not None
            restored.proc.stdin.write(b"hello\n")
            restored.proc.stdin.flush()
            got = wait_until(lambda: "uartirq: got hello" in restored.console.text, timeout=20)
            assert got, f"console:\n{restored.console.text}\nstderr:\n{restored.stderr.text[-3000:]}"
    finally:
        if restored.proc.stdin is not None:
            restored.proc.stdin.close()
        restored.close()
