"""PUT /actions: InstanceStart, SendCtrlAltDel, FlushMetrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from controlplane.api.common import counted, no_content, parse, raw_body, vmm
from controlplane.models import InstanceActionInfo

router = APIRouter()


@router.put("/actions")
def put_actions(request: Request, body: bytes = Depends(raw_body)) -> Response:
    with counted(request, "put_api_requests", "actions"):
        action = parse(InstanceActionInfo, body).action_type
        state = vmm(request)
        if action == "InstanceStart":
            state.start()
        elif action == "SendCtrlAltDel":
            state.send_ctrl_alt_del()
        else:
            state.flush_metrics()
    return no_content()
