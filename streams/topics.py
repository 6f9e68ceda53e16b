"""The topic registry: every topic tokenweir uses, with its key and retention."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from schemas.config import Settings

REQUESTS = "tw.requests"
RESPONSES = "tw.responses"
USAGE = "tw.usage"
HEARTBEATS = "tw.heartbeats"
SCALE = "tw.scale"
HEALTH = "tw.health"
ALERTS = "tw.alerts"
DLQ = "tw.dlq"
CONFIG = "tw.config"
METERING = "tw.metering"
DEMAND = "tw.demand"  # the autoscaler's DemandWindows (agents.autoscaler)

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


# Header on routed requests: the MU admission reserved for the request.
RESERVED_MU_HEADER = "tw-reserved-mu"

# The admission agent's changelog (agents.ledger), co-partitioned with tw.requests / tw.usage.
LEDGER = "tw.ledger"


def shard_topic(model: str) -> str:
    return f"tw.shard.{model}"


class TopicSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    partitions: Annotated[int, Field(ge=1)]
    key: str  # what the record key is; co-partitioned topics share key and count
    retention_ms: int | None = None  # None with compacted=True: keep latest per key forever
    compacted: bool = False
    segment_bytes: int | None = None  # roll a segment at this size; None: broker default
    segment_ms: int | None = None  # ... or at this age
    value: str  # the schemas model carried

    def configs(self) -> dict[str, str]:
        if self.compacted:
            configs = {"cleanup.policy": "compact"}
            if self.segment_bytes is not None:
                configs["segment.bytes"] = str(self.segment_bytes)
            if self.segment_ms is not None:
                configs["segment.ms"] = str(self.segment_ms)
            return configs
        return {"cleanup.policy": "delete", "retention.ms": str(self.retention_ms)}


def registry(settings: Settings) -> list[TopicSpec]:
    """All topics, derived from configuration (one shard topic per model)."""
    tenants = settings.tenant_partitions
    topics = [
        # Co-partitioned: the agent owning a tenant's bucket also gets its usage.
        TopicSpec(name=REQUESTS, partitions=tenants, key="tenant", retention_ms=DAY_MS,
                  value="InferenceRequest"),
        TopicSpec(name=USAGE, partitions=tenants, key="tenant", retention_ms=7 * DAY_MS,
                  value="UsageEvent"),
        TopicSpec(name=RESPONSES, partitions=settings.reply_partitions, key="request_id",
                  retention_ms=DAY_MS, value="InferenceResult | Rejection"),
        # One partition: every router and the health agent need every worker's beats.
        TopicSpec(name=HEARTBEATS, partitions=1, key="worker", retention_ms=HOUR_MS,
                  value="WorkerHeartbeat"),
        TopicSpec(name=SCALE, partitions=1, key="model", retention_ms=7 * DAY_MS,
                  value="ScaleDecision"),
        # One partition: the decide step replays one ordered log to rebuild its state.
        TopicSpec(name=DEMAND, partitions=1, key="model", retention_ms=DAY_MS,
                  value="DemandWindow (agents.scaling)"),
        TopicSpec(name=HEALTH, partitions=1, key="worker", retention_ms=7 * DAY_MS,
                  value="HealthEvent"),
        TopicSpec(name=ALERTS, partitions=1, key="rule/subject", retention_ms=30 * DAY_MS,
                  value="Alert"),
        TopicSpec(name=DLQ, partitions=1, key="origin topic", retention_ms=30 * DAY_MS,
                  value="DeadLetter"),
        TopicSpec(name=CONFIG, partitions=1, key="config section", compacted=True,
                  value="config document"),
        TopicSpec(name=METERING, partitions=1, key="tenant", compacted=True,
                  value="TenantUsage"),
    ]
    # Compacted; small segments so that compaction (which never touches the active
    # segment) keeps what a restarted agent reads back close to one record per key.
    topics.append(TopicSpec(name=LEDGER, partitions=tenants, key="t/<tenant> or r/<request id>",
                            compacted=True, segment_bytes=16 * 1024 * 1024, segment_ms=10 * 60_000,
                            value="TenantState | Reservation (agents.ledger)"))
    topics += [
        TopicSpec(name=shard_topic(model), partitions=settings.shard_partitions,
                  key="session or request id (partition chosen by the router)",
                  retention_ms=DAY_MS, value="InferenceRequest")
        for model in settings.models
    ]
    return topics
