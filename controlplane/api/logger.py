"""PUT /logger (pre-boot only)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from controlplane.api.common import counted, no_content, parse, raw_body, vmm
from controlplane.models import LoggerConfig

router = APIRouter()


@router.put("/logger")
def put_logger(request: Request, body: bytes = Depends(raw_body)) -> Response:
    with counted(request, "put_api_requests", "logger"):
        vmm(request).put_logger(parse(LoggerConfig, body))
    return no_content()
