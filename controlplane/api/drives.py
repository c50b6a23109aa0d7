"""PUT /drives/{drive_id} (pre-boot) and PATCH /drives/{drive_id} (post-boot)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from controlplane.api.common import checked_id, counted, no_content, parse, raw_body, same_id, vmm
from controlplane.models import Drive, PartialDrive
from controlplane.state import ApiError

router = APIRouter()


@router.put("/drives/{drive_id}")
def put_drive(drive_id: str, request: Request, body: bytes = Depends(raw_body)) -> Response:
    with counted(request, "put_api_requests", "drive"):
        checked_id(drive_id)
        drive = parse(Drive, body)
        same_id(drive_id, drive.drive_id)
        vmm(request).put_drive(drive)
    return no_content()


@router.patch("/drives/{drive_id}")
def patch_drive(drive_id: str, request: Request, body: bytes = Depends(raw_body)) -> Response:
    with counted(request, "patch_api_requests", "drive"):
        checked_id(drive_id)
        update = parse(PartialDrive, body)
        same_id(drive_id, update.drive_id)
        vmm(request).patch_drive(update)
    return no_content()


@router.put("/drives")
def put_drive_without_id(request: Request) -> Response:
    with counted(request, "put_api_requests", "drive"):
        raise ApiError("The ID cannot be empty.")


@router.patch("/drives")
def patch_drive_without_id(request: Request) -> Response:
    with counted(request, "patch_api_requests", "drive"):
        raise ApiError("The ID cannot be empty.")
