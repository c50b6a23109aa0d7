"""Control messages that carry file descriptors, over a SOCK_SEQPACKET Unix socket.

ZeroMQ cannot move fds, so each device worker also gets one end of a socketpair (its
"fd channel") at spawn. A message on it is one `shared.protocol` message plus up to
`MAX_FDS` fds (SCM_RIGHTS). The receiver owns the fds it gets, including on errors:
`recv_message` closes them before it raises, so a bad sender cannot leak fds into us.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Sequence

from shared import protocol as p

MAX_FDS = 4


class FdChannelError(Exception):
    """The peer sent something that is not a valid message with at most MAX_FDS fds."""


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(supervisor end, worker end); message boundaries are kept (SEQPACKET)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send_message(sock: socket.socket, msg: p.Message, fds: Sequence[int] = ()) -> None:
    """Send `msg` with `fds` (the sender keeps its own copies and closes them itself)."""
    if len(fds) > MAX_FDS:
        raise ValueError(f"at most {MAX_FDS} fds per message, got {len(fds)}")
    socket.send_fds(sock, [p.encode(msg)], list(fds))


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def recv_message(sock: socket.socket) -> tuple[p.Message, list[int]] | None:
    """The next message and its fds, or None when the peer closed the channel."""
    data, fds, flags, _ = socket.recv_fds(sock, p.MAX_MESSAGE_BYTES, MAX_FDS)
    if not data and not fds:
        return None
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        _close_all(fds)
        raise FdChannelError("fd channel message or its fds were truncated")
    try:
        return p.decode(data), fds
    except p.ProtocolError as e:
        _close_all(fds)
        raise FdChannelError(str(e)) from e
