"""Request signing, part of the contract: HMAC-SHA256 over the canonical body.

The canonical body is the validated request as JSON with keys sorted, no
whitespace and no ``signature`` field. Producers in other languages must
therefore send every field that has a generated default (``request_id``,
``submitted_at``) explicitly, and sign exactly what they send plus the
documented defaults (see the JSON Schema from ``tokenweir schemas export``).
"""

from __future__ import annotations

import hashlib
import hmac
import json

from schemas.events import InferenceRequest


def canonical_body(request: InferenceRequest) -> bytes:
    doc = request.model_dump(mode="json", exclude={"signature"})
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def signature(request: InferenceRequest, secret_hex: str) -> str:
    return hmac.new(bytes.fromhex(secret_hex), canonical_body(request), hashlib.sha256).hexdigest()


def sign(request: InferenceRequest, key_id: str, secret_hex: str) -> InferenceRequest:
    unsigned = request.model_copy(update={"key_id": key_id, "signature": None})
    return unsigned.model_copy(update={"signature": signature(unsigned, secret_hex)})


class Signer:
    """Signs each request with its tenant's key: ``{tenant: (key_id, secret_hex)}``."""

    def __init__(self, keys: dict[str, tuple[str, str]]) -> None:
        self._keys = keys

    def __call__(self, request: InferenceRequest) -> InferenceRequest:
        found = self._keys.get(request.tenant)
        return request if found is None else sign(request, *found)
