"""Binding the API's Unix socket, refusing a path another process serves.

Kept apart from `controlplane.server` so that `--no-api` runs never import uvicorn
or FastAPI (most of a cold start's time).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

LISTEN_BACKLOG = 128


class SocketInUseError(OSError):
    """The API socket path is taken; the message says by what."""


def bind_unix_socket(path: str) -> socket.socket:
    """Bind and listen on `path`, refusing a path another process is serving."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise SocketInUseError(errno.EADDRINUSE, f"Failed to open the API socket at {path}: not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale: nobody listens there any more
        else:
            raise SocketInUseError(
                errno.EADDRINUSE, f"Failed to open the API socket at {path}: it is already in use by another process"
            )
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(LISTEN_BACKLOG)
    except OSError as err:
        sock.close()
        raise SocketInUseError(err.errno, f"Failed to open the API socket at {path}: {err.strerror}") from None
    return sock


def release_unix_socket(sock: socket.socket, path: str) -> None:
    """Close a socket `bind_unix_socket` made (uvicorn may have closed it) and remove its path."""
    sock.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
