"""Guest-driven I/O one level down: the same Linux guest programs on embervm and QEMU microvm.

    .venv/bin/python bench/guest_io.py [--runs 2] [--only net] [--verbose]

Boots the nested-KVM outer VM of tests/e2e once, with QEMU (and the vhost-vsock modules)
added to it, and there boots Debian's cloud kernel with the e2e inner initramfs `--runs`
times each way, interleaved: embervm (`--config-file --no-api`) and `qemu-system-x86_64 -M
microvm` (virtio-mmio devices, vhost off for net; QEMU has only vhost-vsock), same kernel,
initramfs, command line, memory (256 MiB), one vCPU, a 64 MiB scratch disk (a file in the
outer VM's tmpfs) and one TAP with the outer VM's end at 172.16.0.1. QEMU's virtio-mmio is
made modern (`force-legacy=false`; its default is the legacy version 1 transport, without
VERSION_1), as embervm's is.

The guest programs are the `gio_*` checks of tests/e2e/guest/inner_init.sh (busybox dd, nc,
wget, ping; `vsock-e2e send/sink`); the outer ends are tests/e2e/guest/io_peer.py:

| test | guest program |
|---|---|
| blk_seq_read / blk_seq_write | dd 128 KiB blocks, O_DIRECT (32 / 16 MiB) |
| blk_4k_read / blk_4k_write | dd 4 KiB blocks, O_DIRECT, one at a time (512 each, consecutive offsets) |
| tcp_tx | `dd if=/dev/zero | nc` to a sink in the outer VM (guest → host) |
| tcp_rx | `wget -O /dev/null` from an HTTP source in the outer VM (host → guest) |
| ping | `ping -A -c 20` the TAP's address (the next request as soon as the reply is in) |
| vsock_tx / vsock_rx | `vsock-e2e send` to the host / `vsock-e2e sink` fed by the host |

Each program runs between console markers; the guest reports its wall time, the virtio
interrupts it took (/proc/interrupts) and eth0's frame counters, and the outer side reads
the outer KVM's exit counters (debugfs) at each marker. Printed per test: the ratio
embervm ÷ QEMU of throughput (of 1/rtt for ping; higher is better), median over the runs,
with interrupts and VM exits (all / MMIO) per MiB on each side, and for TCP the average
size of eth0's frames (sent for tcp_tx, received for tcp_rx; a TSO/GSO frame counts once). The absolute figures
are those of a guest one level down under an emulator (shown with --verbose): only the
ratios mean anything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GUEST = Path("/e2e/guest")
WORK = Path("/tmp/gio")
TAP, HOST_IP, GUEST_IP = "gio0", "172.16.0.1", "172.16.0.2"
TCP_SINK_PORT, HTTP_PORT, VSOCK_TX_PORT, VSOCK_RX_PORT = 5001, 5002, 5003, 5004
GUEST_MAC = "06:00:ac:10:00:02"
DISK_MIB = 64
RESULT_MARK = "GIO-BENCH "
KVM_STATS = ("exits", "mmio_exits", "io_exits", "irq_injections", "halt_exits")
MODULES_DIR = "e2e/bench-modules"
TESTS = {  # name -> (group, unit)
    "blk_seq_read": ("blk", "MiB/s"),
    "blk_seq_write": ("blk", "MiB/s"),
    "blk_4k_read": ("blk", "IOPS"),
    "blk_4k_write": ("blk", "IOPS"),
    "tcp_tx": ("net", "MiB/s"),
    "tcp_rx": ("net", "MiB/s"),
    "ping": ("net", "ms rtt"),
    "vsock_tx": ("vsock", "MiB/s"),
    "vsock_rx": ("vsock", "MiB/s"),
}


def checks(args: argparse.Namespace) -> list[str]:
    """The inner /init's checks for the chosen groups (and, with --tests, only those tests)."""
    peer, wanted = HOST_IP, args.tests

    def pick(test: str, check: str) -> list[str]:
        return [check] if not wanted or test in wanted else []

    out = []
    if "blk" in args.groups and (not wanted or wanted & {t for t, (g, _) in TESTS.items() if g == "blk"}):
        out.append("gio_blk:vda")
    if "net" in args.groups:
        out.append(f"net:{GUEST_IP}/24@{peer}")
        out += pick("ping", f"gio_ping:{peer}:20")
        out += pick("tcp_tx", f"gio_tcp_tx:{peer}:{TCP_SINK_PORT}:{args.tcp_mib}")
        out += pick("tcp_rx", f"gio_tcp_rx:{peer}:{HTTP_PORT}:{args.tcp_mib}")
    if "vsock" in args.groups:
        out += pick("vsock_tx", f"gio_vsock_tx:{VSOCK_TX_PORT}:{args.vsock_mib}")
        out += pick("vsock_rx", f"gio_vsock_rx:{VSOCK_RX_PORT}")
    return out


def boot_args(args: argparse.Namespace) -> str:
    return "console=ttyS0 reboot=k panic=1 pci=off quiet e2e.checks=" + ",".join(checks(args))


# --- inside the outer VM ------------------------------------------------------------------------
def kvm_stats() -> dict[str, int]:
    out = {}
    for name in KVM_STATS:
        with contextlib.suppress(OSError, ValueError):
            out[name] = int(Path("/sys/kernel/debug/kvm", name).read_text())
    return out


def tcpext() -> dict[str, int]:
    """The outer kernel's TcpExt counters (delayed ACKs, zero windows...), for --verbose."""
    lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines() if line.startswith("TcpExt:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=False)) if len(lines) >= 2 else {}


class Peer:
    """The outer VM's servers (threads), shared by both VMMs; the vsock ends per VMM."""

    def __init__(self) -> None:
        from tests.e2e.guest import io_peer

        self.io_peer = io_peer
        self.reports: list[tuple[str, int, float]] = []
        for target, port in ((io_peer.tcp_sink, TCP_SINK_PORT), (io_peer.http_source, HTTP_PORT)):
            sock = io_peer.listener(port)
            threading.Thread(target=target, args=(sock, 1 << 30, self._report), daemon=True).start()

    def _report(self, kind: str, nbytes: int, secs: float) -> None:
        self.reports.append((kind, nbytes, secs))

    def vsock_listen(self, side: str) -> socket.socket:
        if side == "embervm":
            path = str(WORK / f"v.sock_{VSOCK_TX_PORT}")
            if os.path.exists(path):
                os.unlink(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
        else:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)  # type: ignore[attr-defined]
            sock.bind((socket.VMADDR_CID_ANY, VSOCK_TX_PORT))  # type: ignore[attr-defined]
        sock.listen(1)
        threading.Thread(target=self.io_peer.unix_sink, args=(sock, 1, self._report), daemon=True).start()
        return sock

    def vsock_send(self, side: str, nbytes: int) -> None:
        def send() -> None:
            try:
                if side == "embervm":
                    secs = self.io_peer.vsock_send(str(WORK / "v.sock"), VSOCK_RX_PORT, nbytes)
                else:
                    secs = vsock_send_native(nbytes)
                self._report("vsock-send", nbytes, secs)
            except OSError as e:
                print(f"bench: vsock send failed: {e}", flush=True)

        threading.Thread(target=send, daemon=True).start()


def vsock_send_native(nbytes: int, deadline_s: float = 60) -> float:
    deadline = time.monotonic() + deadline_s
    while True:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)  # type: ignore[attr-defined]
        try:
            sock.connect((3, VSOCK_RX_PORT))
            break
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with sock:
        start = time.monotonic()
        zeros, left = bytes(1 << 16), nbytes
        while left:
            left -= sock.send(zeros[: min(left, 1 << 16)])
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(1 << 16):
            pass
        return time.monotonic() - start


def embervm_command(args: argparse.Namespace) -> list[str]:
    from tests.e2e.inside import embervm_command as command

    config = {
        "boot-source": {
            "kernel_image_path": str(GUEST / "vmlinux"),
            "initrd_path": str(GUEST / "initramfs"),
            "boot_args": boot_args(args),
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": args.mem},
        "drives": [{"drive_id": "scratch", "path_on_host": str(WORK / "disk.img"), "is_root_device": False}],
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": TAP, "guest_mac": GUEST_MAC}],
        "vsock": {"guest_cid": 3, "uds_path": str(WORK / "v.sock")},
    }
    (WORK / "vm.json").write_text(json.dumps(config))
    (WORK / "v.sock").unlink(missing_ok=True)  # embervm binds it afresh each boot
    (WORK / "metrics.json").unlink(missing_ok=True)
    metrics = str(WORK / "metrics.json")
    return [*command(), "--no-api", "--config-file", str(WORK / "vm.json"), "--metrics-path", metrics]


def embervm_metrics() -> dict[str, dict[str, int]]:
    """embervm's net and vCPU counters over the whole boot (the metrics file holds deltas)."""
    totals: dict[str, dict[str, int]] = {}
    try:
        lines = (WORK / "metrics.json").read_text().splitlines()
    except OSError:
        return totals
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        for group, values in record.items():
            if (group.startswith("net") or group == "vcpu") and isinstance(values, dict):
                sums = totals.setdefault(group, {})
                for key, value in values.items():
                    if isinstance(value, int) and value:
                        sums[key] = sums.get(key, 0) + value
    return totals


def qemu_command(args: argparse.Namespace) -> list[str]:
    qemu = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    command = [
        qemu, "-M", "microvm,x-option-roms=off,rtc=on", "-enable-kvm", "-cpu", "host", "-smp", "1",
        "-m", str(args.mem), "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
        "-no-reboot", "-global", "virtio-mmio.force-legacy=false",
        "-kernel", str(GUEST / "vmlinux"), "-initrd", str(GUEST / "initramfs"),
        "-append", boot_args(args),
        "-drive", f"id=scratch,file={WORK / 'disk.img'},format=raw,if=none",
        "-device", "virtio-blk-device,drive=scratch",
        "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off",
        "-device", f"virtio-net-device,netdev=n0,mac={GUEST_MAC}",
    ]  # fmt: skip
    if os.path.exists("/dev/vhost-vsock"):
        command += ["-device", "vhost-vsock-device,guest-cid=3"]
    return command


def run_guest(
    side: str,
    command: list[str],
    peer: Peer,
    args: argparse.Namespace,
    on_done: Callable[[dict[str, dict[str, Any]]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Boot one guest, follow its markers; {test: figures}. `on_done` gets the figures as
    soon as the guest says it is done, before its VMM ends (see `inside`)."""
    results: dict[str, dict[str, Any]] = {}
    begin: dict[str, dict[str, int]] = {}
    end: dict[str, dict[str, int]] = {}
    listener = peer.vsock_listen(side) if "vsock" in args.groups and (side == "embervm" or _has_vsock()) else None
    first_report = len(peer.reports)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    pending, tail = b"", b""
    tcpext_before: dict[str, int] = {}
    deadline = time.monotonic() + args.guest_timeout
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=1):
                continue
            data = os.read(proc.stdout.fileno(), 65536)
            if not data:
                break
            tail = (tail + data)[-4000:]
            pending += data
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").strip()
                if line.startswith(("GIO-BEGIN", "GIO-END", "E2E-CHECK", "E2E-DONE")) or (
                    args.verbose and line.startswith("GIO-")
                ):
                    print(f"bench: {side}: {line}", flush=True)  # progress, for a run that times out
                if m := re.match(r"GIO-BEGIN (\w+)", line):
                    begin[m.group(1)] = kvm_stats()
                    tcpext_before = tcpext()
                    if m.group(1) == "vsock_rx" and listener is not None:
                        peer.vsock_send(side, args.vsock_mib << 20)
                elif m := re.match(r"GIO-END (\w+)", line):
                    end[m.group(1)] = kvm_stats()
                    if args.verbose and m.group(1).startswith("tcp"):
                        moved = {
                            k: v - tcpext_before.get(k, 0) for k, v in tcpext().items() if v != tcpext_before.get(k, 0)
                        }
                        print(f"bench: {side}: outer TcpExt during {m.group(1)}: {moved}", flush=True)
                elif m := re.match(r"GIO-RESULT (\w+) (.*)", line):
                    name = m.group(1)
                    figures: dict[str, Any] = {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", m.group(2))}
                    for stat in KVM_STATS:
                        if stat in begin.get(name, {}) and stat in end.get(name, {}):
                            figures[f"kvm_{stat}"] = end[name][stat] - begin[name][stat]
                    results[name] = figures
                elif m := re.match(r"GIO-INFO ping .*= [\d.]+/([\d.]+)/", line):
                    results.setdefault("ping_info", {})["rtt_ms"] = float(m.group(1))
                elif line.startswith("E2E-DONE"):
                    deadline = min(deadline, time.monotonic() + 15)
                    if on_done is not None:
                        on_done(_finish(results, peer, first_report, tail))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        if listener is not None:
            listener.close()
    return _finish(results, peer, first_report, tail, side)


def _finish(
    found: dict[str, dict[str, Any]], peer: Peer, first_report: int, tail: bytes, side: str = ""
) -> dict[str, dict[str, Any]]:
    """The figures of one guest: its result lines with the peer's measurements merged in."""
    results = {test: dict(figures) for test, figures in found.items()}
    if "ping" in results and "ping_info" in results:
        results["ping"]["rtt_ms"] = results.pop("ping_info")["rtt_ms"]
    for kind, nbytes, secs in peer.reports[first_report:]:
        if kind == "vsock-send" and "vsock_rx" in results:
            results["vsock_rx"].update(bytes=nbytes, peer_secs=secs)
        elif kind == "tcp-sink" and "tcp_tx" in results:
            results["tcp_tx"]["peer_secs"] = secs
    if not results and side:
        print(f"bench: {side} produced no results; console tail:\n{tail.decode(errors='replace')}", flush=True)
    return results


def _has_vsock() -> bool:
    return os.path.exists("/dev/vhost-vsock")


def prepare_outer() -> None:
    from tests.e2e.guest import mktap

    WORK.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "debugfs", "none", "/sys/kernel/debug"], check=False)
    order = Path("/", MODULES_DIR, "order")
    if order.exists():
        for name in order.read_text().split():
            subprocess.run(["insmod", f"/{MODULES_DIR}/{name}.ko"], check=False, capture_output=True)
    mktap.make_tap(TAP)
    subprocess.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", TAP], check=True)
    subprocess.run(["ip", "link", "set", TAP, "up"], check=True)
    with (WORK / "disk.img").open("wb") as disk:
        block = os.urandom(1 << 20)
        for _ in range(DISK_MIB):
            disk.write(block)


def inside(args: argparse.Namespace) -> int:
    prepare_outer()
    print(f"bench: kvm stats {kvm_stats()} vhost-vsock={_has_vsock()}", flush=True)
    peer = Peer()
    runs: dict[str, list[dict[str, Any]]] = {"embervm": [], "qemu": []}

    def report_and_leave(last: dict[str, dict[str, Any]]) -> None:
        """The last guest is done: report every figure and end the outer VM now, without
        waiting for that VMM to exit. The outer kernel has locked up, now and then, as it
        destroyed an inner VM (kvm_destroy_vm under the emulator; tests/e2e/outer.py), and
        then printed nothing until the host's timeout: twice in CI after QEMU's last guest."""
        runs["qemu"].append(last)
        print(RESULT_MARK + json.dumps(runs), flush=True)
        print("E2E-OUTER-EXIT 0", flush=True)  # what the outer /init would print
        os.sync()
        from tests.e2e.guest.debug_exit import debug_exit

        debug_exit(0)

    for i in range(args.runs):  # interleaved, so that drift in the outer VM hits both alike
        for side, command in (("embervm", embervm_command(args)), ("qemu", qemu_command(args))):
            start = time.monotonic()
            last = i == args.runs - 1 and side == "qemu"
            runs[side].append(run_guest(side, command, peer, args, on_done=report_and_leave if last else None))
            if side == "embervm" and args.verbose:
                print(f"bench: embervm metrics {json.dumps(embervm_metrics())}", flush=True)
            print(f"bench: {side} run {i + 1} ({time.monotonic() - start:.0f} s): {runs[side][-1]}", flush=True)
    print(RESULT_MARK + json.dumps(runs), flush=True)
    return 0


# --- on the host -----------------------------------------------------------------------------------
def outer_archive():  # type: ignore[no-untyped-def]
    """QEMU (from bench/linux_boot.py) plus the vhost-vsock modules QEMU's vsock needs."""
    from bench.linux_boot import qemu_archive
    from tests.e2e.environment import ModuleIndex, modules_dir, prepare

    archive = qemu_archive()
    env = prepare()
    ModuleIndex(modules_dir(env.kernel)).add_to(archive, MODULES_DIR, ["vhost_vsock"])
    return archive


def rate(test: str, r: dict[str, Any]) -> float | None:
    """Higher is better: MiB/s, IOPS, or pings per second."""
    if r.get("rc", 1) != 0:
        return None
    if test == "ping":
        return 1000.0 / r["rtt_ms"] if r.get("rtt_ms") else None
    secs = r.get("peer_secs") if test == "vsock_rx" else r.get("secs")
    if not secs or not r.get("bytes"):
        return None
    if TESTS[test][1] == "IOPS":
        return r["bytes"] / 4096 / secs
    return r["bytes"] / (1 << 20) / secs


def _per(r: dict[str, Any], key: str, count: int | None) -> float | None:
    """r[key] per request (`count` of them) or, without a count, per MiB moved."""
    if key not in r:
        return None
    if count:
        return r[key] / count
    return r[key] / (r["bytes"] / (1 << 20)) if r.get("bytes") else None


def _sides(pairs: list[tuple[dict[str, Any], dict[str, Any]]], fn: Any) -> list[float | None]:
    """[embervm's median, QEMU's median] of fn over the runs."""
    return [_med([fn(x) for x, _ in pairs]), _med([fn(y) for _, y in pairs])]


def _med(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec)


def table(runs: dict[str, list[dict[str, Any]]], verbose: bool) -> list[str]:
    ours, theirs = runs["embervm"], runs["qemu"]
    lines = [
        f"{'test':14} {'ratio emb/qemu':>16} {'range':>12}  {'irq/MiB emb/qemu':>17}  {'exits/MiB emb/qemu':>19}"
        f"  {'mmio exits/MiB':>15}  {'eth0 frame B emb/qemu':>21}"
        + (f"  {'embervm':>10} {'qemu':>10} unit" if verbose else "")
    ]
    for test, (_, unit) in TESTS.items():
        if not any(test in r for r in ours + theirs):
            continue
        pairs = list(zip([r.get(test, {}) for r in ours], [r.get(test, {}) for r in theirs], strict=False))
        ratios = [a / b for x, y in pairs if (a := rate(test, x)) and (b := rate(test, y))]
        per = 20 if test == "ping" else None  # ping: per request; the others: per MiB moved
        irq = _sides(pairs, lambda r, p=per: _per(r, "irqs", p))
        exits = _sides(pairs, lambda r, p=per: _per(r, "kvm_exits", p))
        mmio = _sides(pairs, lambda r, p=per: _per(r, "kvm_mmio_exits", p))
        frames = ["—", "—"]
        if test.startswith("tcp"):
            key = ("tx_bytes", "tx_packets") if test == "tcp_tx" else ("rx_bytes", "rx_packets")
            frames = [
                _fmt(_med([r[key[0]] / r[key[1]] if r.get(key[1]) else None for r in side]), ".0f")
                for side in ([x for x, _ in pairs], [y for _, y in pairs])
            ]
        rng = f"{min(ratios):.2f}..{max(ratios):.2f}" if ratios else "—"
        label = test + (" (/ping)" if test == "ping" else "")
        line = (
            f"{label:14} {_fmt(_med(ratios)):>16} {rng:>12}  {_fmt(irq[0], '.1f'):>8}/{_fmt(irq[1], '.1f'):<8}"
            f"  {_fmt(exits[0], '.0f'):>9}/{_fmt(exits[1], '.0f'):<9}"
            f"  {_fmt(mmio[0], '.0f'):>7}/{_fmt(mmio[1], '.0f'):<7}"
            f"  {frames[0]:>9}/{frames[1]:<9}"
        )
        if verbose:
            a, b = (_med([rate(test, x) for x, _ in pairs]), _med([rate(test, y) for _, y in pairs]))
            if test == "ping":
                a, b = (1000 / a if a else None), (1000 / b if b else None)
            line += f"  {_fmt(a):>10} {_fmt(b):>10} {unit}"
        lines.append(line)
    return lines


def measure(args: argparse.Namespace) -> tuple[Any, dict[str, list[dict[str, Any]]] | None]:
    """One outer-VM run; (the OuterRun, {"embervm": [figures per run], "qemu": [...]} or None)."""
    from tests.e2e.environment import prepare
    from tests.e2e.outer import run_outer_retrying_a_stall

    env = prepare()
    job = (
        '#!/bin/sh\ncd "$E2E_REPO" || exit 1\n'
        f'exec "$E2E_PYTHON" bench/guest_io.py --inside --runs {args.runs} --only {",".join(sorted(args.groups))}'
        f" --mem {args.mem} --tcp-mib {args.tcp_mib} --vsock-mib {args.vsock_mib} --guest-timeout {args.guest_timeout}"
        + (f" --tests {','.join(sorted(args.tests))}" if args.tests else "")
        + (" --verbose" if args.verbose else "")
        + "\n"
    )
    timeout = 180 + args.runs * 2 * args.guest_timeout
    echo = sys.stderr if args.verbose else None
    run = run_outer_retrying_a_stall(job, timeout, env=env, extra=outer_archive(), echo=echo)
    lines = [line for line in run.console.splitlines() if line.startswith(RESULT_MARK)]
    if not run.ok or not lines:
        return run, None
    return run, json.loads(lines[-1][len(RESULT_MARK) :])


def host(args: argparse.Namespace) -> int:
    from tests.e2e.environment import prepare

    run, runs = measure(args)
    if runs is None:
        print(run.console[-5000:], file=sys.stderr)
        print(f"benchmark failed: {run.describe()}; console log {run.log}", file=sys.stderr)
        return 1
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    print(f"Linux {prepare().kernel.version} (vmlinux), {args.mem} MiB, 1 vCPU, one level down (outer VM: QEMU TCG)")
    print(f"embervm vs qemu -M microvm (virtio-mmio, vhost off for net), {args.runs} run(s) each, interleaved")
    print("ratio: embervm ÷ QEMU of MiB/s, IOPS or pings/s (higher is better), median (range) of the runs")
    for line in table(runs, args.verbose):
        print(line)
    print(f"(outer VM run {run.seconds:.0f} s; console log {run.log})")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--only", default="blk,net,vsock", help="comma-separated groups: blk, net, vsock")
    parser.add_argument("--tests", default="", help=f"comma-separated tests of those groups: {', '.join(TESTS)}")
    parser.add_argument("--mem", type=int, default=256, help="guest memory in MiB")
    parser.add_argument("--tcp-mib", type=int, default=8)
    parser.add_argument("--vsock-mib", type=int, default=8)
    parser.add_argument("--guest-timeout", type=int, default=240, help="seconds for one guest boot and its tests")
    parser.add_argument("--json", help="also write the raw figures to this file")
    parser.add_argument("--verbose", action="store_true", help="absolute figures, the outer VM's console")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.groups = {g for g in args.only.split(",") if g}
    args.tests = {t for t in args.tests.split(",") if t}
    if unknown := args.groups - {"blk", "net", "vsock"}:
        parser.error(f"unknown groups {sorted(unknown)}")
    if unknown := args.tests - set(TESTS):
        parser.error(f"unknown tests {sorted(unknown)}")
    return args


def main() -> int:
    args = parse_args()
    return inside(args) if args.inside else host(args)


if __name__ == "__main__":
    sys.exit(main())
