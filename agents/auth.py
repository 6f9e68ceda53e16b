"""Tenant authentication at admission. Pure."""

from __future__ import annotations

import hmac

from schemas.events import InferenceRequest
from schemas.signing import signature
from schemas.tenancy import ControlPlaneConfig


def authenticate(request: InferenceRequest, config: ControlPlaneConfig) -> str | None:
    """None when the request may proceed, else why it is refused."""
    if not config.auth_required:
        return None
    if request.key_id is None or request.signature is None:
        return "request is not signed (key_id and signature are required)"
    key = config.keys.get(request.key_id)
    if key is None:
        return f"unknown key id {request.key_id!r}"
    if not hmac.compare_digest(signature(request, key.secret), request.signature):
        return "signature does not match the request body"
    if key.tenant != request.tenant:
        return f"key {request.key_id!r} does not belong to tenant {request.tenant!r}"
    return None
