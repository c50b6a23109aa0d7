"""The e2e harness itself, without booting anything: archives, module order, parsing."""

from __future__ import annotations

import io
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e import nested, outer
from tests.e2e.cpio import Archive
from tests.e2e.environment import EnvironmentError_, ModuleIndex
from tests.e2e.nested import BASE_ARGS, Case, inside_job, parse_cases
from tests.e2e.outer import OuterRun, decode_status


def read_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, contents, rdev) of a newc archive, checking its framing."""
    entries, pos = {}, 0
    while True:
        assert data[pos : pos + 6] == b"070701", pos
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, size = fields[11], fields[6]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        if name == "TRAILER!!!":
            assert pos == len(data)
            return entries
        entries[name] = (fields[1], data[pos : pos + size], (fields[9], fields[10]))
        pos = (pos + size + 3) & ~3


def archive_bytes(archive: Archive) -> bytes:
    buf = io.BytesIO()
    n = archive.write(buf)
    assert n == len(buf.getvalue())
    return buf.getvalue()


def test_archive_writes_parents_first_with_files_links_and_devices(tmp_path: Path):
    host = tmp_path / "f.bin"
    host.write_bytes(b"x" * 5)
    a = Archive()
    a.file("usr/lib/data", host, 0o640)
    a.file("init", b"#!/bin/sh\n", 0o755)
    a.symlink("lib", "usr/lib")
    a.char_device("dev/console", 5, 1)

    entries = read_newc(archive_bytes(a))

    assert list(entries) == ["dev", "dev/console", "init", "lib", "usr", "usr/lib", "usr/lib/data"]
    assert entries["usr/lib/data"][:2] == (stat.S_IFREG | 0o640, b"xxxxx")
    assert entries["init"][:2] == (stat.S_IFREG | 0o755, b"#!/bin/sh\n")
    assert entries["lib"][:2] == (stat.S_IFLNK | 0o777, b"usr/lib")
    assert entries["dev/console"][0] == stat.S_IFCHR | 0o600 and entries["dev/console"][2] == (5, 1)
    assert stat.S_ISDIR(entries["usr"][0])


def test_paths_under_an_archive_symlink_land_in_its_target():
    a = Archive()
    a.symlink("lib", "usr/lib")
    a.file("lib/modules/x.ko", b"elf")

    assert "usr/lib/modules/x.ko" in a.entries and "lib/modules" not in a.entries


def test_host_paths_are_mirrored_through_their_symlinks(tmp_path: Path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "lib.so.1.2").write_bytes(b"so")
    (tmp_path / "real" / "lib.so.1").symlink_to("lib.so.1.2")
    (tmp_path / "link").symlink_to("real")
    a = Archive()

    real = a.add_host_path(tmp_path / "link" / "lib.so.1")

    base = str(tmp_path).lstrip("/")
    assert real == f"{base}/real/lib.so.1.2"
    assert stat.S_ISLNK(a.entries[f"{base}/link"].mode) and a.entries[f"{base}/link"].data == b"real"
    assert a.entries[f"{base}/real/lib.so.1"].data == b"lib.so.1.2"
    assert read_newc(archive_bytes(a))[real][1] == b"so"


def test_digest_changes_with_contents_and_metadata(tmp_path: Path):
    host = tmp_path / "f"
    host.write_bytes(b"one")
    a = Archive()
    a.file("f", host)
    a.file("g", b"inline")
    first = a.digest()
    host.write_bytes(b"three")
    second = a.digest()
    a.file("g", b"changed")

    assert len({first, second, a.digest()}) == 3


def test_busybox_cpio_reads_the_archive(tmp_path: Path):
    a = Archive()
    a.file("etc/hello", b"hello\n")
    a.symlink("etc/link", "hello")
    listing = subprocess.run(["busybox", "cpio", "-t"], input=archive_bytes(a), capture_output=True, check=True)

    assert listing.stdout.decode().split() == ["etc", "etc/hello", "etc/link"]


def test_module_load_order_puts_dependencies_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    deps = {"kvm_amd": ["kvm"], "kvm": ["irqbypass"], "irqbypass": [], "virtio_net": ["virtio", "failover"],
            "failover": [], "virtio": []}  # fmt: skip
    for name in deps:
        (tmp_path / f"{name.replace('_', '-')}.ko").write_bytes(b"")
    monkeypatch.setattr(ModuleIndex, "depends", lambda self, name: deps[name])
    index = ModuleIndex(tmp_path)
    order = index.load_order(["kvm-amd", "virtio_net"])

    assert order == ["irqbypass", "kvm", "kvm_amd", "virtio", "failover", "virtio_net"]
    with pytest.raises(EnvironmentError_, match="no module nope"):
        index.load_order(["nope"])


def test_isa_debug_exit_status_is_decoded_and_the_console_is_the_fallback():
    assert decode_status((3 << 1) | 1, "") == 3
    assert decode_status(1, "E2E-OUTER-EXIT 0\n") == 0
    assert decode_status(1, "qemu-system-x86_64: bad option") is None  # QEMU's own failure
    assert decode_status(0, "E2E-OUTER-EXIT 7\n") == 7  # powered off instead
    assert decode_status(124, "") is None  # timeout(1)
    assert decode_status(137, "E2E-OUTER-EXIT 2\n") == 2


def test_an_outer_vm_silent_on_console_and_heartbeat_for_the_stall_time_is_ended_as_stalled(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setattr(outer, "STALL_S", 1.5)
    proc = subprocess.Popen(["sh", "-c", "echo beat >alive; exec sleep 60"], cwd=tmp_path)
    start = time.monotonic()

    status, ended, silent_s = outer._wait(proc, start + 60, [start], tmp_path / "alive")

    assert ended and status != 0 and silent_s is not None and silent_s > 1.5
    assert time.monotonic() - start < 10


def test_an_outer_vm_whose_heartbeat_goes_on_runs_to_its_deadline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(outer, "STALL_S", 1.5)
    proc = subprocess.Popen(["sh", "-c", "while :; do echo beat >>alive; sleep 0.3; done"], cwd=tmp_path)
    start = time.monotonic()

    status, ended, silent_s = outer._wait(proc, start + 4, [start], tmp_path / "alive")

    assert (ended, silent_s) == (True, None) and status != 0
    assert time.monotonic() - start > 4


def run_of(console: str, job_status: int | None, timed_out: bool, silent_s: float | None = None) -> OuterRun:
    return OuterRun(0, job_status, console, Path("log"), 1.0, timed_out, silent_s, "E2E-OUTER-ALIVE uptime=68.10")


def test_only_a_stalled_outer_vm_is_run_once_more(monkeypatch: pytest.MonkeyPatch):
    stalled = run_of("E2E-OUTER-READY\n", None, True, silent_s=241)
    stuck = run_of("E2E-OUTER-STUCK the job ran out of time at uptime=870\nE2E-OUTER-EXIT 137\n", 137, False)
    fine = run_of("E2E-OUTER-EXIT 0\n", 0, False)
    cases = (([stalled, fine], 2, fine), ([stuck, fine], 1, stuck), ([stalled, stalled], 2, stalled))
    for runs, calls, result in cases:
        queue = list(runs)
        monkeypatch.setattr(outer, "run_outer", lambda *a, queue=queue, **k: queue.pop(0))
        monkeypatch.setattr(outer, "STALLS", [])

        assert outer.run_outer_retrying_a_stall("job", 10) is result
        assert len(runs) - len(queue) == calls
        assert len(outer.STALLS) == calls - 1
    assert "stalled: silent for 241 s" in stalled.describe() and "uptime=68.10" in stalled.describe()
    assert "E2E-OUTER-STUCK" in stuck.describe() and not stuck.stalled


def test_after_a_stall_only_the_cases_that_had_not_ended_run_again(monkeypatch: pytest.MonkeyPatch):
    """A stall during case b keeps a's result from the first outer VM and runs b (not a) in a
    second one; the summary counts the stall."""
    first = run_of(
        "E2E-CASE-BEGIN a\nE2E-CASE-END a status=0 timed_out=0 init_s=1.0 total_s=2.0\nE2E-CASE-BEGIN b\n",
        None,
        True,
        silent_s=241,
    )
    second = run_of(
        "E2E-CASE-BEGIN b\nE2E-CASE-END b status=0 timed_out=0 init_s=1.0 total_s=2.0\nE2E-OUTER-EXIT 0\n", 0, False
    )
    queue, jobs = [first, second], []

    def fake_run_outer(job: str, *_: object, **__: object) -> outer.OuterRun:
        jobs.append(job)
        return queue.pop(0)

    monkeypatch.setattr(outer, "run_outer", fake_run_outer)
    monkeypatch.setattr(outer, "STALLS", [])
    cases = [Case("a", kernel="vmlinux"), Case("b", kernel="vmlinux")]

    run = nested.run_cases(cases, env=object())  # type: ignore[arg-type]

    assert len(jobs) == 2 and '"name": "a"' in jobs[0] and '"name": "b"' in jobs[0]
    assert '"name": "a"' not in jobs[1] and '"name": "b"' in jobs[1]
    assert run.outer is second and (run["a"].status, run["b"].status) == (0, 0)
    assert len(outer.STALLS) == 1 and "1 of 2 cases run again" in outer.STALLS[0]


SAMPLE = """noise
E2E-CASE-BEGIN a
E2E-INIT uptime=3.10
E2E-INFO kernel 6.1.0-test
E2E-INFO cmdline console=ttyS0 e2e.checks=boot,cpus:0-1
E2E-CHECK boot PASS kernel=6.1.0-test
E2E-CHECK cpus FAIL online=0 expected=0-1
E2E-DONE failures=1
--- embervm log ---
guest requested reset via the i8042
E2E-SECCOMP embervm-vcpu mode=2 filters=1
E2E-SECCOMP embervm-zygote mode=0 filters=0
E2E-AFTER written by the guest
E2E-AFTER status=0
E2E-CASE-END a status=0 timed_out=0 init_s=9.500 total_s=12.000
E2E-CASE-BEGIN b
[ 1.0] Kernel panic
E2E-CASE-END b status=1 timed_out=1 init_s=-1.000 total_s=150.000
E2E-CASE-BEGIN c
E2E-INIT uptime=2
"""


def test_case_consoles_are_parsed_into_results():
    results = parse_cases(SAMPLE)

    a, b, c = results["a"], results["b"], results["c"]
    assert (a.status, a.timed_out, a.init_s, a.total_s, a.failures) == (0, False, 9.5, 12.0, 1)
    assert a.checks == {"boot": (True, "kernel=6.1.0-test"), "cpus": (False, "online=0 expected=0-1")}
    assert a.info == {"kernel": "6.1.0-test", "cmdline": "console=ttyS0 e2e.checks=boot,cpus:0-1"}
    assert a.reached_init and "guest requested reset" in a.console
    assert a.seccomp == {"embervm-vcpu": 2, "embervm-zygote": 0}
    assert (a.before, a.after) == ([], ["written by the guest", "status=0"])
    assert (b.status, b.timed_out, b.init_s, b.reached_init, b.failures) == (1, True, None, False, None)
    assert (c.status, c.reached_init) == (None, True)  # the outer VM died mid-case


def test_case_command_line_and_job_quoting():
    case = Case("x", checks=["boot", "cpus:0-1"], extra_args="it's=odd")

    assert case.boot_args == f"{BASE_ARGS} e2e.checks=boot,cpus:0-1 it's=odd"
    command = inside_job([case]).split("exec ", 1)[1].replace('"$E2E_PYTHON" -m tests.e2e.inside', "printf %s")
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout

    assert out.startswith("cases[") and "it's=odd" in out
