"""PUT /network-interfaces/{iface_id} (pre-boot) and PATCH (post-boot, rate limiters)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from controlplane.api.common import checked_id, counted, no_content, parse, raw_body, vmm
from controlplane.models import NetworkInterface, PartialNetworkInterface
from controlplane.state import ApiError

router = APIRouter()


def same_iface_id(path_id: str, body_id: str) -> None:
    """Firecracker's network wording names both ids (its drive wording does not)."""
    if path_id != body_id:
        raise ApiError(f"The id from the path [{path_id}] does not match the id from the body [{body_id}]!")


@router.put("/network-interfaces/{iface_id}")
def put_network_interface(iface_id: str, request: Request, body: bytes = Depends(raw_body)) -> Response:
    with counted(request, "put_api_requests", "network"):
        checked_id(iface_id)
        iface = parse(NetworkInterface, body)
        same_iface_id(iface_id, iface.iface_id)
        vmm(request).put_network_interface(iface)
    return no_content()


@router.patch("/network-interfaces/{iface_id}")
def patch_network_interface(iface_id: str, request: Request, body: bytes = Depends(raw_body)) -> Response:
    with counted(request, "patch_api_requests", "network"):
        checked_id(iface_id)
        update = parse(PartialNetworkInterface, body)
        same_iface_id(iface_id, update.iface_id)
        vmm(request).patch_network_interface(update)
    return no_content()


@router.put("/network-interfaces")
def put_network_interface_without_id(request: Request) -> Response:
    with counted(request, "put_api_requests", "network"):
        raise ApiError("The ID cannot be empty.")


@router.patch("/network-interfaces")
def patch_network_interface_without_id(request: Request) -> Response:
    with counted(request, "patch_api_requests", "network"):
        raise ApiError("The ID cannot be empty.")
