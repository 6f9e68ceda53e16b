"""Shard worker: consume ``tw.shard.<model>``, run the engine, reply, meter, beat.

Offsets are committed only after the batch's results and usage events are
acknowledged by the broker (at-least-once); results carry the request id so
clients drop duplicates.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord
from pydantic import TypeAdapter

from schemas.cost import CostModel
from schemas.events import (
    InferenceRequest,
    InferenceResult,
    Timings,
    Usage,
    UsageEvent,
    WorkerHeartbeat,
)
from streams.deadletter import decode_or_dead_letter
from streams.sink import EventSink
from streams.topics import HEARTBEATS, USAGE, shard_topic
from workers import EngineError
from workers.engines.base import REQUEST_PRIORITY, Engine

log = logging.getLogger(__name__)
_REQUEST: TypeAdapter[InferenceRequest] = TypeAdapter(InferenceRequest)


def default_worker_id(model: str) -> str:
    return f"{model}.{socket.gethostname()[:24]}.{os.getpid()}"


class _Assignment(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.shards: list[int] = []

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        gone = {tp.partition for tp in revoked}
        self.shards = [s for s in self.shards if s not in gone]

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.shards = sorted({*self.shards, *(tp.partition for tp in assigned)})


class ShardWorker:
    def __init__(
        self,
        *,
        bootstrap: str,
        model: str,
        engine: Engine,
        sink: EventSink,
        cost: CostModel | None = None,
        worker_id: str | None = None,
        max_batch: int = 64,
        heartbeat_s: float = 1.0,
    ) -> None:
        self.model = model
        self.worker_id = worker_id or default_worker_id(model)
        self._engine = engine
        self._sink = sink
        self._cost = cost or CostModel()
        self._max_batch = max_batch
        self._heartbeat_s = heartbeat_s
        self._assignment = _Assignment()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=f"tw.worker.{model}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id=self.worker_id,
            max_partition_fetch_bytes=16 * 1024 * 1024,
            fetch_max_bytes=32 * 1024 * 1024,
        )
        self._state = "starting"
        self._in_flight = 0
        self._tokens_since_beat = 0
        self._seq = 0
        self.completed = 0

    async def run(self, stop: asyncio.Event) -> None:
        self._consumer.subscribe([shard_topic(self.model)], listener=self._assignment)
        await self._consumer.start()
        beats = asyncio.create_task(self._beat_until(stop), name="heartbeats")
        try:
            self._state = "ready"
            while not stop.is_set():
                batches = await self._consumer.getmany(timeout_ms=200, max_records=self._max_batch)
                records = [r for recs in batches.values() for r in recs]
                if records:
                    await self._process(records)
            self._state = "draining"
        finally:
            beats.cancel()
            await asyncio.gather(beats, return_exceptions=True)
            await self._send_beat()
            await self._sink.flush()
            await self._consumer.stop()  # leaves the group; shards move to others

    async def _process(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        await asyncio.gather(*(self._handle(r) for r in records))
        await self._sink.flush()
        await self._consumer.commit()

    async def _handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        request = await decode_or_dead_letter(
            self._sink, _REQUEST, raw=record.value, key=record.key, topic=record.topic,
            partition=record.partition, offset=record.offset, consumer=f"worker.{self.model}",
        )
        if request is None:
            return
        self._in_flight += 1
        started = time.time()
        try:
            generation = await self._engine.generate(
                request, priority=REQUEST_PRIORITY[request.priority])
        except EngineError as exc:
            await self._sink.send(request.reply_topic, InferenceResult(
                request_id=request.request_id, tenant=request.tenant, model=request.model,
                status="error", finish_reason="error", error=str(exc)[:1024],
                worker=self.worker_id, shard=record.partition,
            ), key=request.request_id)
            return
        finally:
            self._in_flight -= 1
        done = time.time()
        usage = Usage(input_tokens=generation.input_tokens,
                      output_tokens=len(generation.token_ids),
                      cached_tokens=generation.cached_tokens, images=len(request.images))
        queue_s = max(0.0, started - request.submitted_at)
        self._tokens_since_beat += usage.output_tokens
        self.completed += 1
        await self._sink.send(request.reply_topic, InferenceResult(
            request_id=request.request_id, tenant=request.tenant, model=request.model,
            status="ok", text=generation.text, token_ids=generation.token_ids,
            finish_reason=generation.finish_reason, usage=usage,
            timings=Timings(queue_s=queue_s, ttft_s=generation.ttft_s, tpot_s=generation.tpot_s,
                            total_s=max(0.0, done - request.submitted_at)),
            worker=self.worker_id, shard=record.partition, completed_at=done,
        ), key=request.request_id)
        await self._sink.send(USAGE, UsageEvent(
            request_id=request.request_id, tenant=request.tenant, model=request.model,
            input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
            cached_tokens=usage.cached_tokens, images=usage.images,
            model_units=self._cost.model_units(usage.input_tokens, usage.output_tokens,
                                               usage.images, usage.cached_tokens),
            queue_s=queue_s, ttft_s=generation.ttft_s, tpot_s=generation.tpot_s,
            worker=self.worker_id, shard=record.partition, finished_at=done,
        ), key=request.tenant)

    async def _beat_until(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._send_beat()
            await self._sink.flush()
            await asyncio.sleep(self._heartbeat_s)

    async def _send_beat(self) -> None:
        self._seq += 1
        tokens, self._tokens_since_beat = self._tokens_since_beat, 0
        await self._sink.send(HEARTBEATS, WorkerHeartbeat(
            worker=self.worker_id, model=self.model, engine=self._engine.name, seq=self._seq,
            shards=self._assignment.shards,
            engine_state=self._state,  # type: ignore[arg-type]
            in_flight=self._in_flight, capacity_mu_per_min=self._cost.capacity_mu_per_min,
            tokens_since_last=tokens,
        ), key=self.worker_id)
