"""Backbone pass-through admission: validate, then forward to the model's shard topic.

The baseline the admission agent is measured against (``bench.admission``):
the same shape, a pure decision class and a shell that applies its decisions,
without authentication, limits or state.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Literal

from aiokafka import TopicPartition
from pydantic import BaseModel, ConfigDict, TypeAdapter

from schemas.config import Settings
from schemas.events import InferenceRequest, Rejection
from streams.consumer import Record
from streams.copartition import CopartitionedLoop, Write, group_consumer
from streams.deadletter import decode_or_dead_letter
from streams.sink import EventSink, KafkaEventSink
from streams.topics import REQUESTS, shard_topic

log = logging.getLogger(__name__)
_REQUEST: TypeAdapter[InferenceRequest] = TypeAdapter(InferenceRequest)


class Forward(BaseModel):
    model_config = ConfigDict(frozen=True)

    action: Literal["forward"] = "forward"
    topic: str
    partition: int  # shard


class PassThroughPolicy:
    """(request) -> Forward or Rejection. Shard = stable hash of session or request id."""

    def __init__(self, models: list[str], shard_partitions: int) -> None:
        self._models = frozenset(models)
        self._shards = shard_partitions

    def decide(self, request: InferenceRequest) -> Forward | Rejection:
        if request.model not in self._models:
            return Rejection(
                request_id=request.request_id, tenant=request.tenant, model=request.model,
                reason="unknown_model",
                detail=f"model {request.model!r} is not served here; known: "
                       f"{sorted(self._models)}",
            )
        sticky = (request.session_key or request.request_id).encode()
        shard = int.from_bytes(hashlib.blake2b(sticky, digest_size=8).digest()) % self._shards
        return Forward(topic=shard_topic(request.model), partition=shard)


async def apply(sink: EventSink, request: InferenceRequest, decision: Forward | Rejection) -> None:
    if isinstance(decision, Rejection):
        await sink.send(request.reply_topic, decision, key=request.request_id)
    else:
        await sink.send(decision.topic, request, key=request.request_id,
                        partition=decision.partition)


class PassThroughAgent:
    """Driven by the same loop as the admission agent, so that comparing the two measures
    admission's own work, not a different way of driving Kafka. Keeps no state."""

    def __init__(self, policy: PassThroughPolicy, sink: EventSink) -> None:
        self._policy = policy
        self._sink = sink

    async def assigned(self, numbers: set[int]) -> None:
        """Nothing to restore."""

    def revoked(self, numbers: set[int]) -> None:
        """Nothing to drop."""

    def seal(self) -> Write | None:
        """Nothing to write per batch."""
        return None

    async def handle(self, tp: TopicPartition, records: list[Record]) -> None:
        for record in records:
            request = await decode_or_dead_letter(
                self._sink, _REQUEST, raw=record.value, key=record.key, topic=record.topic,
                partition=record.partition, offset=record.offset, consumer="passthrough")
            if request is not None:
                await apply(self._sink, request, self._policy.decide(request))


async def run_passthrough(settings: Settings, stop: asyncio.Event) -> None:
    sink = KafkaEventSink(settings.bootstrap, client_id="tokenweir-passthrough")
    await sink.start()
    agent = PassThroughAgent(PassThroughPolicy(settings.models, settings.shard_partitions), sink)
    consumer = group_consumer(settings.bootstrap, settings.app_id,
                              client_id="tokenweir-passthrough")
    try:
        await consumer.start()
        await CopartitionedLoop(consumer, [REQUESTS], agent, sink).run(stop)
    finally:
        await consumer.stop()
        await sink.stop()
