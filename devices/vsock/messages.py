"""The vsock worker's own control message, registered with `shared.protocol` like the others."""

from __future__ import annotations

from shared.protocol import Message, message


@message
class VsockTransportReset(Message):
    """Supervisor -> vsock worker: drop every connection and send the guest
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (after a snapshot restore); answered with UpdateResult."""

    TYPE = "vsock_transport_reset"
    request_id: int
