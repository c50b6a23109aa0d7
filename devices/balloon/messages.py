"""The balloon worker's own control messages, registered with `shared.protocol` like the others."""

from __future__ import annotations

from shared.protocol import Message, message


@message
class UpdateBalloon(Message):
    """Supervisor -> balloon worker: a new target size in 4 KiB pages (PATCH /balloon);
    answered with UpdateResult (refused while the guest's driver has not activated the device)."""

    TYPE = "update_balloon"
    request_id: int
    target_pages: int


@message
class UpdateBalloonStats(Message):
    """Supervisor -> balloon worker: a new statistics polling interval (PATCH
    /balloon/statistics; the supervisor enforces Firecracker's rule that statistics cannot be
    turned on or off after boot); answered with UpdateResult."""

    TYPE = "update_balloon_stats"
    request_id: int
    interval_s: int


@message
class BalloonStatus(Message):
    """Balloon worker -> supervisor, whenever it changes: the `actual` field of the config
    space (what the guest says it holds) and the latest statistics by Firecracker's names.
    Untrusted: the supervisor checks every value (`controlplane.balloon`)."""

    TYPE = "balloon_status"
    actual_pages: int
    stats: dict[str, int]
