"""Boot the demo Linux on this machine's KVM through embervm's API, then clean up.

    python -m scripts.linux_demo --kernel vmlinux [--initrd initramfs] --rootfs rootfs.ext4 --boot-args ... [--check]

It makes a TAP for the guest's eth0, starts `embervm --api-sock`, configures a root drive
(a copy of the image), the NIC with MMDS V2 and a sample document, and a vsock through the
API as a Firecracker client would, and starts the instance. Interactive: embervm's stdin
and stdout are the guest's serial console (a shell). `--check` instead types the motd's
commands into the guest's shell, prints what they print, and exits 0 only if every one
succeeded and the guest rebooted cleanly. Either way, on exit (the guest's `reboot`,
SIGINT or SIGTERM) embervm is stopped and the TAP, the API socket and the work folder are
removed; `--check` verifies that nothing is left.

Runs directly on a host whose KVM runs Linux, and inside the nested environment's outer VM
otherwise (scripts/demo_vm.py decides).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

TAP_NAME = "embervm-demo0"
HOST_ADDRESS = "172.16.0.1/30"
GUEST_MAC = "06:00:ac:10:00:02"
METADATA = {
    "latest": {
        "meta-data": {
            "instance-id": "i-embervm-demo",
            "hostname": "embervm-demo",
            "message": "hello from embervm's metadata service",
        }
    }
}
# The motd's commands (scripts/demo_guest/motd), run by --check in this order; `reboot` last.
CHECK_COMMANDS = ["ip addr", "ping -c 3 172.16.0.1", "mmds /latest/meta-data/message", "cat /proc/cpuinfo"]
PROMPT = b"root@embervm-demo:"

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


def _tun_ioctl(name: str, persist: int) -> None:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
        fcntl.ioctl(fd, TUNSETPERSIST, persist)
    finally:
        os.close(fd)


def tap_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


@contextlib.contextmanager
def host_tap(name: str = TAP_NAME, address: str = HOST_ADDRESS) -> Iterator[str]:
    """A persistent TAP with the host's address, deleted again on the way out."""
    if tap_exists(name):  # left by a demo that was SIGKILLed: take it over
        _tun_ioctl(name, 0)
    _tun_ioctl(name, 1)
    try:
        subprocess.run(["ip", "addr", "add", address, "dev", name], check=True)
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        yield name
    finally:
        _tun_ioctl(name, 0)  # no longer persistent: the kernel deletes it when our fd closes


def embervm_command() -> list[str]:
    script = Path(sys.executable).parent / "embervm"
    if script.is_file():
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "from controlplane.cli import main; main()"]


@dataclass
class Guest:
    kernel: Path
    initrd: Path | None
    rootfs: Path
    boot_args: str
    mem_mib: int = 256


def api_calls(guest: Guest, work: Path, tap: str) -> list[tuple[str, object]]:
    """The requests a Firecracker client makes for this VM, in order."""
    boot: dict[str, str] = {"kernel_image_path": str(guest.kernel), "boot_args": guest.boot_args}
    if guest.initrd is not None:
        boot["initrd_path"] = str(guest.initrd)
    return [
        ("/machine-config", {"vcpu_count": 1, "mem_size_mib": guest.mem_mib}),
        ("/boot-source", boot),
        (
            "/drives/rootfs",
            {
                "drive_id": "rootfs",
                "path_on_host": str(work / "rootfs.ext4"),
                "is_root_device": True,
                "is_read_only": False,
            },
        ),
        ("/network-interfaces/eth0", {"iface_id": "eth0", "guest_mac": GUEST_MAC, "host_dev_name": tap}),
        ("/vsock", {"guest_cid": 3, "uds_path": str(work / "vsock.sock")}),
        ("/mmds/config", {"version": "V2", "network_interfaces": ["eth0"]}),
        ("/mmds", METADATA),
        ("/actions", {"action_type": "InstanceStart"}),
    ]


def configure(sock: Path, proc: subprocess.Popen[bytes], calls: list[tuple[str, object]]) -> None:
    deadline = time.monotonic() + 60
    while not sock.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"embervm exited with status {proc.returncode} before its API socket appeared")
        if time.monotonic() > deadline:
            raise RuntimeError("embervm's API socket did not appear within 60 s")
        time.sleep(0.02)
    transport = httpx.HTTPTransport(uds=str(sock))
    with httpx.Client(transport=transport, base_url="http://localhost", timeout=60) as api:
        for path, body in calls:
            r = api.put(path, json=body)
            if r.status_code != 204:
                raise RuntimeError(f"PUT {path}: {r.status_code} {r.text}")


class ConsoleReader:
    """Reads the guest's console (embervm's stdout) in --check mode, echoing it."""

    def __init__(self, stream: IO[bytes], echo: IO[bytes]) -> None:
        self.stream = stream
        self.echo = echo
        self.text = b""
        self.pos = 0

    def until(self, pattern: re.Pattern[bytes], timeout: float) -> re.Match[bytes] | None:
        """Read until `pattern` appears after what earlier calls matched; None on timeout or EOF."""
        import selectors

        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.stream, selectors.EVENT_READ)
            while (found := pattern.search(self.text, self.pos)) is None:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return None
                data = os.read(self.stream.fileno(), 65536)
                if not data:
                    return None
                self.text += data
                self.echo.write(data)
                self.echo.flush()
        self.pos = found.end()
        return found


def run_checks(proc: subprocess.Popen[bytes], timeout: float) -> list[str]:
    """Type each command into the guest's shell; the failures, as sentences."""
    assert proc.stdin is not None and proc.stdout is not None
    console = ConsoleReader(proc.stdout, sys.stdout.buffer)
    prompt = re.compile(re.escape(PROMPT))
    if console.until(prompt, timeout) is None:
        return [f"no shell prompt within {timeout:.0f} s"]
    failures: list[str] = []
    for i, command in enumerate(CHECK_COMMANDS):
        if i and console.until(prompt, timeout) is None:
            return [*failures, f"no shell prompt after {CHECK_COMMANDS[i - 1]!r}"]
        # The marker is printed by the shell, so the echoed input line never matches it.
        proc.stdin.write(f"{command}; echo DEMO-STATUS-{i} $?\n".encode())
        proc.stdin.flush()
        done = console.until(re.compile(rb"^DEMO-STATUS-%d (\d+)\r?\n" % i, re.M), timeout)
        if done is None:
            failures.append(f"{command!r} did not finish within {timeout:.0f} s")
            return failures
        if done.group(1) != b"0":
            failures.append(f"{command!r} failed with status {done.group(1).decode()}")
    console.until(prompt, timeout)
    proc.stdin.write(b"reboot\n")
    proc.stdin.flush()
    console.until(re.compile(rb"\A(?!)"), timeout)  # the rest of the console, until embervm ends
    return failures


def leftovers(work: Path, tap: str) -> list[str]:
    """What a clean exit must not leave: the TAP, this demo's embervm processes (workers are
    forked, not exec'd, so they keep embervm's command line, which names `work`), the API
    socket and the work folder, mounts."""
    found = [f"TAP {tap}"] if tap_exists(tap) else []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if str(work).encode() in cmdline.read_bytes() and int(cmdline.parent.name) != os.getpid():
                found.append(f"process {cmdline.parent.name} ({(cmdline.parent / 'comm').read_text().strip()})")
    if work.exists():
        found.append(f"folder {work}")
    mounts = Path("/proc/self/mounts").read_text()
    found += [f"mount {line.split()[1]}" for line in mounts.splitlines() if str(work) in line]
    return found


def run(guest: Guest, check: bool, timeout: float) -> int:
    # Both end the demo cleanly, even where a shell started it in the background with SIGINT ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    work = Path(tempfile.mkdtemp(prefix="embervm-demo-"))
    print(f"demo: work folder {work}", file=sys.stderr, flush=True)
    shutil.copyfile(guest.rootfs, work / "rootfs.ext4")  # the guest writes to its disk
    sock = work / "api.sock"
    status = 1
    failures: list[str] = []
    try:
        with host_tap() as tap:
            pipes = subprocess.PIPE if check else None
            command = [*embervm_command(), "--api-sock", str(sock), "--id", "demo"]
            # A cold start, never through a fork server: `leftovers` finds this demo's embervm
            # processes by their command line, which a forked VMM does not carry.
            env = {**os.environ, "EMBERVM_FORK_SERVER": "off"}
            proc = subprocess.Popen(command, stdin=pipes, stdout=pipes, cwd=work, env=env)
            try:
                configure(sock, proc, api_calls(guest, work, tap))
                if check:
                    failures = run_checks(proc, timeout)
                status = proc.wait(timeout if check else None)
            except (KeyboardInterrupt, subprocess.TimeoutExpired, RuntimeError) as exc:
                failures.append(str(exc) or type(exc).__name__)
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)  # embervm stops the VM and its workers
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                status = proc.returncode
    finally:
        shutil.rmtree(work, ignore_errors=True)
    left = leftovers(work, TAP_NAME)
    print(f"\ndemo: embervm exited with status {status}", file=sys.stderr)
    if check:
        print(f"demo: left behind: {', '.join(left) or 'nothing'}", file=sys.stderr)
        failures += [f"left behind: {what}" for what in left]
        for failure in failures:
            print(f"demo: FAILED: {failure}", file=sys.stderr)
        print(f"DEMO-CHECK {'PASS' if not failures and status == 0 else 'FAIL'}", file=sys.stderr, flush=True)
        return 0 if not failures and status == 0 else 1
    return status


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up as Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", type=Path, required=True)
    parser.add_argument("--initrd", type=Path)
    parser.add_argument("--rootfs", type=Path, required=True)
    parser.add_argument("--boot-args", required=True)
    parser.add_argument("--check", action="store_true", help="run the motd's commands, then reboot; 0 if all worked")
    parser.add_argument("--timeout", type=float, default=120, help="seconds for the shell prompt and for each command")
    args = parser.parse_args(argv)
    guest = Guest(args.kernel, args.initrd, args.rootfs, args.boot_args)
    return run(guest, args.check, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
