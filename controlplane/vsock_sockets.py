"""The supervisor's copies of a vsock device's host stream sockets, so connections survive its worker.

As it keeps the TAP for net, the supervisor keeps every host socket it hands the vsock
worker: the ones it connects for guest-initiated connections (`VsockConnect`) and the
ones it accepts at uds_path for host-initiated ones (`VsockAccepted`): the worker gets
one fd and an id, the supervisor keeps the other fd under that id. A worker
that dies takes only its own fd with it, so the host peer sees nothing, and its
replacement gets the kept sockets back (`VsockKept`, on its fd channel before it starts)
to resume the connections its connection table describes (`devices.vsock.durable`).

The worker says when it closed a socket (`VsockRelease`); only then is the supervisor's
copy closed and the host peer sees the close. A worker is untrusted: it can only release
ids of its own device (unknown ids are ignored), and the table is bounded, so a worker
that never releases gets its connects refused once MAX_KEPT sockets are held, and nothing
grows.
"""

from __future__ import annotations

import contextlib
import socket

from devices.vsock.backend import MAX_CONNECTIONS, MAX_GUEST_CONNECTING, SO_PEEK_OFF
from devices.vsock.messages import VsockAccepted, VsockKept
from shared import fdpass

MAX_ACCEPTS_PER_TURN = 64

MAX_KEPT = MAX_CONNECTIONS + MAX_GUEST_CONNECTING  # a worker holds at most this many
HAND_OVER_TIMEOUT_S = 5.0


class KeptSockets:
    """One vsock device's kept host sockets, by id (monitor thread only)."""

    def __init__(self, limit: int = MAX_KEPT) -> None:
        self.limit = limit
        self._socks: dict[int, socket.socket] = {}
        self._accepted: set[int] = set()  # host-initiated (their CONNECT line may be unread)
        self._next_id = 1

    def __len__(self) -> int:
        return len(self._socks)

    def keep(self, sock: socket.socket) -> int:
        """Keep a duplicate of `sock` (about to be handed to the worker); its id, or 0 when
        the table is full (the caller refuses the connection). The socket's peek offset is
        switched on at 0: the worker reads host bytes with MSG_PEEK and consumes them once
        the guest has them, and the offset tells its replacement how far it got."""
        if len(self._socks) >= self.limit:
            return 0
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        sock_id = self._next_id
        self._next_id = self._next_id % 0x7FFFFFFF + 1
        while sock_id in self._socks:  # after 2^31 ids: skip the ones still held
            sock_id = self._next_id
            self._next_id = self._next_id % 0x7FFFFFFF + 1
        self._socks[sock_id] = sock.dup()
        return sock_id

    def release(self, sock_ids: list[int]) -> None:
        for sock_id in sock_ids:
            sock = self._socks.pop(sock_id, None)
            self._accepted.discard(sock_id)
            if sock is not None:
                sock.close()

    def accept(self, listener: socket.socket, channel: socket.socket | None) -> int:
        """Accept host connections at uds_path and hand each to the worker (`VsockAccepted`,
        on its fd channel; with no live worker its replacement gets them with the rest).
        Over the limit a connection is closed at once. Returns how many were accepted."""
        count = 0
        for _ in range(MAX_ACCEPTS_PER_TURN):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            with sock:
                sock.setblocking(False)
                sock_id = self.keep(sock)
                if not sock_id:
                    continue
                self._accepted.add(sock_id)
                count += 1
                if channel is not None:
                    with contextlib.suppress(OSError):  # a dying worker: its replacement gets the socket
                        fdpass.send_message(channel, VsockAccepted(sock_id), [sock.fileno()])
        return count

    def hand_over(self, channel: socket.socket) -> None:
        """Send every kept socket to a replacement worker on its fd channel (it waits for
        them before it starts), ending with `last`; OSError if it does not take them."""
        items = list(self._socks.items())
        chunks = [items[i : i + fdpass.MAX_FDS] for i in range(0, len(items), fdpass.MAX_FDS)] or [[]]
        timeout = channel.gettimeout()
        channel.settimeout(HAND_OVER_TIMEOUT_S)
        try:
            for n, chunk in enumerate(chunks):
                ids = [sock_id for sock_id, _ in chunk]
                msg = VsockKept(ids, [i for i in ids if i in self._accepted], n == len(chunks) - 1)
                fdpass.send_message(channel, msg, [sock.fileno() for _, sock in chunk])
        finally:
            channel.settimeout(timeout)

    def close(self) -> None:
        for sock in self._socks.values():
            with contextlib.suppress(OSError):
                sock.close()
        self._socks.clear()
