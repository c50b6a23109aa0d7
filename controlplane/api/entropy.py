"""PUT /entropy (pre-boot only)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from controlplane.api.common import no_content, parse, raw_body, vmm
from controlplane.models import Entropy

router = APIRouter()


@router.put("/entropy")
def put_entropy(request: Request, body: bytes = Depends(raw_body)) -> Response:
    vmm(request).put_entropy(parse(Entropy, body))
    return no_content()
