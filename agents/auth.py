"""Tenant authentication: HMAC-SHA256 over a request's canonical body. Pure."""

from __future__ import annotations

import hashlib
import hmac
import json

from schemas.events import InferenceRequest
from schemas.tenancy import ControlPlaneConfig


def canonical_body(request: InferenceRequest) -> bytes:
    """The request as sorted, compact JSON without its signature: what is signed."""
    doc = request.model_dump(mode="json", exclude={"signature"})
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def signature(request: InferenceRequest, secret_hex: str) -> str:
    return hmac.new(bytes.fromhex(secret_hex), canonical_body(request), hashlib.sha256).hexdigest()


def sign(request: InferenceRequest, key_id: str, secret_hex: str) -> InferenceRequest:
    unsigned = request.model_copy(update={"key_id": key_id, "signature": None})
    return unsigned.model_copy(update={"signature": signature(unsigned, secret_hex)})


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
