"""PUT /restart-policy (embervm extension, pre-boot only): device-worker restart policy."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from controlplane.api.common import no_content, parse, raw_body, vmm
from controlplane.models.restart_policy import RestartPolicyBody

router = APIRouter()


@router.put("/restart-policy")
def put_restart_policy(request: Request, body: bytes = Depends(raw_body)) -> Response:
    vmm(request).put_restart_policy(parse(RestartPolicyBody, body))
    return no_content()
