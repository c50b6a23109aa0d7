"""PUT /vsock (pre-boot only); `vsock_id` is deprecated but accepted."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from controlplane.api.common import counted, deprecated, no_content, parse, raw_body, vmm
from controlplane.models import Vsock

router = APIRouter()


@router.put("/vsock")
def put_vsock(request: Request, body: bytes = Depends(raw_body)) -> Response:
    with counted(request, "put_api_requests", "vsock"):
        config = parse(Vsock, body)
        vmm(request).put_vsock(config)
    if config.vsock_id is not None:
        deprecated(request, "vsock_id field")
    return no_content(deprecated=config.vsock_id is not None)
