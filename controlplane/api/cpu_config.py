"""PUT /cpu-config: a custom CPU template (pre-boot only)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from controlplane.api.common import counted, no_content, parse, raw_body, vmm
from controlplane.models import CpuConfig

router = APIRouter()


@router.put("/cpu-config")
def put_cpu_config(request: Request, body: bytes = Depends(raw_body)) -> Response:
    with counted(request, "put_api_requests", "cpu_cfg"):
        vmm(request).put_cpu_config(parse(CpuConfig, body))
    return no_content()
