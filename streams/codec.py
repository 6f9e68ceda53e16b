"""Bytes <-> pydantic events."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from schemas.events import SCHEMA_VERSION
from streams import DecodeError

T = TypeVar("T")

MAX_REASON_CHARS = 2000


def encode(event: BaseModel) -> bytes:
    return event.model_dump_json().encode()


def decode(raw: bytes | None, adapter: TypeAdapter[T]) -> T:
    """Validate one record strictly; raise :class:`DecodeError` with a readable reason."""
    if raw is None:
        raise DecodeError("empty record (null value)")
    try:
        return adapter.validate_json(raw, strict=True)
    except ValidationError as exc:
        raise DecodeError(_reason(raw, exc)) from exc


def _reason(raw: bytes, exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    if errors and errors[0]["type"] == "json_invalid":
        return f"invalid JSON: {errors[0]['msg']}"
    version = _schema_version(raw)
    if version is not None and version != SCHEMA_VERSION:
        return f"unsupported schema_version {version!r} (this consumer reads {SCHEMA_VERSION})"
    parts = [f"{'.'.join(str(p) for p in e['loc']) or '<record>'}: {e['msg']}" for e in errors]
    return ("invalid event: " + "; ".join(parts))[:MAX_REASON_CHARS]


def _schema_version(raw: bytes) -> Any:
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc.get("schema_version") if isinstance(doc, dict) else None
