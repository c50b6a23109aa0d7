"""`embervm`: Firecracker's command line, then the API server or a --no-api boot.

`main()` parses the arguments (no threads yet), forks the worker zygote with
`Launcher.start()` before anything else can start a thread, then `run()` does the rest:
logger, metrics, MMDS, the optional --config-file boot, and either the API server
(until the guest ends or a signal) or a wait for the guest (--no-api). Once the guest
runs, stdin is its serial input (`controlplane.console_input`). The process exits with the
guest's exit code (0 on guest reset), as Firecracker does.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn

from controlplane import logger as fclog
from controlplane import snapshot_cli, startup_signals
from controlplane.console_input import ConsoleInput, ForwardingLauncher
from controlplane.logger import LOGGER, FcLogger, SinkError, level_name
from controlplane.metrics import FLUSH_INTERVAL_S, METRICS, Metrics, MetricsError
from controlplane.mmds_store import MmdsError, MmdsStore
from controlplane.models import BodyError, CpuConfig, VmmConfigFile, parse_body, parse_value
from controlplane.periodic import Periodic
from controlplane.state import ApiError, LauncherLike, RuntimeOptions, Vmm
from controlplane.uds import SocketInUseError, bind_unix_socket, release_unix_socket
from shared import exitcodes
from shared.startup_trace import mark as _mark
from shared.versions import EMBERVM_VERSION
from shared.versions import FIRECRACKER_VERSION as FIRECRACKER_API_VERSION

if TYPE_CHECKING:
    from controlplane.server import ApiServer

log = fclog.get("main")
START_NS = time.monotonic_ns()
# Bind the API socket first thing (`bind_api_socket`): a VMM of the fork server, whose start-up
# after it takes ~15 ms (everything is imported). A cold start binds once FastAPI and uvicorn
# are imported (~0.5 s later), as it always did, so that a first request does not wait in the
# socket's backlog for that long.
BIND_EARLY = False
DEFAULT_API_SOCK = "/run/firecracker.socket"
DEFAULT_MAX_PAYLOAD = 51200
_INSTANCE_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(exitcodes.ARG_PARSING, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="embervm", description="A Firecracker-compatible microVM monitor.", allow_abbrev=False)
    p.add_argument("--api-sock", default=DEFAULT_API_SOCK, help="Path of the API Unix socket.")
    p.add_argument("--config-file", help="Boot from this Firecracker JSON configuration.")
    p.add_argument("--no-api", action="store_true", help="Serve no API (requires --config-file).")
    p.add_argument("--id", default="anonymous-instance", help="MicroVM unique identifier.")
    p.add_argument("--log-path", help="Path to a file or named pipe for the log.")
    p.add_argument("--level", default="Info", help="Log level (Off, Error, Warn(ing), Info, Debug, Trace).")
    p.add_argument("--show-level", action="store_true", help="Print the level in each log line.")
    p.add_argument("--show-log-origin", action="store_true", help="Print the file and line of each log line.")
    p.add_argument("--module", help="Only log lines from this module.")
    p.add_argument("--metrics-path", help="Path to a file or named pipe for the metrics.")
    p.add_argument("--boot-timer", action="store_true", help="Log the guest's boot time.")
    p.add_argument("--http-api-max-payload-size", type=int, default=DEFAULT_MAX_PAYLOAD, metavar="BYTES")
    p.add_argument("--mmds-size-limit", type=int, metavar="BYTES", help="MMDS size limit (default: payload size).")
    p.add_argument("--metadata", help="JSON file with the initial MMDS contents.")
    p.add_argument("--start-time-us", type=int, help=argparse.SUPPRESS)
    p.add_argument("--start-time-cpu-us", type=int, help=argparse.SUPPRESS)
    p.add_argument("--parent-cpu-time-us", type=int, help=argparse.SUPPRESS)
    seccomp = p.add_mutually_exclusive_group()
    seccomp.add_argument("--no-seccomp", action="store_true", help="Run the workers without seccomp filters.")
    seccomp.add_argument("--seccomp-filter", help="Custom seccomp filter file for the workers.")
    p.add_argument(
        "--no-namespaces",
        action="store_true",
        help="Run the workers in the host's namespaces and filesystem, as embervm's uid (UNSAFE: docs/security.md).",
    )
    p.add_argument("--enable-fault-injection", action="store_true", help="Allow fault injection (tests).")
    snapshot_cli.add_arguments(p)
    p.add_argument(
        "--version", action="version", version=f"Firecracker v{FIRECRACKER_API_VERSION}\nembervm v{EMBERVM_VERSION}"
    )
    return p


@functools.cache
def _parser() -> argparse.ArgumentParser:
    """The parser, built once per process (the fork server builds it for every VMM it forks)."""
    return build_parser()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.no_api and not args.config_file:
        parser.error("argument --no-api requires --config-file")
    level = level_name(args.level)
    if level is None:  # Firecracker: MainError::InvalidLogLevel, exit code BadConfiguration
        print(
            f"Invalid value for logger level: Failed to parse string to level filter: {args.level}."
            "Possible values: [Error, Warning, Info, Debug]",
            file=sys.stderr,
        )
        sys.exit(exitcodes.BAD_CONFIGURATION)
    args.level = level
    if not _INSTANCE_ID.match(args.id):
        parser.error(f"invalid instance ID {args.id!r}: 1 to 64 characters among letters, digits and '-'")
    if args.http_api_max_payload_size <= 0 or (args.mmds_size_limit is not None and args.mmds_size_limit <= 0):
        parser.error("sizes must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The `embervm` console script."""
    _mark("cli: main")
    args = parse_args(argv)
    _mark("cli: arguments parsed")
    snapshot_code = snapshot_cli.handle(args)
    if snapshot_code is not None:
        sys.exit(snapshot_code)
    from controlplane.launcher import Launcher  # the zygote forks first, before any thread exists
    from controlplane.policy import confine_supervisor

    startup_signals.install()  # before the socket exists: a client may signal as soon as it does
    api_socket = bind_api_socket(args.api_sock) if BIND_EARLY and not args.no_api else None
    if isinstance(api_socket, socket.socket):
        _mark("cli: API socket listening")
    console_in = _take_stdin()  # before the zygote forks: its workers keep fds 0-2
    handed_over = False  # run() owns the API socket once called
    try:
        held = (api_socket.fileno(),) if isinstance(api_socket, socket.socket) else ()
        launcher = Launcher.start(seccomp=not args.no_seccomp, close_in_zygote=held)
        _mark("cli: zygote forked")
        try:
            confine_supervisor(args.no_seccomp)  # still single-threaded: capabilities are per thread
            _mark("cli: supervisor confined")
            handed_over = True
            code = run(args, launcher, console_in=console_in, api_socket=api_socket)
        finally:
            launcher.shutdown()
    finally:
        if not handed_over and isinstance(api_socket, socket.socket):
            release_unix_socket(api_socket, args.api_sock)
    sys.exit(code)


def bind_api_socket(path: str) -> socket.socket | SocketInUseError:
    """The API socket, bound and listening first thing: clients may connect while the rest
    of start-up runs (the zygote, the supervisor's filter, the app), and their requests wait in
    the backlog until the server serves. A failure is returned, to be raised where the server
    is made (after the logger is configured, so that it is logged as before)."""
    try:
        return bind_unix_socket(path)
    except SocketInUseError as err:
        return err


def _take_stdin() -> int | None:
    """embervm's stdin, moved to a close-on-exec fd of its own; fd 0 becomes /dev/null.

    The worker processes keep fds 0-2: this way none of them holds the host's terminal
    (whose TIOCSTI would type into the user's shell) or input pipe. None if there is no stdin.
    """
    try:
        fd: int | None = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
    except OSError:
        fd = None
    try:
        null = os.open(os.devnull, os.O_RDONLY)  # fd 0 itself if stdin was closed
    except OSError:  # a chroot without /dev/null (the jailer makes one): fd 0 stays as it was
        return fd
    if null != 0:
        os.dup2(null, 0)
        os.close(null)
    return fd


class StartupError(Exception):
    """A startup failure: the message is printed, `code` is the process exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def run(
    args: argparse.Namespace,
    launcher: LauncherLike,
    console_out: BinaryIO | None = None,
    spec_types: tuple[type, type, type[Exception]] | None = None,
    metrics: Metrics | None = None,
    logger: FcLogger | None = None,
    console_in: int | None = None,
    api_socket: socket.socket | SocketInUseError | None = None,
) -> int:
    """Everything after the zygote fork; returns the process exit code.

    Tests pass a fake launcher, spec types and their own metrics/logger; `main` passes
    the real launcher and the process-wide ones, stdin as `console_in` (the guest's serial
    input once it runs) and the API socket it bound (`bind_api_socket`); without one, the
    server binds `args.api_sock` itself.
    """
    metrics = metrics or METRICS
    logger = logger or LOGGER
    done = threading.Event()
    server: ApiServer | None = None
    stop_signal: int | None = None
    console = ConsoleInput(console_in) if console_in is not None else None
    if console is not None:
        launcher = ForwardingLauncher(launcher, console)

    def vm_exited(code: int, reason: str) -> None:
        if server is not None and vmm.vm_failed:
            # The vCPU worker died: keep the API up to report it (GET /, metrics) until asked to stop.
            log.error("The microVM failed (%s); the API stays up until embervm is stopped.", reason)
            return
        done.set()
        if server is not None:
            server.stop()

    logger.set_instance_id(args.id)
    logger.on_miss = lambda: metrics.inc("logger", "missed_log_count")
    vmm = Vmm(
        launcher,
        args.id,
        console_out if console_out is not None else sys.stdout.buffer,
        _options(args),
        MmdsStore(args.mmds_size_limit or args.http_api_max_payload_size),
        metrics=metrics,
        logger=logger,
        on_exit=vm_exited,
    )
    vmm.spec_types = spec_types
    flusher = Periodic(FLUSH_INTERVAL_S, metrics.flush, "fc_metrics")
    vmm.on_started.append(flusher.start)  # every 60 s from the start of the VM, as Firecracker
    try:
        _setup(args, vmm)
        log.info("Running Firecracker v%s", FIRECRACKER_API_VERSION)
        log.info("embervm v%s", EMBERVM_VERSION)
        if not args.no_api:
            # Imported here: FastAPI and uvicorn take most of a cold start, and --no-api needs neither.
            from controlplane.api import create_app
            from controlplane.server import ApiServer

            app = create_app(vmm, args.http_api_max_payload_size)
            _mark("cli: API app made")
            if isinstance(api_socket, SocketInUseError):
                raise api_socket
            server = ApiServer(app, args.api_sock, api_socket)
            api_socket = None  # the server's now
        if args.config_file:
            apply_config_file(vmm, args.config_file)
            _mark("cli: config applied")
            log.info("Successfully started microvm that was configured from one single json")
        _report_startup(args, metrics)
        if server is not None:
            if not done.is_set():
                server.serve()  # it takes over a SIGINT/SIGTERM kept during start-up
            stop_signal = server.stop_signal
            server = None
        else:
            stop_signal = _wait_no_api(done)
    except StartupError as err:
        log.error("%s", err)
        print(f"embervm: {err}", file=sys.stderr)
        return err.code
    except SocketInUseError as err:
        log.error("%s", err.strerror)
        print(f"embervm: {err.strerror}", file=sys.stderr)
        return exitcodes.GENERIC_ERROR
    finally:
        try:
            if server is not None:
                server.close()
            elif isinstance(api_socket, socket.socket):
                release_unix_socket(api_socket, args.api_sock)  # bound by main(), no server was made
            flusher.stop()
            _stop_vm(vmm)
            vmm.close_backends()
        finally:
            if console is not None:
                console.close()  # after the VM: a forwarder still writing to it is released
        metrics.flush()
    if vmm.vm_failed and vmm.exit_code is not None:
        code = vmm.exit_code if vmm.exit_code == exitcodes.BAD_SYSCALL else exitcodes.WORKER_DIED
    elif stop_signal is not None:
        code = 128 + stop_signal  # stopped from the host, as a shell reports a signal
    else:
        code = vmm.exit_code if vmm.exit_code is not None else exitcodes.OK
    log.info("Firecracker exiting successfully. exit_code=%d", code)
    return code


def _options(args: argparse.Namespace) -> RuntimeOptions:
    return RuntimeOptions(
        boot_timer=args.boot_timer,
        no_seccomp=args.no_seccomp,
        no_namespaces=args.no_namespaces,
        seccomp_filter=args.seccomp_filter,
        enable_fault_injection=args.enable_fault_injection,
    )


def _setup(args: argparse.Namespace, vmm: Vmm) -> None:
    """CLI logger, metrics and --metadata (a bad one is a configuration error)."""
    try:
        vmm.logger.configure(args.log_path, args.level, args.show_level, args.show_log_origin, args.module)
        if args.metrics_path:
            vmm.metrics.configure(args.metrics_path)
    except (SinkError, MetricsError) as err:
        raise StartupError(f"Cannot configure logging or metrics: {err}", exitcodes.GENERIC_ERROR) from None
    if args.metadata:
        try:
            vmm.mmds.put(json.loads(Path(args.metadata).read_text()))
        except (OSError, ValueError, MmdsError) as err:
            raise StartupError(f"Invalid --metadata {args.metadata}: {err}", exitcodes.GENERIC_ERROR) from None


def apply_config_file(vmm: Vmm, path: str) -> None:
    """Apply a Firecracker config file, section by section, in Firecracker's order.

    Any failure exits with GenericError (1), as Firecracker v1.12.1 does (its
    BuildMicroVMFromJson error maps to no other code; BadConfiguration is for --level)."""
    try:
        raw = Path(path).read_bytes()
        config = parse_body(VmmConfigFile, raw)
        cpu_config = config.cpu_config
        if isinstance(cpu_config, str):  # a path to a custom CPU template
            cpu_config = parse_value(CpuConfig, json.loads(Path(cpu_config).read_text()))
        if config.logger is not None:
            vmm.put_logger(config.logger)
        if config.metrics is not None:
            vmm.put_metrics(config.metrics)
        if config.machine_config is not None:
            vmm.put_machine_config(config.machine_config)
        if cpu_config is not None:
            vmm.put_cpu_config(cpu_config)
        vmm.put_boot_source(config.boot_source)
        for drive in config.drives:
            vmm.put_drive(drive)
        for iface in config.network_interfaces:
            vmm.put_network_interface(iface)
        if config.vsock is not None:
            vmm.put_vsock(config.vsock)
        if config.entropy is not None:
            vmm.put_entropy(config.entropy)
        if config.balloon is not None:  # after machine-config: its target is checked against RAM
            vmm.put_balloon(config.balloon)
        if config.mmds_config is not None:
            vmm.put_mmds_config(config.mmds_config)
        if config.restart_policy is not None:
            vmm.put_restart_policy(config.restart_policy)
        vmm.start()
    except OSError as err:
        raise StartupError(f"Cannot read the configuration: {err}", exitcodes.GENERIC_ERROR) from None
    except (BodyError, ValueError) as err:
        raise StartupError(
            f"Configuration for VMM from one single json failed: {path}: {err}", exitcodes.GENERIC_ERROR
        ) from None
    except ApiError as err:
        raise StartupError(
            f"Configuration for VMM from one single json failed: {err}", exitcodes.GENERIC_ERROR
        ) from None


def _report_startup(args: argparse.Namespace, metrics: Metrics) -> None:
    """api_server.process_startup_time_us / _cpu_us, as Firecracker reports them."""
    if args.start_time_us is not None:
        elapsed_us = time.monotonic_ns() // 1000 - args.start_time_us
    else:
        elapsed_us = (time.monotonic_ns() - START_NS) // 1000
    # Firecracker's ProcessTimeReporter: CPU time since --start-time-cpu-us (the jailer's CPU
    # clock at exec; it continues in this process), plus what the jailer's processes that
    # forked us used (--parent-cpu-time-us).
    cpu_us = time.process_time_ns() // 1000 - (args.start_time_cpu_us or 0) + (args.parent_cpu_time_us or 0)
    metrics.store("api_server", "process_startup_time_us", max(0, elapsed_us))
    metrics.store("api_server", "process_startup_time_cpu_us", cpu_us)


def _wait_no_api(done: threading.Event) -> int | None:
    """--no-api: wait for the guest to end; SIGINT/SIGTERM stop it. Returns the signal, if any."""
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("Received signal %d, stopping the microVM.", signum)
        received.append(signum)
        done.set()

    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    if in_main:
        startup_signals.take_over(on_signal)
    try:
        done.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return received[0] if received else None


def _stop_vm(vmm: Vmm) -> None:
    """Stop a VM still running (API server stopped by a signal, or an error) and reap it."""
    vm = vmm.vm
    if vm is None or vmm.exit_code is not None:
        return
    try:
        vm.stop()
        vm.wait(timeout=10)
    except Exception:
        log.exception("Stopping the microVM failed")
