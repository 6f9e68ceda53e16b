"""Strict, versioned event contracts (one model per record kind).

Times are Unix epoch seconds (float); durations are seconds. Sizes are
bounded so that one hostile record cannot exhaust a consumer's memory.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

SCHEMA_VERSION: Literal[1] = 1

# Identifiers appear in Kafka keys, ClickHouse rows and metric labels.
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$")]
RequestId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]
TopicName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,249}$")]
ShortText = Annotated[str, StringConstraints(max_length=1024)]
Priority = Literal["high", "normal", "low"]

MAX_PROMPT_CHARS = 512 * 1024
MAX_IMAGE_B64_CHARS = 8 * 1024 * 1024
MAX_OUTPUT_TOKENS = 65_536


def _new_id() -> str:
    return uuid.uuid4().hex


class Event(BaseModel):
    """Base of every record: strict and versioned."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        ser_json_bytes="base64",
        val_json_bytes="base64",
    )

    schema_version: Literal[1] = SCHEMA_VERSION


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)]


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1, le=1000)] = -1  # -1: disabled
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    stop: Annotated[list[ShortText], Field(max_length=8)] = []


class InferenceRequest(Event):
    request_id: RequestId = Field(default_factory=_new_id)
    tenant: Name
    model: Name
    messages: Annotated[list[ChatMessage], Field(max_length=256)] | None = None
    prompt: Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=MAX_OUTPUT_TOKENS)] = 256
    sampling: SamplingParams = SamplingParams()
    # Base64-encoded image files (JPEG/PNG); decoded by the worker.
    images: Annotated[
        list[Annotated[str, StringConstraints(max_length=MAX_IMAGE_B64_CHARS)]],
        Field(max_length=8),
    ] = []
    # Requests sharing a session key prefer the same shard (prefix cache reuse).
    session_key: Annotated[str, StringConstraints(max_length=256)] | None = None
    reply_topic: TopicName = "tw.responses"
    priority: Priority = "normal"
    submitted_at: float = Field(default_factory=time.time)  # epoch s
    # Tenant authentication: key id and HMAC-SHA256 over the canonical body.
    key_id: Annotated[str, StringConstraints(max_length=128)] | None = None
    signature: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = None

    @model_validator(mode="after")
    def _prompt_xor_messages(self) -> InferenceRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("exactly one of 'messages' or 'prompt' must be given")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' must not be empty")
        return self

    def prompt_text(self) -> str:
        """The text an engine sees, for chat or plain prompts alike."""
        if self.prompt is not None:
            return self.prompt
        return "\n".join(f"{m.role}: {m.content}" for m in self.messages or [])


class Usage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    input_tokens: Annotated[int, Field(ge=0)] = 0
    output_tokens: Annotated[int, Field(ge=0)] = 0
    cached_tokens: Annotated[int, Field(ge=0)] = 0  # input tokens served from prefix cache
    images: Annotated[int, Field(ge=0)] = 0


class Timings(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    queue_s: Annotated[float, Field(ge=0)] = 0.0  # submitted -> engine start
    ttft_s: Annotated[float, Field(ge=0)] = 0.0  # engine start -> first token
    tpot_s: Annotated[float, Field(ge=0)] = 0.0  # mean time per output token after the first
    total_s: Annotated[float, Field(ge=0)] = 0.0  # submitted -> result


class InferenceResult(Event):
    kind: Literal["result"] = "result"
    request_id: RequestId
    tenant: Name
    model: Name
    status: Literal["ok", "error"]
    text: Annotated[str, StringConstraints(max_length=4 * MAX_OUTPUT_TOKENS * 8)] = ""
    token_ids: Annotated[list[int], Field(max_length=MAX_OUTPUT_TOKENS)] = []
    finish_reason: Literal["stop", "length", "abort", "error"] | None = None
    error: ShortText | None = None
    usage: Usage = Usage()
    timings: Timings = Timings()
    worker: Name | None = None
    shard: Annotated[int, Field(ge=0)] | None = None
    completed_at: float = Field(default_factory=time.time)  # epoch s


class Rejection(Event):
    kind: Literal["rejection"] = "rejection"
    request_id: RequestId
    tenant: Name
    model: Name
    reason: Literal[
        "rate_limited", "over_capacity", "unauthenticated", "unknown_model", "invalid"
    ]
    detail: ShortText = ""
    retry_after_s: Annotated[float, Field(ge=0)] | None = None
    model_units: Annotated[float, Field(ge=0)] | None = None  # MU the request was estimated at
    rejected_at: float = Field(default_factory=time.time)  # epoch s


# What a client reads from its reply topic.
Reply = Annotated[InferenceResult | Rejection, Field(discriminator="kind")]


class UsageEvent(Event):
    request_id: RequestId  # idempotency key: a redelivered event has the same id
    tenant: Name
    model: Name
    input_tokens: Annotated[int, Field(ge=0)]
    output_tokens: Annotated[int, Field(ge=0)]
    cached_tokens: Annotated[int, Field(ge=0)] = 0
    images: Annotated[int, Field(ge=0)] = 0
    model_units: Annotated[float, Field(ge=0)]  # MU actually consumed
    status: Literal["ok", "error", "abort"] = "ok"
    queue_s: Annotated[float, Field(ge=0)] = 0.0
    ttft_s: Annotated[float, Field(ge=0)] = 0.0
    tpot_s: Annotated[float, Field(ge=0)] = 0.0
    worker: Name
    shard: Annotated[int, Field(ge=0)]
    finished_at: float = Field(default_factory=time.time)  # epoch s


class ProbeResult(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    ok: bool
    latency_s: Annotated[float, Field(ge=0)]
    at: float  # epoch s
    error: ShortText | None = None


class WorkerHeartbeat(Event):
    worker: Name
    model: Name
    engine: Name
    seq: Annotated[int, Field(ge=0)]  # increases by one per beat of this worker process
    shards: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=4096)] = []
    engine_state: Literal["starting", "ready", "draining", "failed"]
    in_flight: Annotated[int, Field(ge=0)] = 0  # requests
    in_flight_mu: Annotated[float, Field(ge=0)] = 0.0  # MU
    queued: Annotated[int, Field(ge=0)] = 0  # requests fetched, not started
    capacity_mu_per_min: Annotated[float, Field(ge=0)] = 0.0  # MU/min
    tokens_since_last: Annotated[int, Field(ge=0)] = 0  # output tokens since previous beat
    probe: ProbeResult | None = None
    sent_at: float = Field(default_factory=time.time)  # epoch s


class ScaleDecision(Event):
    decision_id: RequestId = Field(default_factory=_new_id)
    model: Name
    current: Annotated[int, Field(ge=0)]  # replicas
    desired: Annotated[int, Field(ge=0)]  # replicas
    reason: ShortText
    demand_stable_mu_per_min: Annotated[float, Field(ge=0)] = 0.0
    demand_panic_mu_per_min: Annotated[float, Field(ge=0)] = 0.0
    utilisation: Annotated[float, Field(ge=0)] = 0.0  # MU in flight / live capacity
    decided_at: float = Field(default_factory=time.time)  # epoch s


HealthState = Literal["healthy", "suspect", "unhealthy"]


class HealthEvent(Event):
    event_id: RequestId = Field(default_factory=_new_id)
    worker: Name
    model: Name
    previous: HealthState | None
    state: HealthState
    reason: ShortText
    at: float = Field(default_factory=time.time)  # epoch s


class Alert(Event):
    alert_id: RequestId = Field(default_factory=_new_id)
    rule: Name
    subject: Annotated[str, StringConstraints(max_length=256)]
    severity: Literal["info", "warning", "critical"]
    message: ShortText
    value: float | None = None
    threshold: float | None = None
    fired_at: float = Field(default_factory=time.time)  # epoch s


class DeadLetter(Event):
    """A record that could not be used, kept whole with why and where from."""

    raw: Annotated[bytes, Field(max_length=16 * 1024 * 1024)]  # base64 in JSON
    key: Annotated[bytes, Field(max_length=64 * 1024)] | None = None
    reason: Annotated[str, StringConstraints(max_length=4096)]
    origin_topic: TopicName
    origin_partition: Annotated[int, Field(ge=0)]
    origin_offset: Annotated[int, Field(ge=0)]
    consumer: Name
    at: float = Field(default_factory=time.time)  # epoch s


class TenantUsage(Event):
    """Live metering of one tenant against its limits (compacted, key tenant)."""

    tenant: Name
    limit_mu_per_min: float  # MU/min
    burst_mu: float  # MU
    reservation_mu_per_min: float  # MU/min
    bucket_mu: float  # MU available now; negative is debt
    charged_mu: float  # Σ charged since the state began
    actual_mu: float  # Σ actual MU reported by workers
    pending: int  # requests admitted and not yet settled
    admitted: int
    rejected: int
    mu_last_minute: dict[str, float] = {}  # model -> MU in the current 1-minute window
    mu_last_10s: dict[str, float] = {}  # model -> MU in the current 10 s hopping window
    at: float = Field(default_factory=time.time)  # epoch s


ALL_EVENTS: tuple[type[Event], ...] = (
    TenantUsage,
    InferenceRequest,
    InferenceResult,
    Rejection,
    UsageEvent,
    WorkerHeartbeat,
    ScaleDecision,
    HealthEvent,
    Alert,
    DeadLetter,
)
