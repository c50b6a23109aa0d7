"""The embervm CLI: Firecracker's flags, and `run` driven in-process with a fake launcher."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from controlplane.cli import parse_args, run
from controlplane.logger import FcLogger
from controlplane.metrics import Metrics
from shared import exitcodes
from tests.support.api_client import ApiClient, assert_no_content
from tests.unit.controlplane.fakes import SPEC_TYPES, FakeLauncher


def wait_for(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_defaults_match_firecracker():
    args = parse_args([])
    assert args.api_sock == "/run/firecracker.socket"
    assert (args.id, args.level, args.http_api_max_payload_size, args.mmds_size_limit) == (
        "anonymous-instance",
        "Info",
        51200,
        None,
    )
    assert not (args.no_api or args.boot_timer or args.no_seccomp or args.enable_fault_injection)


def test_every_flag_parses():
    args = parse_args(
        [
            "--api-sock",
            "/tmp/s",
            "--config-file",
            "c.json",
            "--no-api",
            "--id",
            "vm-1",
            "--log-path",
            "l",
            "--level",
            "debug",
            "--show-level",
            "--show-log-origin",
            "--metrics-path",
            "m",
            "--boot-timer",
            "--http-api-max-payload-size",
            "1000",
            "--mmds-size-limit",
            "500",
            "--metadata",
            "md.json",
            "--seccomp-filter",
            "f.bpf",
            "--enable-fault-injection",
            "--start-time-us",
            "5",
        ]
    )
    assert (args.level, args.seccomp_filter, args.mmds_size_limit, args.no_api) == ("Debug", "f.bpf", 500, True)


@pytest.mark.parametrize(
    "argv",
    [
        ["--no-api"],
        ["--id", "bad id"],
        ["--id", "x" * 65],
        ["--no-seccomp", "--seccomp-filter", "f"],
        ["--api-so", "/tmp/s"],
        ["--http-api-max-payload-size", "0"],
        ["--unknown"],
    ],
)
def test_bad_arguments_exit_with_the_arg_parsing_code(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == exitcodes.ARG_PARSING
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(("given", "level"), [("warn", "Warning"), ("Warn", "Warning"), ("WARNING", "Warning")])
def test_level_warn_is_accepted_like_firecracker(given, level):
    assert parse_args(["--level", given]).level == level


def test_an_invalid_level_exits_with_bad_configuration(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--level", "loud"])
    assert exit_info.value.code == exitcodes.BAD_CONFIGURATION  # Firecracker: MainError::InvalidLogLevel
    assert "Invalid value for logger level: Failed to parse string to level filter: loud." in capsys.readouterr().err


def test_version_prints_the_firecracker_api_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("Firecracker v1.")


class CliRun:
    """`run()` on a thread, with a fake launcher and its own metrics and logger."""

    def __init__(self, argv: list[str]) -> None:
        self.launcher = FakeLauncher()
        self.logger = FcLogger()
        self.result: list[int] = []
        self.thread = threading.Thread(target=self._run, args=(parse_args(argv),), daemon=True)
        self.thread.start()

    def _run(self, args) -> None:
        self.result.append(
            run(args, self.launcher, console_out=None, spec_types=SPEC_TYPES, metrics=Metrics(), logger=self.logger)
        )

    def exit_code(self) -> int:
        self.thread.join(timeout=20)
        assert not self.thread.is_alive(), "run() did not return"
        self.logger.close()
        return self.result[0]


def metrics_writers() -> int:
    return sum(thread.name == "fc_metrics" and thread.is_alive() for thread in threading.enumerate())


def config_file(tmp_path: Path, files: dict[str, str], **extra: object) -> str:
    config = {
        "boot-source": {"kernel_image_path": files["vmlinux"], "boot_args": "console=ttyS0"},
        "drives": [
            {"drive_id": "rootfs", "path_on_host": files["rootfs"], "is_root_device": True, "is_read_only": True}
        ],
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 64},
        **extra,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_api_mode_serves_until_the_guest_exits_then_removes_the_socket(tmp_path: Path, files):
    sock = str(tmp_path / "fc.sock")
    log_path = tmp_path / "fc.log"
    metrics_path = tmp_path / "fc.metrics"
    log_path.touch()
    metadata = tmp_path / "md.json"
    metadata.write_text('{"latest": {"hostname": "vm-1"}}')
    cli = CliRun(
        [
            "--api-sock",
            sock,
            "--id",
            "vm-1",
            "--log-path",
            str(log_path),
            "--metrics-path",
            str(metrics_path),
            "--metadata",
            str(metadata),
        ]
    )
    wait_for(lambda: os.path.exists(sock))
    with ApiClient(sock) as client:
        assert client.get("/").json()["id"] == "vm-1"
        assert client.get("/mmds").json() == {"latest": {"hostname": "vm-1"}}
        assert_no_content(client.put("/boot-source", json={"kernel_image_path": files["vmlinux"]}))
        flushers = metrics_writers()
        assert_no_content(client.put("/actions", json={"action_type": "InstanceStart"}))
        # The 60 s metrics writer starts with the microVM, as Firecracker's PeriodicMetrics.
        assert metrics_writers() == flushers + 1
    cli.launcher.vms[0].finish(0, "guest reset")
    assert cli.exit_code() == 0
    assert not os.path.exists(sock)
    log = log_path.read_text()
    assert "[vm-1:main] Running Firecracker v1.12.1" in log
    assert "API server started." in log
    lines = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    assert len(lines) >= 2, "a line when configured and one at exit"
    assert sum(line["put_api_requests"]["actions_count"] for line in lines) == 1
    assert lines[-1]["api_server"]["process_startup_time_us"] > 0


def test_config_file_boots_at_once_and_the_api_serves_post_boot(tmp_path: Path, files):
    sock = str(tmp_path / "fc.sock")
    cli = CliRun(["--api-sock", sock, "--config-file", config_file(tmp_path, files)])
    wait_for(lambda: cli.launcher.vms)
    spec = cli.launcher.vms[0].spec
    assert (spec.vcpu_count, spec.mem_size_mib, spec.drives[0].drive_id) == (2, 64, "rootfs")
    wait_for(lambda: os.path.exists(sock))
    with ApiClient(sock) as client:
        assert client.get("/").json()["state"] == "Running"
        assert client.get("/vm/config").json()["machine-config"]["vcpu_count"] == 2
    cli.launcher.vms[0].finish(7, "vcpu worker died")
    assert cli.exit_code() == 7
    assert not os.path.exists(sock)


def test_no_api_boots_from_the_config_and_exits_with_the_guest(tmp_path: Path, files):
    sock = tmp_path / "unused.sock"
    cli = CliRun(["--no-api", "--api-sock", str(sock), "--config-file", config_file(tmp_path, files)])
    wait_for(lambda: cli.launcher.vms)
    assert not sock.exists()
    cli.launcher.vms[0].finish(0, "guest reset")
    assert cli.exit_code() == 0


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"machine-config": {"vcpu_count": 0, "mem_size_mib": 64}}, "number of vCPUs"),
        ({"drives": [{"drive_id": "r", "is_root_device": True, "path_on_host": "/none"}]}, "backing file"),
        ({"balloon": {"amount_mib": 1 << 20, "deflate_on_oom": True}}, "Amount of pages requested is too large"),
        ({"bogus": 1}, "unknown field `bogus`"),
    ],
)
def test_bad_config_file_exits_with_firecrackers_generic_error(tmp_path: Path, files, capsys, extra, needle):
    # Firecracker v1.12.1 maps RunWithoutApiError::BuildMicroVMFromJson to FcExitCode::GenericError.
    cli = CliRun(["--no-api", "--config-file", config_file(tmp_path, files, **extra)])
    assert cli.exit_code() == exitcodes.GENERIC_ERROR
    assert needle in capsys.readouterr().err


def test_cpu_config_path_in_the_config_file_is_loaded(tmp_path: Path, files):
    template = tmp_path / "template.json"
    template.write_text(json.dumps({"msr_modifiers": [{"addr": "0x10a", "bitmap": "0b" + "x" * 64}]}))
    cli = CliRun(["--no-api", "--config-file", config_file(tmp_path, files, **{"cpu-config": str(template)})])
    wait_for(lambda: cli.launcher.vms)
    assert cli.launcher.vms[0].spec.cpu_config == {"msr_modifiers": [{"addr": "0x10a", "bitmap": "0b" + "x" * 64}]}
    cli.launcher.vms[0].finish(0, "guest reset")
    assert cli.exit_code() == 0


def test_a_live_socket_is_a_clear_error_and_a_stale_one_is_replaced(tmp_path: Path, capsys):
    path = str(tmp_path / "busy.sock")
    live = socket.socket(socket.AF_UNIX)
    live.bind(path)
    live.listen(1)
    try:
        cli = CliRun(["--api-sock", path])
        assert cli.exit_code() == exitcodes.GENERIC_ERROR
        assert "already in use by another process" in capsys.readouterr().err
        assert os.path.exists(path), "someone else's socket must not be removed"
    finally:
        live.close()  # now stale: the path remains, nobody listens
    cli = CliRun(["--api-sock", path])
    wait_for(lambda: _connectable(path))
    with ApiClient(path) as client:
        assert client.get("/version").status_code == 200
        assert_no_content(client.put("/boot-source", json={"kernel_image_path": __file__}))
        assert_no_content(client.put("/actions", json={"action_type": "InstanceStart"}))
    cli.launcher.vms[0].finish(0, "guest reset")
    assert cli.exit_code() == 0


def _connectable(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def test_restart_policy_section_in_the_config_file_reaches_the_spec(tmp_path: Path, files):
    section = {"restart-policy": {"max_restarts": 1, "devices": {"rootfs": {"hang_timeout_s": 9}}}}
    cli = CliRun(["--no-api", "--config-file", config_file(tmp_path, files, **section)])
    wait_for(lambda: cli.launcher.vms)
    assert cli.launcher.vms[0].spec.restart_policy == {"max_restarts": 1, "rootfs": {"hang_timeout_s": 9.0}}
    cli.launcher.vms[0].finish(0, "guest reset")
    assert cli.exit_code() == 0


def test_snapshot_version_prints_embervms_format_version(capsys):
    from controlplane.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--snapshot-version"])
    assert exit_info.value.code == exitcodes.OK
    assert capsys.readouterr().out.strip() == "v1.0.0"


def test_describe_snapshot_of_a_file_that_is_none_fails_saying_so(tmp_path: Path, capsys):
    from controlplane.cli import main

    (tmp_path / "vm.state").write_bytes(b"not a snapshot")
    with pytest.raises(SystemExit) as exit_info:
        main(["--describe-snapshot", str(tmp_path / "vm.state")])
    assert exit_info.value.code == exitcodes.GENERIC_ERROR
    assert "is not an embervm snapshot" in capsys.readouterr().err


def test_default_boot_args_are_firecrackers(files):
    from controlplane.builder import kernel_cmdline
    from controlplane.vm_spec import VmSpec

    cmdline = kernel_cmdline(VmSpec(kernel_image_path=files["vmlinux"]), [])
    # Firecracker v1.12.1's DEFAULT_KERNEL_CMDLINE (src/vmm/src/vmm_config/boot_source.rs)
    assert cmdline == "reboot=k panic=1 pci=off nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.dumbkbd"
