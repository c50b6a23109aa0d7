"""Device backends opened when they are configured, as Firecracker opens them at PUT time.

Firecracker builds each device when its PUT arrives: `PUT /drives` opens the backing file,
`PUT /network-interfaces` attaches the TAP (TUNSETIFF), `PUT /vsock` binds `uds_path`. A
client therefore learns at once which resource is wrong, and a file swapped after the PUT
is not the one the guest gets. `OpenedBackends` holds those fds until InstanceStart hands
them to the device planners (`controlplane.builder`, which take duplicates, so the spec
keeps owning its own); a later PUT of the same resource closes the one it replaces, and
whatever is never used is closed when the VM starts or the process ends.

Keys are `"<kind>:<device id>"` (`backend_key`), the kinds of `shared.device_kinds`.
The error texts are Firecracker's (`DriveError`, `NetworkInterfaceError`, `VsockConfigError`).
"""

from __future__ import annotations

import contextlib
import os
import threading

from devices.net.tap import TapError, open_tap
from devices.vsock.backend import MAX_UDS_PATH, listening_socket


class BackendError(Exception):
    """A backend that cannot be opened; the message is a complete fault_message."""


def backend_key(kind: str, device_id: str) -> str:
    return f"{kind}:{device_id}"


VSOCK_KEY = backend_key("vsock", "vsock")


def _io_error(err: OSError) -> str:
    """An OSError as Rust's io::Error displays it."""
    return f"{err.strerror} (os error {err.errno})"


def open_drive_file(path: str, read_only: bool, patch: bool = False) -> int:
    """The drive's backing file, read-write unless the drive is read-only; `patch` words the
    error as Firecracker's PATCH /drives does."""
    try:
        return os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as err:
        cause = f"Virtio backend error: Error manipulating the backing file: {_io_error(err)} {path}"
        if patch:
            raise BackendError(
                f"Drive config error: Unable to patch the block device: Device manager error: {cause} "
                "Please verify the request arguments."
            ) from None
        raise BackendError(f"Drive config error: Unable to create the virtio block device: {cause}") from None


def open_tap_device(host_dev_name: str) -> int:
    try:
        return open_tap(host_dev_name)
    except TapError as err:
        raise BackendError(f"Network config error: Could not create the network device: {err}") from None


def bind_vsock(uds_path: str) -> int:
    """The listening socket at `uds_path` (a path that exists, or in a missing directory, fails)."""
    if len(f"{uds_path}_4294967295".encode()) > MAX_UDS_PATH:
        raise BackendError(
            f"Vsock config error: uds_path {uds_path} is too long: <uds_path>_<port> must fit a Unix socket address"
        )
    try:
        sock = listening_socket(uds_path)
    except OSError as err:
        raise BackendError(
            "Vsock config error: Cannot create backend for vsock device: "
            f"Error binding to the host-side Unix socket: {_io_error(err)}"
        ) from None
    return sock.detach()


class OpenedBackends:
    """The configured resources' open backends, by key; the one owner of those fds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self._vsock_path: str | None = None

    def put(self, key: str, fd: int) -> None:
        """Keep `fd` for `key`, closing the one it replaces."""
        with self._lock:
            old = self._fds.pop(key, None)
            self._fds[key] = fd
        _close(old)

    def release(self, key: str) -> None:
        """Close `key`'s backend (its resource is being replaced)."""
        with self._lock:
            old = self._fds.pop(key, None)
        _close(old)

    def put_vsock(self, uds_path: str) -> None:
        """Bind `uds_path`; the socket it replaces is closed and its file removed first, as
        Firecracker's VsockBuilder does, so the same path can be given again."""
        self.release_vsock()
        fd = bind_vsock(uds_path)
        with self._lock:
            self._fds[VSOCK_KEY] = fd
            self._vsock_path = uds_path

    def release_vsock(self) -> None:
        with self._lock:
            old, path = self._fds.pop(VSOCK_KEY, None), self._vsock_path
            self._vsock_path = None
        _close(old)
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def fds(self) -> dict[str, int]:
        """A copy of the key -> fd table, for the VmSpec (its planners duplicate what they use)."""
        with self._lock:
            return dict(self._fds)

    def close(self, remove_vsock_socket: bool) -> None:
        """Close every backend; the vsock socket's file is removed unless a running microVM
        now owns it (it removes it when it ends)."""
        with self._lock:
            fds, self._fds = self._fds, {}
            path, self._vsock_path = self._vsock_path, None
        for fd in fds.values():
            _close(fd)
        if path is not None and remove_vsock_socket:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def take(fds: dict[str, int], key: str) -> int | None:
    """A duplicate of the pre-opened backend `key`, or None (the planner opens it itself)."""
    fd = fds.get(key)
    return None if fd is None else os.dup(fd)
