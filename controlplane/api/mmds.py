"""GET, PUT and PATCH /mmds (any time) and PUT /mmds/config (pre-boot only)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request, Response

from controlplane.api.common import counted, no_content, ok, parse, raw_body, vmm
from controlplane.mmds_store import MmdsError
from controlplane.models import DESERIALIZE_PREFIX, MmdsConfig
from controlplane.state import ApiError

router = APIRouter()


def _json(body: bytes) -> object:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(f"{DESERIALIZE_PREFIX}{err}.") from None


@router.get("/mmds")
def get_mmds(request: Request) -> Response:
    with counted(request, "get_api_requests", "mmds"):
        return ok(vmm(request).mmds.get())


@router.put("/mmds")
def put_mmds(request: Request, body: bytes = Depends(raw_body)) -> Response:
    with counted(request, "put_api_requests", "mmds"):
        try:
            vmm(request).mmds.put(_json(body))
        except MmdsError as err:
            raise ApiError(str(err), err.status) from None
    return no_content()


@router.patch("/mmds")
def patch_mmds(request: Request, body: bytes = Depends(raw_body)) -> Response:
    with counted(request, "patch_api_requests", "mmds"):
        try:
            vmm(request).mmds.patch(_json(body))
        except MmdsError as err:
            raise ApiError(str(err), err.status) from None
    return no_content()


@router.put("/mmds/config")
def put_mmds_config(request: Request, body: bytes = Depends(raw_body)) -> Response:
    with counted(request, "put_api_requests", "mmds"):
        vmm(request).put_mmds_config(parse(MmdsConfig, body))
    return no_content()
