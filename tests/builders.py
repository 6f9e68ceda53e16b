"""Builders for test events: ``make_request(**overrides)`` and friends."""

from __future__ import annotations

import json
from typing import Any

from schemas.events import InferenceRequest, InferenceResult, UsageEvent


def request_doc(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"tenant": "acme", "model": "tiny-llama", "prompt": "hello there world"}
    doc.update(overrides)
    return doc


def request_json(**overrides: Any) -> bytes:
    return json.dumps(request_doc(**overrides)).encode()


def make_request(**overrides: Any) -> InferenceRequest:
    return InferenceRequest(**request_doc(**overrides))


def make_result(**overrides: Any) -> InferenceResult:
    fields: dict[str, Any] = {"request_id": "r-1", "tenant": "acme", "model": "tiny-llama",
                              "status": "ok", "text": "hi", "token_ids": [1]}
    fields.update(overrides)
    return InferenceResult(**fields)


def make_usage(**overrides: Any) -> UsageEvent:
    fields: dict[str, Any] = {"request_id": "r-1", "tenant": "acme", "model": "tiny-llama",
                              "input_tokens": 10, "output_tokens": 5, "model_units": 0.06,
                              "worker": "w-1", "shard": 0, "finished_at": 1_790_000_000.0}
    fields.update(overrides)
    return UsageEvent(**fields)


def malformed_requests(n: int) -> list[tuple[str, bytes]]:
    """``n`` bad records cycling through the kinds of damage, each with its expected reason."""
    kinds: list[tuple[str, bytes]] = [
        ("invalid JSON", b'{"tenant": "acme", "model": '),
        ("invalid JSON", b"\xff\xfe not json at all"),
        ("Input should be a valid string", request_json(tenant=42)),
        ("Input should be a valid integer", request_json(max_tokens="64")),
        ("String should match pattern", request_json(tenant="x" * 5000)),
        ("at most 256 items", request_json(
            messages=[{"role": "user", "content": "x"}] * 300, prompt=None)),
        ("unsupported schema_version 2", request_json(schema_version=2)),
        ("Extra inputs are not permitted", request_json(extra_field=1)),
        ("exactly one of 'messages' or 'prompt'", request_json(prompt=None)),
    ]
    return [kinds[i % len(kinds)] for i in range(n)]


def make_heartbeat(**overrides: Any):  # type: ignore[no-untyped-def]
    from schemas.events import WorkerHeartbeat

    fields: dict[str, Any] = {"worker": "w-1", "model": "tiny-llama", "engine": "sim", "seq": 1,
                              "shards": [0, 1, 2, 3], "engine_state": "ready",
                              "capacity_mu_per_min": 6000.0, "sent_at": 1000.0}
    fields.update(overrides)
    return WorkerHeartbeat(**fields)


def make_tenant(**overrides: Any):  # type: ignore[no-untyped-def]
    from schemas.tenancy import TenantConfig

    fields: dict[str, Any] = {"limit_mu_per_min": 60.0, "burst_mu": 10.0}
    fields.update(overrides)
    return TenantConfig(**fields)


SECRET = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"


def make_config(**overrides: Any):  # type: ignore[no-untyped-def]
    from schemas.tenancy import ApiKey, ControlPlaneConfig

    fields: dict[str, Any] = {"auth_required": False,
                              "tenants": {"acme": make_tenant()},
                              "keys": {"k-acme": ApiKey(tenant="acme", secret=SECRET)}}
    fields.update(overrides)
    return ControlPlaneConfig(**fields)
