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
    connected socket when `ok`."""

    TYPE = "vsock_connected"
    port: int
    guest_port: int
    ok: bool
