"""Shard worker: consume ``tw.shard.<model>``, keep the engine busy, reply, meter, beat.

Continuous admission
--------------------
A fetch loop pulls records from the worker's shards (the partitions the
consumer group ``tw.worker.<model>`` assigns it) while a :class:`CapacityGate`
has room, and starts every request as its own task at once: new requests
enter the engine as others finish, not batch after batch. The gate bounds

- the requests held, ``max_in_flight``: by default twice the engine's batch
  size, so that a full batch runs and the next waits inside the engine, ready
  the moment a slot frees (no bubble while the worker fetches), while work
  beyond that stays in Kafka, where a rebalance hands it to another worker
  without redoing anything;
- the model units held, ``capacity_mu_per_min · mu_horizon_s / 60`` (default
  10 s of the replica's capacity), each request counted at the MU admission
  reserved for it (the ``tw-reserved-mu`` header) or else at the cost model's
  estimate with ``max_tokens`` outputs. It keeps a worker from taking on far
  more work than it can do soon, when requests are long. A request larger
  than the whole budget still runs, alone.

Records fetched beyond the MU budget are given back by seeking their
partition to them. While the gate is full the partitions are paused and the
loop keeps polling (aiokafka leaves the group when polling stops for
``max_poll_interval_ms``); it resumes them as soon as a request finishes.

Commits (at-least-once)
-----------------------
A request's result goes to its reply topic and its :class:`UsageEvent` to
``tw.usage`` as soon as it finishes; a committer task then flushes the
producer and marks those offsets finished in an :class:`OffsetTracker`, which
commits, per partition, only the contiguous prefix of finished offsets. With
out-of-order completion the committed offset thus stays at the oldest request
not yet answered: a worker that dies loses nothing, and the partition's next
owner redoes what was in flight (and what finished after the last commit).
Results carry the request id and the client drops duplicates; usage events
carry it too and metering settles each request once.

Rebalances are eager (every partition is revoked, then assigned anew): on
revocation the finished prefix is committed and in-flight requests keep
running; a partition that comes back is sought to where this worker had
fetched, so its in-flight requests are not fetched twice; one that went
elsewhere is forgotten (its requests still answer, uncommitted, and the new
owner redoes them). A record whose request id this worker already runs waits
for that run's answer instead of running twice.

Heartbeats and probes
---------------------
Sent by a :class:`workers.health.HealthMonitor` from a thread of its own,
with its own event loop and producer, so that request work on this loop
cannot delay them (see :mod:`workers.health`). Every ``heartbeat_s`` this
loop hands it a snapshot: the shards owned, requests held (``in_flight``:
preprocessing, running or queued in the engine) and their MU, ``queued``
(held but waiting inside the engine), the engine's token count, engine state
and capacity. When no request finished for a while the monitor sends a
one-token probe through the engine at the highest priority; its outcome rides
on the beats.

Images
------
With an :class:`workers.preprocess.ImagePreprocessor`, a request's images
are decoded and preprocessed on its process pool before the request enters
the engine (a bad image gets an error result). The engines take no pixel
values yet: the pool does the CPU work a multimodal worker does, and the
engine is still priced per image by the cost model.

Drain (SIGTERM)
---------------
Stop fetching, let in-flight requests finish for up to ``drain_timeout_s``,
abort what is left without answering it (its offsets stay uncommitted, so
another worker redelivers it), flush, commit, send a last beat and leave the
group, so that the shards move at once instead of after a session timeout.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Collection
from typing import TypeAlias

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from pydantic import TypeAdapter

from schemas.cost import CostModel
from schemas.events import (
    InferenceRequest,
    InferenceResult,
    SamplingParams,
    Timings,
    Usage,
    UsageEvent,
)
from streams.consumer import GroupConsumer
from streams.deadletter import decode_or_dead_letter
from streams.sink import EventSink, KafkaEventSink
from streams.topics import RESERVED_MU_HEADER, USAGE, shard_topic
from workers import EngineError, WorkersError
from workers.engines.base import REQUEST_PRIORITY, Engine, Generation
from workers.health import (
    BeatSinkFactory,
    HealthMonitor,
    Snapshot,
    WorkerHealthConfig,
    WorkerState,
)
from workers.preprocess import ImagePreprocessor, PreprocessError

log = logging.getLogger(__name__)
_REQUEST: TypeAdapter[InferenceRequest] = TypeAdapter(InferenceRequest)

Record: TypeAlias = ConsumerRecord[bytes, bytes]

# Rough prompt size when admission sent no reservation: the same rule of
# thumb as the admission estimator without a tokenizer.
_CHARS_PER_TOKEN = 4
_POLL_MS = 100  # longest a fetch waits for records when the gate has room
_FULL_WAIT_S = 1.0  # longest a full gate waits for a slot before polling again
_COMMIT_TIMEOUT_S = 10.0  # aiokafka retries a commit forever while the coordinator is away
_PROBE_TENANT = "tokenweir-probe"


def default_worker_id(model: str) -> str:
    return f"{model}.{socket.gethostname()[:24]}.{os.getpid()}"


class PartitionOffsets:
    """One partition's fetched offsets: which are finished, and how far a commit may go.

    Offsets arrive in increasing order (Kafka may skip some: compaction,
    transaction markers). The commit point is the oldest unfinished offset,
    or one past the last fetched when all are finished.
    """

    def __init__(self, tp: TopicPartition) -> None:
        self.tp = tp
        self.next_fetch: int | None = None  # one past the last offset fetched
        self.committed: int | None = None  # last commit point known to the group
        self._order: collections.deque[int] = collections.deque()
        self._unfinished: set[int] = set()

    def fetched(self, offset: int) -> None:
        if self.next_fetch is not None and offset < self.next_fetch:
            raise WorkersError(f"{self.tp}: offset {offset} fetched after {self.next_fetch - 1}")
        if self.committed is None:
            # Where fetching started is the group's commit point already: no need to commit it.
            self.committed = offset
        self._order.append(offset)
        self._unfinished.add(offset)
        self.next_fetch = offset + 1

    def finished(self, offset: int) -> None:
        self._unfinished.discard(offset)

    @property
    def unfinished(self) -> int:
        return len(self._unfinished)

    def commit_point(self) -> int | None:
        """The offset to commit (the next to consume after a restart); None before any fetch."""
        while self._order and self._order[0] not in self._unfinished:
            self._order.popleft()
        if self._order:
            return self._order[0]
        return self.next_fetch


class OffsetTracker:
    """Per-partition commit points for out-of-order completion (no I/O).

    :meth:`fetched` returns the partition's state object; a request holds on
    to it, so that finishing after its partition was forgotten (moved to
    another worker) touches nothing the worker still commits from.
    """

    def __init__(self) -> None:
        self._parts: dict[TopicPartition, PartitionOffsets] = {}

    def fetched(self, tp: TopicPartition, offset: int) -> PartitionOffsets:
        part = self._parts.get(tp)
        if part is None:
            part = self._parts[tp] = PartitionOffsets(tp)
        part.fetched(offset)
        return part

    def next_fetch(self, tp: TopicPartition) -> int | None:
        part = self._parts.get(tp)
        return None if part is None else part.next_fetch

    def committable(self, owned: Collection[TopicPartition]) -> dict[TopicPartition, int]:
        """Commit points that moved past the last commit, for the partitions still owned."""
        out: dict[TopicPartition, int] = {}
        for tp, part in self._parts.items():
            point = part.commit_point()
            if tp in owned and point is not None and (part.committed is None
                                                      or point > part.committed):
                out[tp] = point
        return out

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            part = self._parts.get(tp)
            if part is not None:
                part.committed = offset

    def retain(self, tps: Collection[TopicPartition]) -> None:
        """Forget every partition not in ``tps`` (they moved to another worker)."""
        for tp in [tp for tp in self._parts if tp not in tps]:
            del self._parts[tp]

    def unfinished(self) -> int:
        return sum(part.unfinished for part in self._parts.values())


class CapacityGate:
    """How much work the worker holds: at most ``max_requests`` requests and ``max_mu`` MU.

    A request that does not fit waits, except when nothing is held: then it
    runs alone, however large, so that no request can block a shard forever.
    """

    def __init__(self, *, max_requests: int, max_mu: float) -> None:
        if max_requests < 1:
            raise WorkersError(f"max_requests must be at least 1, not {max_requests}")
        if not max_mu > 0:
            raise WorkersError(f"max_mu must be positive, not {max_mu}")
        self.max_requests = max_requests
        self.max_mu = max_mu
        self.in_flight = 0
        self.in_flight_mu = 0.0

    def room(self) -> int:
        """Requests that may be fetched now (each must still pass :meth:`admits`)."""
        if self.in_flight > 0 and self.in_flight_mu >= self.max_mu:
            return 0
        return max(0, self.max_requests - self.in_flight)

    def admits(self, mu: float) -> bool:
        if self.in_flight >= self.max_requests:
            return False
        return self.in_flight == 0 or self.in_flight_mu + mu <= self.max_mu

    def take(self, mu: float) -> None:
        self.in_flight += 1
        self.in_flight_mu += mu

    def release(self, mu: float) -> None:
        if self.in_flight < 1:
            raise WorkersError("capacity gate released more requests than it took")
        self.in_flight -= 1
        # Float sums drift: an empty gate holds exactly nothing.
        self.in_flight_mu = max(0.0, self.in_flight_mu - mu) if self.in_flight else 0.0


ShardConsumer = GroupConsumer


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: ShardWorker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._worker._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._worker._on_assigned(assigned)


async def _wait_any(*events: asyncio.Event, limit_s: float) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


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
        max_in_flight: int | None = None,
        mu_horizon_s: float = 10.0,
        heartbeat_s: float = 1.0,
        drain_timeout_s: float = 30.0,
        commit_interval_s: float = 0.1,
        consumer: ShardConsumer | None = None,
        health: WorkerHealthConfig | None = None,
        beat_sink: BeatSinkFactory | None = None,
        session_timeout_s: float = 10.0,
        preprocessor: ImagePreprocessor | None = None,
    ) -> None:
        """``max_batch``: the engine's batch size; ``max_in_flight`` (default twice that)
        and ``mu_horizon_s`` size the :class:`CapacityGate` (see the module doc).

        ``health``: probes and endpoint (its ``heartbeat_s`` gives way to the argument);
        ``beat_sink``: opens the heartbeat sink on the health thread, by default a
        producer of its own for a :class:`KafkaEventSink` and ``sink`` itself for an
        in-memory one. ``session_timeout_s``: how long the group waits for a member
        that stopped heartbeating to Kafka (a killed worker) before moving its shards.
        """
        if drain_timeout_s < 0:
            raise WorkersError(f"drain_timeout_s must not be negative, not {drain_timeout_s}")
        if not 1.0 <= session_timeout_s <= 300.0:
            raise WorkersError(f"session_timeout_s must be in [1, 300], not {session_timeout_s}")
        self.model = model
        self.worker_id = worker_id or default_worker_id(model)
        self._engine = engine
        self._sink = sink
        self._cost = cost or CostModel()
        self._heartbeat_s = heartbeat_s
        self._drain_timeout_s = drain_timeout_s
        self._commit_interval_s = commit_interval_s
        self._gate = CapacityGate(
            max_requests=max_in_flight if max_in_flight is not None else 2 * max_batch,
            max_mu=self._cost.capacity_mu_per_min * mu_horizon_s / 60.0)
        self._offsets = OffsetTracker()
        self._consumer: ShardConsumer = consumer or AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=f"tw.worker.{model}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id=self.worker_id,
            max_partition_fetch_bytes=16 * 1024 * 1024,
            fetch_max_bytes=32 * 1024 * 1024,
            session_timeout_ms=int(session_timeout_s * 1000),
            heartbeat_interval_ms=max(100, int(session_timeout_s * 1000 / 3)),
        )
        self._preprocessor = preprocessor
        self._health = HealthMonitor(
            worker_id=self.worker_id, model=model, engine=engine.name,
            config=(health or WorkerHealthConfig()).model_copy(update={"heartbeat_s": heartbeat_s}),
            beat_sink=beat_sink or self._default_beat_sink(bootstrap, sink),
            probe=self._probe, initial=self._snapshot("starting"))
        self._state: WorkerState = "starting"
        self._tasks: set[asyncio.Task[bool]] = set()
        self._by_id: dict[str, asyncio.Task[bool]] = {}  # request id -> the task running it
        # (partition, offset) answered and sent, not yet flushed: the committer's input.
        self._sent: list[tuple[PartitionOffsets, int]] = []
        self._finished = asyncio.Event()  # something was sent: commit soon
        self._slot_freed = asyncio.Event()  # the gate has room again
        self._commit_lock = asyncio.Lock()
        self._abandoning = False  # draining past the deadline: aborted requests go unanswered
        self._probes = 0
        self.completed = 0  # requests answered by this worker (ok or error)
        self.abandoned = 0  # requests aborted by the drain, left for another worker

    # -- main loop ---------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then drain (see the module doc) and leave the group."""
        self._consumer.subscribe([shard_topic(self.model)], listener=_Rebalance(self))
        await self._consumer.start()
        self._health.update(self._snapshot())
        await self._health.start()
        helpers = [asyncio.create_task(self._snapshot_forever(), name="worker-snapshots"),
                   asyncio.create_task(self._commit_forever(), name="worker-commits")]
        try:
            self._state = "ready"
            await self._fetch_until(stop, helpers)
            await self._drain()
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            # Left here by an error: whatever still runs is abandoned uncommitted.
            await self._abandon()
            await self._health.stop()
            await self._consumer.stop()  # leaves the group; shards move to others

    async def _fetch_until(self, stop: asyncio.Event, helpers: list[asyncio.Task[None]]) -> None:
        while not stop.is_set():
            for task in helpers:
                if task.done():
                    task.result()  # a failed producer or committer stops the worker
                    raise WorkersError(f"{task.get_name()} ended unexpectedly")
            # Cleared before looking at the gate, so a slot freed from here on wakes us.
            self._slot_freed.clear()
            room = self._gate.room()
            if room == 0:
                if assigned := self._consumer.assignment():
                    self._consumer.pause(*assigned)
            elif paused := self._consumer.paused():
                self._consumer.resume(*paused)
            # Polled even when full (everything paused, nothing returned): it keeps the
            # consumer in the group. A partition assigned since is not paused yet,
            # and what it returns goes through the gate like any record.
            batches = await self._consumer.getmany(timeout_ms=_POLL_MS if room else 0,
                                                   max_records=max(1, room))
            full = room == 0
            if batches and not await self._admit(batches):
                full = True  # a record did not fit: fetching again before a slot frees is futile
                self._consumer.pause(*self._consumer.assignment())
            if full:
                await _wait_any(self._slot_freed, stop, limit_s=_FULL_WAIT_S)

    async def _admit(self, batches: dict[TopicPartition, list[Record]]) -> bool:
        """Start what the gate admits; False when a record was given back for want of room."""
        fitted = True
        for tp, records in batches.items():
            for record in records:
                request = await decode_or_dead_letter(
                    self._sink, _REQUEST, raw=record.value, key=record.key, topic=record.topic,
                    partition=record.partition, offset=record.offset,
                    consumer=f"worker.{self.model}",
                )
                if request is None:  # dead-lettered: settled once the DLQ record is flushed
                    self._settle(self._offsets.fetched(tp, record.offset), record.offset)
                    continue
                mu = self._held_mu(record, request)
                if not self._gate.admits(mu):
                    # Given back: fetched again once the gate has room.
                    self._consumer.seek(tp, record.offset)
                    fitted = False
                    break
                part = self._offsets.fetched(tp, record.offset)
                self._gate.take(mu)
                leader = self._by_id.get(request.request_id)
                if leader is not None:
                    task = asyncio.create_task(self._follow(leader, part, record.offset, mu))
                else:
                    task = asyncio.create_task(
                        self._serve(request, tp.partition, part, record.offset, mu))
                    self._by_id[request.request_id] = task
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return fitted

    def _held_mu(self, record: Record, request: InferenceRequest) -> float:
        """The MU this request holds while in flight: its reservation, else an estimate."""
        for name, value in record.headers or ():
            if name == RESERVED_MU_HEADER:
                try:
                    reserved = float(value.decode())
                except (UnicodeDecodeError, ValueError):
                    break  # a malformed header is no reason to drop the request
                if math.isfinite(reserved):
                    return max(0.0, reserved)
                break
        inputs = -(-len(request.prompt_text()) // _CHARS_PER_TOKEN)
        return self._cost.model_units(inputs, request.max_tokens, len(request.images))

    # -- one request ---------------------------------------------------------------
    async def _serve(self, request: InferenceRequest, shard: int, part: PartitionOffsets,
                     offset: int, mu: float) -> bool:
        try:
            answered = await self._answer(request, shard)
        finally:
            self._gate.release(mu)
            self._slot_freed.set()
            if self._by_id.get(request.request_id) is asyncio.current_task():
                del self._by_id[request.request_id]
        if answered:
            self._settle(part, offset)
        return answered

    async def _follow(self, leader: asyncio.Task[bool], part: PartitionOffsets, offset: int,
                      mu: float) -> bool:
        """A redelivered record of a request this worker already runs: its answer serves both."""
        try:
            await asyncio.wait([leader])
        finally:
            self._gate.release(mu)
            self._slot_freed.set()
        answered = not leader.cancelled() and leader.exception() is None and leader.result()
        if answered:
            self._settle(part, offset)
        return answered

    def _settle(self, part: PartitionOffsets, offset: int) -> None:
        self._sent.append((part, offset))
        self._finished.set()

    async def _answer(self, request: InferenceRequest, shard: int) -> bool:
        """Run the request and send its result and usage; False when the drain abandoned it."""
        started = time.time()
        try:
            if request.images and self._preprocessor is not None:
                # On the pool's processes: this loop (and the engine) only awaits it.
                await self._preprocessor.process(request.images)
            generation = await self._engine.generate(
                request, priority=REQUEST_PRIORITY[request.priority])
        except (EngineError, PreprocessError) as exc:
            await self._send_error(request, shard, exc, started)
            return True
        if generation.finish_reason == "abort" and self._abandoning:
            return False
        self._health.request_finished()
        await self._send_result(request, shard, generation, started)
        return True

    async def _send_result(self, request: InferenceRequest, shard: int, generation: Generation,
                           started: float) -> None:
        done = time.time()
        usage = Usage(input_tokens=generation.input_tokens,
                      output_tokens=len(generation.token_ids),
                      cached_tokens=generation.cached_tokens, images=len(request.images))
        queue_s = max(0.0, started - request.submitted_at)
        self.completed += 1
        await self._sink.send(request.reply_topic, InferenceResult(
            request_id=request.request_id, tenant=request.tenant, model=request.model,
            status="ok", text=generation.text, token_ids=generation.token_ids,
            finish_reason=generation.finish_reason, usage=usage,
            timings=Timings(queue_s=queue_s, ttft_s=generation.ttft_s, tpot_s=generation.tpot_s,
                            total_s=max(0.0, done - request.submitted_at)),
            worker=self.worker_id, shard=shard, completed_at=done,
        ), key=request.request_id)
        await self._sink.send(USAGE, UsageEvent(
            request_id=request.request_id, tenant=request.tenant, model=request.model,
            input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
            cached_tokens=usage.cached_tokens, images=usage.images,
            model_units=self._cost.model_units(usage.input_tokens, usage.output_tokens,
                                               usage.images, usage.cached_tokens),
            status="abort" if generation.finish_reason == "abort" else "ok",
            queue_s=queue_s, ttft_s=generation.ttft_s, tpot_s=generation.tpot_s,
            worker=self.worker_id, shard=shard, finished_at=done,
        ), key=request.tenant)

    async def _send_error(self, request: InferenceRequest, shard: int, exc: WorkersError,
                          started: float) -> None:
        done = time.time()
        self.completed += 1
        await self._sink.send(request.reply_topic, InferenceResult(
            request_id=request.request_id, tenant=request.tenant, model=request.model,
            status="error", finish_reason="error", error=str(exc)[:1024],
            worker=self.worker_id, shard=shard, completed_at=done,
        ), key=request.request_id)
        # Metering settles every admitted request by its usage event: this one used nothing.
        await self._sink.send(USAGE, UsageEvent(
            request_id=request.request_id, tenant=request.tenant, model=request.model,
            input_tokens=0, output_tokens=0, images=len(request.images), model_units=0.0,
            status="error", queue_s=max(0.0, started - request.submitted_at),
            worker=self.worker_id, shard=shard, finished_at=done,
        ), key=request.tenant)

    # -- commits ---------------------------------------------------------------------
    async def _commit_forever(self) -> None:
        while True:
            # Woken by a finished request, else once a beat interval: what was sent
            # meanwhile is flushed here, so a failing producer shows up idle or not.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._heartbeat_s):
                    await self._finished.wait()
            self._finished.clear()
            await self._commit_finished()
            # Coalesces the requests finishing meanwhile into the next flush and commit.
            await asyncio.sleep(self._commit_interval_s)

    async def _commit_finished(self) -> None:
        """Flush what was sent, then commit each owned partition's finished prefix.

        The only place the worker flushes, under one lock: a flush takes over the
        delivery futures of every record sent before it, so a flush elsewhere could
        swallow a failed result while this one went on to commit its offset.
        """
        async with self._commit_lock:
            sent, self._sent = self._sent, []
            await self._sink.flush()  # a ProduceError stops the worker: nothing is committed
            for part, offset in sent:
                part.finished(offset)
            offsets = self._offsets.committable(self._consumer.assignment())
            if not offsets:
                return
            try:
                async with asyncio.timeout(_COMMIT_TIMEOUT_S):
                    await self._consumer.commit(offsets)
            except (KafkaError, TimeoutError) as exc:
                # Mid-rebalance, or the coordinator is away: the next finish (or the
                # assignment that ends the rebalance) retries; nothing is lost meanwhile.
                log.info("worker %s: commit of %s deferred: %r", self.worker_id, offsets, exc)
                return
            self._offsets.committed(offsets)

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        # While they are still ours: what is answered need not be redone by the next owner.
        try:
            await self._commit_finished()
        except Exception:  # aiokafka only logs listener errors; say what failed
            log.exception("worker %s: commit on revocation failed", self.worker_id)

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            position = self._offsets.next_fetch(tp)
            if position is not None:
                # Back to us after an eager rebalance: go on from where we fetched,
                # not from the commit point, or requests in flight would run twice.
                self._consumer.seek(tp, position)
        self._offsets.retain(assigned)
        self._finished.set()  # commits deferred during the rebalance go out now

    # -- drain -----------------------------------------------------------------------
    async def _drain(self) -> None:
        self._state = "draining"
        if assigned := self._consumer.assignment():
            self._consumer.pause(*assigned)
        if self._tasks:
            log.info("worker %s: draining %d requests (up to %.0fs)", self.worker_id,
                     len(self._tasks), self._drain_timeout_s)
            await asyncio.wait(set(self._tasks), timeout=self._drain_timeout_s)
        await self._abandon()
        await self._health.beat_now(self._snapshot())
        await self._commit_finished()

    async def _abandon(self) -> None:
        """Abort what still runs, unanswered and uncommitted: another worker redoes it."""
        tasks = set(self._tasks)
        if not tasks:
            return
        self._abandoning = True
        self.abandoned += len(tasks)
        log.warning("worker %s: abandoning %d unfinished requests to redelivery",
                    self.worker_id, len(tasks))
        for rid in list(self._by_id):
            with contextlib.suppress(EngineError):
                await self._engine.abort(rid)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- heartbeats and probes ----------------------------------------------------------
    def _default_beat_sink(self, bootstrap: str, sink: EventSink) -> BeatSinkFactory:
        if isinstance(sink, KafkaEventSink):
            @contextlib.asynccontextmanager
            async def own_producer() -> AsyncIterator[EventSink]:
                # Its own: an aiokafka producer belongs to the loop that started it.
                beats = KafkaEventSink(bootstrap, client_id=f"{self.worker_id}.health")
                await beats.start()
                try:
                    yield beats
                finally:
                    await beats.stop()
            return own_producer
        # In-memory sinks belong to no loop: the beats go where the results go.
        return lambda: contextlib.nullcontext(sink)

    async def _snapshot_forever(self) -> None:
        # Never waits on a flush or a commit: a snapshot that stops coming means this
        # loop is stuck, which the health thread reports.
        while True:
            self._health.update(self._snapshot())
            await asyncio.sleep(self._heartbeat_s)

    def _snapshot(self, state: WorkerState | None = None) -> Snapshot:
        stats = self._engine.stats()
        state = state or self._state
        if stats.state in ("failed", "closed"):
            state = "failed"
        elif stats.state == "starting" and state == "ready":
            state = "starting"  # loading weights on first use
        assigned = self._consumer.assignment() if state != "starting" else set()
        return Snapshot(
            taken_at=time.monotonic(), state=state,
            shards=tuple(sorted(tp.partition for tp in assigned)),
            in_flight=self._gate.in_flight, in_flight_mu=self._gate.in_flight_mu,
            queued=min(stats.waiting, self._gate.in_flight),
            tokens_generated=stats.tokens_generated,
            capacity_mu_per_min=self._cost.capacity_mu_per_min)

    async def _probe(self) -> Generation:
        """One minimal request through the engine, ahead of every request (see health)."""
        self._probes += 1
        probe = InferenceRequest(
            request_id=f"probe-{os.getpid()}-{self._probes}", tenant=_PROBE_TENANT,
            model=self.model, prompt="ping", max_tokens=1,
            sampling=SamplingParams(temperature=0.0))
        return await self._engine.generate(probe, priority=self._health.config.probe_priority)

    @property
    def health(self) -> HealthMonitor:
        return self._health
