"""Bodies of /drives, /network-interfaces, /vsock, /balloon and /entropy (firecracker.yaml definitions)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator

from controlplane.models._base import FcModel

U64 = Annotated[int, Field(ge=0, le=2**64 - 1)]

_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


class TokenBucket(FcModel):
    size: U64
    refill_time: U64
    one_time_burst: U64 | None = None


class RateLimiter(FcModel):
    bandwidth: TokenBucket | None = None
    ops: TokenBucket | None = None


class Drive(FcModel):
    """PUT /drives/{drive_id}: virtio-block (path_on_host) or vhost-user-block (socket)."""

    drive_id: str
    is_root_device: bool
    partuuid: str | None = None
    cache_type: Literal["Unsafe", "Writeback"] = "Unsafe"
    is_read_only: bool | None = None
    path_on_host: str | None = None
    rate_limiter: RateLimiter | None = None
    io_engine: Literal["Sync", "Async"] = "Sync"
    socket: str | None = None


class PartialDrive(FcModel):
    """PATCH /drives/{drive_id}: a new backing file and/or rate limiter, post-boot."""

    drive_id: str
    path_on_host: str | None = None
    rate_limiter: RateLimiter | None = None


class NetworkInterface(FcModel):
    """PUT /network-interfaces/{iface_id}."""

    iface_id: str
    host_dev_name: str
    guest_mac: str | None = None
    mtu: Annotated[int, Field(ge=68, le=65535)] | None = None
    rx_rate_limiter: RateLimiter | None = None
    tx_rate_limiter: RateLimiter | None = None

    @field_validator("guest_mac")
    @classmethod
    def _check_mac(cls, value: str | None) -> str | None:
        if value is not None and not _MAC.match(value):
            raise ValueError(f"invalid MAC address `{value}`: expected six hex bytes like 06:00:AC:10:00:02")
        return value


class PartialNetworkInterface(FcModel):
    """PATCH /network-interfaces/{iface_id}: rate limiters only, post-boot."""

    iface_id: str
    rx_rate_limiter: RateLimiter | None = None
    tx_rate_limiter: RateLimiter | None = None


class Vsock(FcModel):
    """PUT /vsock. `vsock_id` is deprecated but still accepted (with a Deprecation header)."""

    guest_cid: Annotated[int, Field(ge=3, le=2**32 - 1)]
    uds_path: str
    vsock_id: str | None = None


class Balloon(FcModel):
    """PUT /balloon. `free_page_reporting` is embervm's extension (off by default; docs/api.md)."""

    amount_mib: Annotated[int, Field(ge=0, le=2**32 - 1)]
    deflate_on_oom: bool
    stats_polling_interval_s: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    free_page_reporting: bool = False


class BalloonUpdate(FcModel):
    """PATCH /balloon: a new target size."""

    amount_mib: Annotated[int, Field(ge=0, le=2**32 - 1)]


class BalloonStatsUpdate(FcModel):
    """PATCH /balloon/statistics: a new polling interval."""

    stats_polling_interval_s: Annotated[int, Field(ge=0, le=2**32 - 1)]


class Entropy(FcModel):
    """PUT /entropy."""

    rate_limiter: RateLimiter | None = None
