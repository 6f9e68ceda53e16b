"""A trace-driven fleet for replays: real Kafka consumer and producer, no engine.

It consumes a model's shards like workers do, answers each request with the
output length the trace says it had, emits the UsageEvent (MU from the cost
model) and announces its shards and capacity in heartbeats, as ``replicas``
virtual workers. Replays use it to drive the real agents at trace scale
without running an engine.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiokafka import AIOKafkaConsumer
from pydantic import TypeAdapter

from agents.estimator import CostEstimator
from schemas.cost import CostModel
from schemas.events import (
    InferenceRequest,
    InferenceResult,
    Usage,
    UsageEvent,
    WorkerHeartbeat,
)
from streams.codec import decode
from streams.sink import KafkaEventSink
from streams.topics import HEARTBEATS, RESERVED_MU_HEADER, USAGE, shard_topic

_REQUEST: TypeAdapter[InferenceRequest] = TypeAdapter(InferenceRequest)


class TraceFleet:
    def __init__(self, bootstrap: str, model: str, shards: int, *, cost: CostModel,
                 outputs: dict[str, int], replicas: int, capacity_mu_per_min: float) -> None:
        self.model = model
        self._bootstrap = bootstrap
        self._shards = shards
        self._cost = cost
        self._outputs = outputs  # request id -> output tokens the trace says it produced
        self._replicas = replicas
        self._capacity = capacity_mu_per_min
        self._sink = KafkaEventSink(bootstrap, client_id="trace-fleet")
        self._estimator = CostEstimator()  # no tokenizer: the documented approximation
        self.admitted_at: dict[str, float] = {}  # request id -> epoch s first routed
        self.shard_of: dict[str, int] = {}
        self.reserved_mu: dict[str, float] = {}  # request id -> MU admission reserved
        self.redelivered = 0

    def _owners(self) -> list[list[int]]:
        return [list(range(i, self._shards, self._replicas)) for i in range(self._replicas)]

    async def run(self, stop: asyncio.Event) -> None:
        await self._sink.start()
        consumer = AIOKafkaConsumer(shard_topic(self.model), bootstrap_servers=self._bootstrap,
                                    group_id=f"tw.worker.{self.model}",
                                    enable_auto_commit=False, auto_offset_reset="earliest",
                                    max_partition_fetch_bytes=16 * 1024 * 1024)
        await consumer.start()
        beats = asyncio.create_task(self._beat(stop))
        try:
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=100, max_records=500)
                records = [r for rs in batches.values() for r in rs]
                for record in records:
                    # The record's timestamp is when the admission agent produced it:
                    # the admission time that per-minute limits are checked against.
                    reserved = dict(record.headers or []).get(RESERVED_MU_HEADER)
                    await self._serve(decode(record.value, _REQUEST), record.partition,
                                      record.timestamp / 1000.0,
                                      float(reserved) if reserved else None)
                if records:
                    await self._sink.flush()
                    await consumer.commit()
        finally:
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats
            await consumer.stop()
            await self._sink.stop()

    async def _serve(self, request: InferenceRequest, shard: int, admitted_at: float,
                     reserved_mu: float | None) -> None:
        if request.request_id in self.admitted_at:
            self.redelivered += 1
        else:
            self.admitted_at[request.request_id] = admitted_at
            if reserved_mu is not None:
                self.reserved_mu[request.request_id] = reserved_mu
            self.shard_of[request.request_id] = shard
        output = self._outputs.get(request.request_id, 1)
        inputs = self._estimator.count_input_tokens(request)
        mu = self._cost.model_units(inputs, output)
        worker = f"fleet-{shard % self._replicas}"
        await self._sink.send(request.reply_topic, InferenceResult(
            request_id=request.request_id, tenant=request.tenant, model=request.model,
            status="ok", usage=Usage(input_tokens=inputs, output_tokens=output),
            worker=worker, shard=shard), key=request.request_id)
        await self._sink.send(USAGE, UsageEvent(
            request_id=request.request_id, tenant=request.tenant, model=request.model,
            input_tokens=inputs, output_tokens=output, model_units=mu, worker=worker,
            shard=shard), key=request.tenant)

    async def _beat(self, stop: asyncio.Event) -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            for i, shards in enumerate(self._owners()):
                await self._sink.send(HEARTBEATS, WorkerHeartbeat(
                    worker=f"fleet-{i}", model=self.model, engine="trace", seq=seq,
                    shards=shards, engine_state="ready",
                    capacity_mu_per_min=self._capacity / self._replicas), key=f"fleet-{i}")
            await self._sink.flush()
            await asyncio.sleep(1.0)
