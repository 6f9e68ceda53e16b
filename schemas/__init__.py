"""Event contracts and configuration models of tokenweir.

Every record on a tokenweir topic is one of the models in
:mod:`schemas.events`; they are strict (unknown fields rejected, no type
coercion, bounded sizes) and carry a ``schema_version``.
"""

from schemas.errors import SchemaError
from schemas.events import (
    SCHEMA_VERSION,
    Alert,
    ChatMessage,
    DeadLetter,
    HealthEvent,
    InferenceRequest,
    InferenceResult,
    ProbeResult,
    Rejection,
    Reply,
    SamplingParams,
    ScaleDecision,
    Timings,
    Usage,
    UsageEvent,
    WorkerHeartbeat,
)

__all__ = [
    "SCHEMA_VERSION",
    "Alert",
    "ChatMessage",
    "DeadLetter",
    "HealthEvent",
    "InferenceRequest",
    "InferenceResult",
    "ProbeResult",
    "Rejection",
    "Reply",
    "SamplingParams",
    "ScaleDecision",
    "SchemaError",
    "Timings",
    "Usage",
    "UsageEvent",
    "WorkerHeartbeat",
]
