"""Firecracker-compatible REST API: one module per resource, `create_app` wires them."""

from controlplane.api.app import create_app

__all__ = ["create_app"]
