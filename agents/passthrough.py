"""Backbone pass-through admission: validate, then forward to the model's shard topic.

Stands in for the real admission agent (limits, reservations, cost routing)
until that lands; it already has the agent's shape: a pure decision class and
a Faust shell that applies its decisions.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Literal

import faust
from pydantic import BaseModel, ConfigDict, TypeAdapter

from schemas.config import Settings
from schemas.events import InferenceRequest, Rejection
from streams.app import FaustEventSink, consume_in_batches, raw_topic
from streams.deadletter import decode_or_dead_letter
from streams.sink import EventSink
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


async def _nothing() -> None:
    """The pass-through agent keeps no state: nothing to write per batch."""


def register(app: faust.App, settings: Settings) -> None:
    policy = PassThroughPolicy(settings.models, settings.shard_partitions)
    sink = FaustEventSink(app)

    async def forward(event: faust.EventT) -> None:
        msg = event.message
        request = await decode_or_dead_letter(
            sink, _REQUEST, raw=msg.value, key=msg.key, topic=msg.topic,
            partition=msg.partition, offset=msg.offset, consumer="passthrough",
        )
        if request is not None:
            await apply(sink, request, policy.decide(request))

    @app.agent(raw_topic(app, REQUESTS), name="tokenweir.passthrough")
    async def passthrough(stream: faust.StreamT[bytes]) -> None:
        # Driven like the admission agent, so that comparing the two measures
        # admission's own work, not a different way of driving Kafka.
        await consume_in_batches(stream, forward, _nothing, sink.flush)
