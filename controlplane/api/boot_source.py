"""PUT /boot-source (pre-boot only)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from controlplane.api.common import counted, no_content, parse, raw_body, vmm
from controlplane.models import BootSource

router = APIRouter()


@router.put("/boot-source")
def put_boot_source(request: Request, body: bytes = Depends(raw_body)) -> Response:
    with counted(request, "put_api_requests", "boot_source"):
        vmm(request).put_boot_source(parse(BootSource, body))
    return no_content()
