"""A consumer-group loop over co-partitioned topics, with state per partition number.

The admission agent reads ``tw.requests`` and ``tw.usage`` (same key, same
partition count) and keeps per-tenant state. The range assignor gives one
member the same partition numbers of both topics, so the member that holds a
tenant's state also receives its usage. A :class:`PartitionedHandler` sees:

* ``assigned(numbers)`` before any record of those partitions (restore state);
* ``handle(tp, records)`` for each fetched run of records, in offset order;
* ``seal()`` at the end of each batch: stage what the batch must write, and
  return how to write it. In the background, after the batch before it, the
  loop writes it, waits until the broker has acknowledged every record sent so
  far, and only then commits the batch's offsets, so a crash replays exactly
  the records whose effects may not have reached Kafka. Handling goes on
  meanwhile (at most ``batches_in_flight`` batches wait): the batch's writes
  never hold up the next records' decisions, nor (having a record batch of
  their own per partition to wait for) the decisions' own records;
* ``revoked(numbers)`` after the current batch is sealed and committed.

A batch ends every ``batch_max`` records or ``batch_within_s``, or when no
record came for ``idle_s``, whichever comes first. Records fetched before a
rebalance are dropped, not handled: the new assignment starts again from the
committed offsets with the restored state.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from streams import StreamsError
from streams.consumer import Record
from streams.sink import EventSink

log = logging.getLogger(__name__)


Write = Callable[[], Awaitable[None]]  # sends a sealed batch's records


class PartitionedHandler(Protocol):
    async def assigned(self, numbers: set[int]) -> None: ...
    async def handle(self, tp: TopicPartition, records: list[Record]) -> None: ...
    def seal(self) -> Write | None: ...
    def revoked(self, numbers: set[int]) -> None: ...


@dataclass
class BatchConfig:
    batch_max: int = 20_000  # records per batch at most
    batch_within_s: float = 0.2  # a batch is sealed this long after its first record,
    idle_s: float = 0.02  # ... or once no record came for this long
    fetch_max: int = 10_000  # records per fetch at most
    batches_in_flight: int = 4  # sealed batches awaiting acknowledgement, at most


@dataclass
class LoopCounters:
    handled: int = 0  # records handed to the handler
    committed_batches: int = 0
    failed_commits: int = 0  # commits refused by a rebalance (replayed, state is idempotent)
    dropped_stale: int = 0  # records fetched before a rebalance and not handled


@dataclass
class _Batch:
    started: float = 0.0  # monotonic s of its first record
    records: int = 0
    offsets: dict[TopicPartition, int] = field(default_factory=dict)  # next offset to commit


def group_consumer(bootstrap: str, group: str, *, client_id: str) -> AIOKafkaConsumer:
    """The group consumer of co-partitioned topics: range assignment, manual commits.
    Topics are given to :class:`CopartitionedLoop`, which subscribes with its listener
    (aiokafka's fetcher fails an assertion when topics are given here as well)."""
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, client_id=client_id,
        enable_auto_commit=False, auto_offset_reset="earliest",
        # Range assignment gives a member partition n of every topic together; the
        # default round-robin interleaves topics and breaks co-partitioning.
        partition_assignment_strategy=(RangePartitionAssignor,),
        # A killed member's partitions move on after seconds, not Kafka's default
        # minute of stalled tenants.
        session_timeout_ms=10_000, heartbeat_interval_ms=2_000,
        max_partition_fetch_bytes=4 * 1024 * 1024)


class CopartitionedLoop:
    def __init__(self, consumer: AIOKafkaConsumer, topics: Iterable[str],
                 handler: PartitionedHandler, sink: EventSink,
                 config: BatchConfig | None = None) -> None:
        self._consumer = consumer
        self._topics = list(topics)
        self._handler = handler
        self._sink = sink
        self.config = config or BatchConfig()
        self.counters = LoopCounters()
        self._lock = asyncio.Lock()  # a batch and a rebalance never interleave
        # Bumped by every revocation: records fetched before one are not handled (the
        # next assignment starts again from the committed offsets).
        self._generation = 0
        self._batch = _Batch()
        self._acking: collections.deque[asyncio.Task[None]] = collections.deque()

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop``; the last batch is sealed and committed on the way out."""
        self._consumer.subscribe(self._topics, listener=_Listener(self))
        try:
            while not stop.is_set():
                await self._step()
        finally:
            async with self._lock:
                await self._seal()
                await self._drain()

    async def _step(self) -> None:
        wait_s = self.config.batch_within_s
        if self._batch.records:
            # Once the input is idle the batch is complete: no reason to hold its commit.
            wait_s = min(self.config.idle_s,
                         max(0.0, self._batch.started + wait_s - time.monotonic()))
        fetched = await self._consumer.getmany(timeout_ms=round(wait_s * 1000),
                                               max_records=self.config.fetch_max)
        # Read as getmany returns: a revocation before this point reset the positions of
        # whatever getmany returned; one while waiting for the lock did not.
        generation = self._generation
        async with self._lock:
            if generation != self._generation:  # revoked since the fetch
                self._refetch(fetched)
                return
            # The batch as it is now, not as it was before getmany: a revocation meanwhile
            # (even the first join's, which revokes nothing) sealed and replaced it, and
            # records added to a replaced batch were handled but never committed.
            batch = self._batch
            for tp, records in fetched.items():
                if not records:
                    continue
                if not batch.records:
                    batch.started = time.monotonic()
                await self._handler.handle(tp, records)
                batch.records += len(records)
                batch.offsets[tp] = records[-1].offset + 1
            handled = sum(len(r) for r in fetched.values())
            self.counters.handled += handled
            if batch.records and (not handled or batch.records >= self.config.batch_max or
                                  time.monotonic() >= batch.started +
                                  self.config.batch_within_s):
                await self._seal()

    def _refetch(self, fetched: dict[TopicPartition, list[Record]]) -> None:
        """Leave records fetched before a revocation unhandled; the partitions this member
        still holds are put back at the first of them (a new assignment starts from the
        committed offsets, which is the same place: this only makes sure of it)."""
        assigned = self._consumer.assignment()
        stale = 0
        for tp, records in fetched.items():
            if records:
                stale += len(records)
                if tp in assigned:
                    self._consumer.seek(tp, records[0].offset)
        self.counters.dropped_stale += stale
        if stale:
            log.warning("%d records fetched before a rebalance are fetched again "
                        "(partitions %s)", stale, sorted(str(tp) for tp in fetched))

    async def _seal(self) -> None:
        """Stage the batch's writes now; writing them, their acknowledgement and the
        commit go on in the background (in batch order): handling does not wait."""
        batch, self._batch = self._batch, _Batch()
        if batch.records:
            write = self._handler.seal()
            previous = self._acking[-1] if self._acking else None
            self._acking.append(asyncio.create_task(self._acknowledge(batch, write, previous),
                                                    name="ack-and-commit"))
        while self._acking and (self._acking[0].done() or
                                len(self._acking) > self.config.batches_in_flight):
            await self._acking.popleft()  # raises what the background step raised

    async def _drain(self) -> None:
        """Wait for every batch sealed so far to be acknowledged and committed."""
        while self._acking:
            await self._acking.popleft()

    async def _acknowledge(self, batch: _Batch, write: Write | None,
                           previous: asyncio.Task[None] | None) -> None:
        """After the batch before it (writes and commits must not overtake each other):
        send the batch's writes, wait for every record sent so far, commit its offsets."""
        if previous is not None:
            await asyncio.shield(previous)
        if write is not None:
            await write()
        await self._sink.flush()
        try:
            await self._consumer.commit(batch.offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # The group moved on; the new owner replays from the last commit and the
            # handler's state (offsets applied per key) keeps the replay idempotent.
            self.counters.failed_commits += 1
            log.warning("offsets of %d records not committed (rebalance): %s",
                        batch.records, exc)
            return
        self.counters.committed_batches += 1

    async def revoked(self, revoked: set[TopicPartition]) -> None:
        log.info("revoked %d partitions", len(revoked))
        async with self._lock:
            self._generation += 1
            try:
                await self._seal()
                await self._drain()
            except (KafkaError, StreamsError) as exc:
                # Not sealed: the next owner replays these records from the last commit.
                log.warning("batch not sealed before a revocation: %s", exc)
                self._batch = _Batch()
            self._handler.revoked({tp.partition for tp in revoked})

    async def assigned(self, assigned: set[TopicPartition]) -> None:
        by_topic: dict[str, set[int]] = {}
        for tp in assigned:
            by_topic.setdefault(tp.topic, set()).add(tp.partition)
        numbers = set().union(*by_topic.values()) if by_topic else set()
        uneven = {t: sorted(ps) for t, ps in by_topic.items() if ps != numbers}
        if uneven:
            raise CopartitionError(f"assignment is not co-partitioned: {uneven}")
        log.info("assigned partitions %s of %s", sorted(numbers), sorted(by_topic))
        async with self._lock:
            await self._handler.assigned(numbers)


class CopartitionError(StreamsError):
    """The group assigned different partition numbers of the co-partitioned topics."""


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, loop: CopartitionedLoop) -> None:
        self._loop = loop

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._loop.revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._loop.assigned(assigned)


async def read_to_end(bootstrap: str, topic: str, partitions: set[int], *,
                      client_id: str, fetch_max: int = 10_000
                      ) -> list[tuple[int, bytes | None, bytes | None]]:
    """Every record of ``partitions`` of ``topic`` up to its current end, in offset order
    per partition: (partition, key, value). For restoring state from a changelog."""
    if not partitions:
        return []
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                client_id=client_id, max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        left = {tp for tp in tps if ends[tp] > await consumer.position(tp)}
        out: list[tuple[int, bytes | None, bytes | None]] = []
        while left:
            fetched = await consumer.getmany(*left, timeout_ms=500, max_records=fetch_max)
            for tp, records in fetched.items():
                out.extend((tp.partition, r.key, r.value) for r in records
                           if r.offset < ends[tp])
            # By position, not by the last record's offset: compaction leaves gaps.
            left = {tp for tp in left if await consumer.position(tp) < ends[tp]}
        return out
    finally:
        await consumer.stop()
