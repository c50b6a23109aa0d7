"""Runs inside the outer VM: boots inner guests with embervm and frames their consoles.

    python -m tests.e2e.inside cases '<json list of cases>'

For each case it copies the files the case names into /tmp/e2e-<name>/ (e.g. a disk
image the guest writes to), writes a Firecracker config file there, runs the case's
`before` shell script, `embervm --config-file vm.json --no-api` under a timeout (cwd: that
folder, so relative paths in the config point there) -- or, for an `api` case,
`embervm --api-sock` configured section by section through the API and started with
InstanceStart -- and its `after` script, and prints

    E2E-CASE-BEGIN <name>
    E2E-BEFORE <line>                       (the before script's output, then status=<n>)
    E2E-API PUT <path> <status>             (api cases: each request)
    <the inner guest's console, then embervm's log>
    E2E-SECCOMP <process> mode=<n> filters=<k>   (each embervm process seen while it ran)
    E2E-AFTER <line>                        (the after script's output, then status=<n>)
    E2E-CASE-END <name> status=<embervm's exit status> init_s=<launch → E2E-INIT> total_s=<launch → exit>

`tests.e2e.nested` builds the cases on the host and parses this back.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GUEST = Path("/e2e/guest")
INIT_MARK = b"E2E-INIT "


def embervm_command() -> list[str]:
    script = Path(sys.prefix) / "bin" / "embervm"
    if script.is_file():
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "from controlplane.cli import main; main()"]


def config_for(case: dict[str, Any], workdir: Path) -> Path:
    config: dict[str, Any] = {
        "boot-source": {
            "kernel_image_path": str(GUEST / case.get("kernel", "vmlinux")),
            "boot_args": case["boot_args"],
        },
        "machine-config": {"vcpu_count": case.get("vcpus", 1), "mem_size_mib": case.get("mem_mib", 256)},
    }
    if case.get("initrd", True):
        config["boot-source"]["initrd_path"] = str(GUEST / "initramfs")
    config.update(case.get("config", {}))  # drives, network-interfaces, vsock, mmds-config...
    path = workdir / "vm.json"
    path.write_text(json.dumps(config, indent=1))
    return path


def shell(tag: str, script: str, workdir: Path) -> None:
    """Run a case's before/after script in the outer VM; its output, framed, goes to the console."""
    if not script:
        return
    proc = subprocess.run(["sh", "-c", script], cwd=workdir, capture_output=True, text=True, timeout=60)
    lines = [*(proc.stdout + proc.stderr).splitlines(), f"status={proc.returncode}"]
    sys.stdout.write("".join(f"{tag} {line}\n" for line in lines))
    sys.stdout.flush()


def sample_seccomp(seen: dict[str, tuple[int, str]]) -> None:
    """Record the seccomp mode of every embervm process (by name, the highest mode seen)."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        name = fields.get("Name", "").strip()
        if name.startswith("embervm"):
            mode = int(fields.get("Seccomp", "0").strip() or 0)
            if name not in seen or mode > seen[name][0]:
                seen[name] = (mode, fields.get("Seccomp_filters", "?").strip())


def api_requests(config: dict[str, Any], metadata: Any) -> list[tuple[str, Any]]:
    """The API calls that configure what `config` (a config file's sections) describes."""
    calls: list[tuple[str, Any]] = [("/machine-config", config["machine-config"])]
    calls.append(("/boot-source", config["boot-source"]))
    calls += [(f"/drives/{d['drive_id']}", d) for d in config.get("drives", [])]
    calls += [(f"/network-interfaces/{n['iface_id']}", n) for n in config.get("network-interfaces", [])]
    if "vsock" in config:
        calls.append(("/vsock", config["vsock"]))
    for section in ("entropy", "balloon", "metrics"):
        if section in config:
            calls.append((f"/{section}", config[section]))
    if "mmds-config" in config:
        calls.append(("/mmds/config", config["mmds-config"]))
    if "restart-policy" in config:
        calls.append(("/restart-policy", config["restart-policy"]))
    if metadata is not None:
        calls.append(("/mmds", metadata))
    return [*calls, ("/actions", {"action_type": "InstanceStart"})]


def drive_api(sock: Path, proc: subprocess.Popen[bytes], calls: list[tuple[str, Any]]) -> bool:
    """Wait for the API socket, then PUT each call; prints "E2E-API PUT <path> <status>"."""
    from tests.support.api_client import ApiClient

    deadline = time.monotonic() + 60
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            print("E2E-API socket never appeared", flush=True)
            return False
        time.sleep(0.05)
    with ApiClient(str(sock), timeout=60) as api:
        for path, body in calls:
            r = api.put(path, json=body)
            print(f"E2E-API PUT {path} {r.status_code}" + (f" {r.text}" if r.status_code != 204 else ""), flush=True)
            if r.status_code != 204:
                return False
    return True


def run_case(case: dict[str, Any]) -> int:
    name = case["name"]
    workdir = Path("/tmp") / f"e2e-{name}"
    workdir.mkdir(parents=True, exist_ok=True)
    for dest, src in case.get("copy", {}).items():  # e.g. a disk image the guest may write to
        shutil.copyfile(src, workdir / dest)
    config_path = config_for(case, workdir)
    metadata = case.get("metadata")
    sock = workdir / "api.sock"
    if case.get("api"):
        sock.unlink(missing_ok=True)
        command = [*embervm_command(), "--api-sock", str(sock), "--id", name]
    else:
        command = [*embervm_command(), "--no-api", "--config-file", str(config_path)]
        if metadata is not None:
            (workdir / "metadata.json").write_text(json.dumps(metadata))
            command += ["--metadata", "metadata.json"]
    command += case.get("args", [])
    out = sys.stdout.buffer
    out.write(f"E2E-CASE-BEGIN {name}\n".encode())
    out.flush()
    shell("E2E-BEFORE", case.get("before", ""), workdir)
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir)
    assert proc.stdout is not None and proc.stderr is not None
    if case.get("api") and not drive_api(sock, proc, api_requests(json.loads(config_path.read_text()), metadata)):
        proc.kill()
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    sel.register(proc.stderr, selectors.EVENT_READ)
    seen, log, init_s = b"", b"", -1.0
    deadline = start + case.get("timeout", 120)
    open_streams = 2
    confinement: dict[str, tuple[int, str]] = {}
    while open_streams and time.monotonic() < deadline:
        sample_seccomp(confinement)
        for key, _ in sel.select(timeout=min(0.5, max(0.0, deadline - time.monotonic()))):
            data = os.read(key.fd, 65536)
            if not data:
                sel.unregister(key.fileobj)
                open_streams -= 1
                continue
            if key.fileobj is proc.stderr:
                log += data
                continue
            if init_s < 0 and INIT_MARK in seen[-64:] + data:
                init_s = time.monotonic() - start
            seen = (seen + data)[-256:]
            out.write(data)
            out.flush()
    timed_out = open_streams > 0
    if timed_out:
        proc.kill()
    status = proc.wait()
    total_s = time.monotonic() - start
    if log:
        out.write(b"\n--- embervm log ---\n" + log)
    for process, (mode, filters) in sorted(confinement.items()):
        out.write(f"E2E-SECCOMP {process} mode={mode} filters={filters}\n".encode())
    shell("E2E-AFTER", case.get("after", ""), workdir)
    end = f"status={status} timed_out={int(timed_out)} init_s={init_s:.3f} total_s={total_s:.3f}"
    out.write(f"\nE2E-CASE-END {name} {end}\n".encode())
    out.flush()
    return status


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "cases":
        print(__doc__, file=sys.stderr)
        return 2
    failures = sum(run_case(case) != 0 for case in json.loads(argv[1]))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
