"""Firecracker resources embervm does not implement: a clear 400, not a generic path error."""

from __future__ import annotations

from fastapi import APIRouter, Request

from controlplane.state import ApiError

router = APIRouter()

_RESOURCES = {
    "/balloon/hinting/start": "free page hinting (free page reporting is embervm's `free_page_reporting`)",
    "/balloon/hinting/status": "free page hinting (free page reporting is embervm's `free_page_reporting`)",
    "/balloon/hinting/stop": "free page hinting (free page reporting is embervm's `free_page_reporting`)",
    "/pmem/{pmem_id}": "pmem devices",
    "/serial": "serial console configuration",
    "/hotplug/memory": "memory hotplug",
}


def _refuse(request: Request) -> None:
    what = _RESOURCES[request.scope["route"].path]
    raise ApiError(f"The requested operation is not supported: {what} (not implemented by embervm).")


for _path in _RESOURCES:
    router.add_api_route(_path, _refuse, methods=["GET", "PUT", "PATCH"], include_in_schema=False)
