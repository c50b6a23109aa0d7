"""The vsock worker's own control messages, registered with `shared.protocol` like the others."""

from __future__ import annotations

from shared.protocol import Message, message


@message
class VsockTransportReset(Message):
    """Supervisor -> vsock worker: drop every connection and send the guest
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (after a snapshot restore); answered with UpdateResult."""

    TYPE = "vsock_transport_reset"
    request_id: int


@message
class VsockConnect(Message):
    """vsock worker -> supervisor: the guest asks for a connection to host port `port`
    (`<uds_path>_<port>`) from its port `guest_port`. The worker has no filesystem and may
    create no socket, so the supervisor connects and answers with VsockConnected."""

    TYPE = "vsock_connect"
    port: int
    guest_port: int


@message
class VsockConnected(Message):
    """Supervisor -> vsock worker, on the fd channel: the answer to VsockConnect, with the
    connected socket when `ok`, and the id under which the supervisor keeps its own copy
    of it (0: none), so that the connection can survive the worker (VsockRelease, VsockKept)."""

    TYPE = "vsock_connected"
    port: int
    guest_port: int
    ok: bool
    sock_id: int = 0


@message
class VsockRelease(Message):
    """vsock worker -> supervisor: the worker closed these host sockets; the supervisor
    closes its copies (the host peer sees the close only then). Unknown ids are ignored."""

    TYPE = "vsock_release"
    sock_ids: list[int]


@message
class VsockKept(Message):
    """Supervisor -> a replacement vsock worker, on the fd channel before it starts: host
    sockets the supervisor kept for the dead worker's connections, by id, one fd each in
    order (at most shared.fdpass.MAX_FDS per message); `last` ends the list."""

    TYPE = "vsock_kept"
    sock_ids: list[int]
    accepted: list[int]  # those accepted at uds_path (host-initiated)
    last: bool


@message
class VsockAccepted(Message):
    """Supervisor -> vsock worker, on the fd channel: a host connection it accepted at
    uds_path (the worker reads its CONNECT line), with the id of the supervisor's copy."""

    TYPE = "vsock_accepted"
    sock_id: int
