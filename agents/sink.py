"""The ClickHouse sink: tw.usage, tw.responses, tw.scale, tw.health, tw.alerts -> tables.

One consumer group (``tokenweir-sink``), plain aiokafka (no Faust: its per-event
overhead would cap the sink well below the consumer's rate). The loop:

    consume -> batch (by size or time) -> decode -> filter ids -> insert -> commit

* Batches: up to ``batch_max_records`` records or ``batch_max_wait_s`` after
  the first record, whichever comes first. While one batch is being written
  (on the store's thread) the next is fetched and decoded.
* Idempotence: the per-minute views sum what is inserted, so a redelivered id
  must never reach an insert. Each partition keeps a bounded window of the ids
  it wrote; duplicates within a batch are dropped; and on a partition's first
  batch after assignment (a restart, a rebalance) or after any failed insert
  (one that raised may still have landed) ClickHouse is asked which ids of the
  batch it already has.
* Offsets are committed (manually) only after the insert succeeded and the
  batch's dead letters were flushed.
* ClickHouse down: the same batch is retried with capped exponential back-off,
  one warning per attempt; fetching is paused meanwhile, so memory stays at
  two batches. Nothing is committed, so stopping then loses nothing.
* Bad records (bad JSON, schema violations) go to ``tw.dlq`` with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, TypeAlias

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from agents import AgentsError
from agents.sink_rows import (
    SINK_TOPICS,
    IdWindow,
    Row,
    TableSpec,
    TopicDecoder,
    fresh_rows,
)
from infra.clickhouse.store import ClickHouseError, ClickHouseStore
from schemas.config import Settings
from streams import StreamsError
from streams.consumer import GroupConsumer
from streams.deadletter import send_dead_letter
from streams.sink import EventSink

log = logging.getLogger(__name__)

Record: TypeAlias = ConsumerRecord[bytes, bytes]
CONSUMER_NAME = "sink"  # names the sink in dead letters
_POLL_MS = 100
_FETCH_RECORDS = 2000  # records per getmany at most
_FETCH_PARTITION_BYTES = 1024 * 1024  # per partition and fetch
_PAUSED_POLL_S = 1.0  # polls while paused, well within max.poll.interval.ms


class SinkConfig(BaseSettings):
    """Batching, dedupe and back-off (env ``TOKENWEIR_SINK_*``)."""

    model_config = SettingsConfigDict(env_prefix="TOKENWEIR_SINK_", extra="forbid", frozen=True)

    group_id: str = "tokenweir-sink"
    topics: tuple[str, ...] = SINK_TOPICS
    batch_max_records: Annotated[int, Field(ge=1, le=1_000_000)] = 50_000  # records
    batch_max_wait_s: Annotated[float, Field(gt=0, le=60)] = 0.5  # s after a batch's first record
    window_ids: Annotated[int, Field(ge=1)] = 200_000  # ids remembered per partition, at least
    backoff_initial_s: Annotated[float, Field(gt=0)] = 0.5  # s
    backoff_max_s: Annotated[float, Field(gt=0)] = 10.0  # s


@dataclass
class SinkCounters:
    """What the sink did, for tests, benchmarks and the demo."""

    fetched: int = 0  # records taken from Kafka
    inserted: dict[str, int] = field(default_factory=dict)  # table -> rows
    duplicates: int = 0  # rows dropped as already written (window, batch or ClickHouse)
    dead_lettered: int = 0
    retries: int = 0  # failed insert (or dead-letter flush) attempts
    committed: int = 0  # records whose offsets were committed
    batches: int = 0

    @property
    def rows(self) -> int:
        return sum(self.inserted.values())


SinkConsumer = GroupConsumer


@dataclass
class _Part:
    """One partition's share of a batch."""

    table: TableSpec
    rows: list[Row] = field(default_factory=list)
    records: int = 0  # fetched, including dead letters and duplicates
    next_offset: int = 0  # to commit once written


@dataclass
class _Batch:
    parts: dict[TopicPartition, _Part] = field(default_factory=dict)
    records: int = 0
    dead: int = 0  # dead letters sent, flushed before the commit
    started: float = 0.0  # monotonic s of the first record
    done: set[str] = field(default_factory=set)  # tables inserted (a retry skips them)
    inserted: bool = False


@dataclass
class _PartState:
    window: IdWindow
    verify: bool = True  # ask ClickHouse which ids it has before the next insert


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, sink: ClickHouseSink) -> None:
        self._sink = sink

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._sink._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._sink._on_assigned(assigned)


class ClickHouseSink:
    def __init__(self, *, bootstrap: str, store: ClickHouseStore, database: str,
                 dead_letters: EventSink, config: SinkConfig | None = None,
                 consumer: SinkConsumer | None = None) -> None:
        self.config = config or SinkConfig()
        if self.config.backoff_max_s < self.config.backoff_initial_s:
            raise AgentsError("backoff_max_s must not be below backoff_initial_s")
        self._decoders = {t: TopicDecoder(t) for t in self.config.topics}
        self._store = store
        self._database = database
        self._dlq = dead_letters
        self._consumer: SinkConsumer = consumer or AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=self.config.group_id,
            enable_auto_commit=False, auto_offset_reset="earliest", client_id="tokenweir-sink",
            # Small fetches (aiokafka's defaults), not big ones: the fetcher asks again
            # only once what it holds is consumed, so a big fetch leaves the loop idle
            # while it travels (8 MiB a partition measured ~1.5x slower end to end).
            max_partition_fetch_bytes=_FETCH_PARTITION_BYTES)
        self._states: dict[TopicPartition, _PartState] = {}
        # Held while a batch is inserted and committed: a revocation waits for it,
        # then drops the revoked partitions from every batch not yet written.
        self._io_lock = asyncio.Lock()
        self._collecting = _Batch()
        self._writing: _Batch | None = None
        self._write_failed = asyncio.Event()  # the batch being written failed at least once
        self.counters = SinkCounters()

    # -- main loop ---------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Write until ``stop`` is set; what was fetched and not written stays uncommitted."""
        self._consumer.subscribe(list(self.config.topics), listener=_Rebalance(self))
        await self._consumer.start()
        writer: asyncio.Task[None] | None = None
        try:
            with _batch_sized_collections():
                while not stop.is_set():
                    await self._collect(stop)
                    if writer is not None:
                        await self._wait_paused(writer, stop)
                        writer.result()
                        writer = None
                    if self._collecting.records:
                        batch, self._collecting = self._collecting, _Batch()
                        writer = asyncio.create_task(self._write(batch, stop),
                                                     name="sink-write")
                if writer is not None:
                    await writer
        finally:
            if writer is not None and not writer.done():
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
            await self._consumer.stop()

    async def _collect(self, stop: asyncio.Event) -> None:
        """Fetch into the collecting batch until it is full, old enough, or ``stop``."""
        if paused := self._consumer.paused():
            self._consumer.resume(*paused)
        cfg = self.config
        batch = self._collecting
        while not stop.is_set():
            room = cfg.batch_max_records - batch.records
            if room <= 0:
                return
            if batch.records:
                left_s = batch.started + cfg.batch_max_wait_s - time.monotonic()
                if left_s <= 0:
                    return
                timeout_ms = min(_POLL_MS, max(1, int(left_s * 1000)))
            else:
                timeout_ms = _POLL_MS
            # Small fetches keep each synchronous stretch (parse, decode) short, so the
            # writer's continuations (its insert came back) wait for the loop only briefly.
            fetched = await self._consumer.getmany(timeout_ms=timeout_ms,
                                                   max_records=min(room, _FETCH_RECORDS))
            if fetched:
                await self._add(fetched)

    async def _wait_paused(self, writer: asyncio.Task[None], stop: asyncio.Event) -> None:
        """Wait for the writer with fetching paused, polling so the group keeps us.

        A poll while paused drops what the fetcher had prefetched (aiokafka discards
        a paused partition's buffered records), and those would be fetched again: so
        a write that is going well is first awaited without pausing (the fetcher keeps
        at most one fetch per partition meanwhile); the pause starts once the write
        failed or outlasted one poll period.
        """
        if not self._write_failed.is_set():
            failed = asyncio.create_task(self._write_failed.wait())
            await asyncio.wait([writer, failed], timeout=_PAUSED_POLL_S,
                               return_when=asyncio.FIRST_COMPLETED)
            failed.cancel()
        while not writer.done():
            if assigned := self._consumer.assignment():
                self._consumer.pause(*assigned)
            # A partition assigned since is not paused: what it returns joins the batch.
            fetched = await self._consumer.getmany(timeout_ms=0)
            if fetched:
                await self._add(fetched)
            await asyncio.wait([writer], timeout=None if stop.is_set() else _PAUSED_POLL_S)

    async def _add(self, fetched: dict[TopicPartition, list[Record]]) -> None:
        batch = self._collecting
        if not batch.records:
            batch.started = time.monotonic()
        by_topic: dict[str, list[tuple[TopicPartition, list[Record]]]] = {}
        for tp, records in fetched.items():
            by_topic.setdefault(tp.topic, []).append((tp, records))
            batch.records += len(records)
            self.counters.fetched += len(records)
        for topic, chunks in by_topic.items():
            decoder = self._decoders[topic]
            decoded = decoder.decode([r.value for _, records in chunks for r in records])
            start = 0
            for tp, records in chunks:
                part = batch.parts.get(tp)
                if part is None:
                    part = batch.parts[tp] = _Part(table=decoder.table)
                rows = decoded.rows[start:start + len(records)]
                if decoded.bad:
                    rows = await self._dead_letter(decoded.bad, start, records, rows)
                part.rows.extend(rows)  # type: ignore[arg-type]  # Nones were dropped
                part.records += len(records)
                part.next_offset = records[-1].offset + 1
                start += len(records)

    async def _dead_letter(self, bad: dict[int, str], start: int, records: list[Record],
                           rows: list[Row | None]) -> list[Row | None]:
        for i, record in enumerate(records):
            reason = bad.get(start + i)
            if reason is None:
                continue
            await send_dead_letter(self._dlq, raw=record.value, key=record.key, reason=reason,
                                   topic=record.topic, partition=record.partition,
                                   offset=record.offset, consumer=CONSUMER_NAME)
            self._collecting.dead += 1
        return [r for r in rows if r is not None]

    # -- writing -----------------------------------------------------------------------
    async def _write(self, batch: _Batch, stop: asyncio.Event) -> None:
        """Insert and commit ``batch``, retrying with back-off until it works or ``stop``."""
        self._writing = batch
        self._write_failed.clear()
        delay = self.config.backoff_initial_s
        try:
            while True:
                async with self._io_lock:
                    try:
                        await self._write_once(batch)
                        return
                    except (ClickHouseError, StreamsError) as exc:
                        self._failed(batch)
                        log.warning("sink: writing %d records failed, retrying in %.2gs: %s",
                                    batch.records, delay, exc)
                if stop.is_set():
                    log.warning("sink: stopping with %d records unwritten (left uncommitted)",
                                batch.records)
                    return
                await _sleep_or_stop(delay, stop)
                delay = min(delay * 2, self.config.backoff_max_s)
        finally:
            self._writing = None

    def _failed(self, batch: _Batch) -> None:
        self.counters.retries += 1
        self._write_failed.set()
        for tp in batch.parts:
            if (state := self._states.get(tp)) is not None:
                state.verify = True

    async def _write_once(self, batch: _Batch) -> None:
        began = time.monotonic()
        if not batch.inserted:
            plan = await self._plan(batch)
            planned = time.monotonic()
            for table, (rows, dropped) in plan.items():
                if rows:
                    await self._store.insert(f"{self._database}.{table.name}", table.columns,
                                             rows)
                batch.done.add(table.name)
                inserted = self.counters.inserted
                inserted[table.name] = inserted.get(table.name, 0) + len(rows)
                self.counters.duplicates += dropped
            batch.inserted = True
            self._remember(batch)
            log.debug("sink: %d records: filtered in %.3fs, inserted in %.3fs", batch.records,
                      planned - began, time.monotonic() - planned)
        if batch.dead:
            await self._dlq.flush()
            self.counters.dead_lettered += batch.dead
            batch.dead = 0
        await self._commit(batch)
        self.counters.batches += 1

    async def _plan(self, batch: _Batch) -> dict[TableSpec, tuple[list[Row], int]]:
        """Per table not yet inserted: the rows of ids never written, and how many were not."""
        known = await self._known_ids(batch)
        plan: dict[TableSpec, tuple[list[Row], int]] = {}
        seen: dict[TableSpec, set[str]] = {}
        for tp, part in batch.parts.items():
            if part.table.name in batch.done:
                continue
            kept, dropped = fresh_rows(part.rows, self._state(tp).window,
                                       seen.setdefault(part.table, set()),
                                       known.get(part.table, frozenset()))
            rows, before = plan.get(part.table, ([], 0))
            rows.extend(kept)
            plan[part.table] = (rows, before + dropped)
        return plan

    async def _known_ids(self, batch: _Batch) -> dict[TableSpec, set[str]]:
        """Ids ClickHouse already has, for the partitions that must verify."""
        # Unsorted (sorting 20k ids costs ~8 ms of the event loop): a dict drops repeats.
        asked: dict[TableSpec, dict[str, None]] = {}
        for tp, part in batch.parts.items():
            if self._state(tp).verify and part.rows and part.table.name not in batch.done:
                asked.setdefault(part.table, {}).update(dict.fromkeys(row[0] for row in part.rows))
        return {table: await self._store.existing_ids(f"{self._database}.{table.name}",
                                                      table.id_column, list(ids))
                for table, ids in asked.items()}

    def _remember(self, batch: _Batch) -> None:
        for tp, part in batch.parts.items():
            state = self._state(tp)
            state.window.add_all(row[0] for row in part.rows)
            state.verify = False

    async def _commit(self, batch: _Batch) -> None:
        owned = self._consumer.assignment()
        offsets = {tp: p.next_offset for tp, p in batch.parts.items() if tp in owned}
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except KafkaError as exc:
            # The rows are in: a redelivery is filtered by the partition's next owner.
            log.warning("sink: commit failed (rows are written, a redelivery is filtered): %s",
                        exc)
            return
        self.counters.committed += sum(batch.parts[tp].records for tp in offsets)

    def _state(self, tp: TopicPartition) -> _PartState:
        state = self._states.get(tp)
        if state is None:
            state = self._states[tp] = _PartState(IdWindow(self.config.window_ids))
        return state

    # -- rebalances --------------------------------------------------------------------
    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self._io_lock:  # an insert in progress finishes (and commits) first
            for batch in (self._collecting, self._writing):
                if batch is not None:
                    _drop(batch, revoked)
            for tp in revoked:
                self._states.pop(tp, None)

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            self._states.setdefault(tp, _PartState(IdWindow(self.config.window_ids)))


def _drop(batch: _Batch, revoked: Iterable[TopicPartition]) -> None:
    """Forget revoked partitions' records: their next owner reads them again."""
    for tp in revoked:
        part = batch.parts.pop(tp, None)
        if part is not None:
            batch.records -= part.records


# Net new GC-tracked objects between young-generation collections while a sink runs.
_YOUNG_THRESHOLD = 100_000
_gc_holders = 0  # sinks running in this process (tests run several)
_gc_previous: tuple[int, int, int] = gc.get_threshold()  # what the last sink restores


@contextlib.contextmanager
def _batch_sized_collections() -> Iterator[None]:
    """Young-generation collections once per ~100k new objects, not per 700.

    A batch's rows are tracked tuples that live until the batch is written, so with
    the default threshold a collection ran every 700 rows and walked, besides them,
    the ~2,000 ConsumerRecords of the fetch being decoded: ~1,100 collections and
    ~7 % of the sink's time per 500k records, against one collection of ~50 ms at
    this threshold. What is alive now (modules, pydantic schemas: ~60k objects)
    lives as long as the process, so it is frozen out of the full collections.
    The previous state comes back on the way out: chDB's shutdown needs its
    objects collected normally.
    """
    global _gc_holders, _gc_previous
    if _gc_holders == 0:
        _gc_previous = gc.get_threshold()
        gc.freeze()
        gc.set_threshold(_YOUNG_THRESHOLD, *_gc_previous[1:])
    _gc_holders += 1
    try:
        yield
    finally:
        _gc_holders -= 1
        if _gc_holders == 0:
            gc.set_threshold(*_gc_previous)
            gc.unfreeze()


async def _sleep_or_stop(delay_s: float, stop: asyncio.Event) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=delay_s)
    except TimeoutError:
        pass


async def run_sink(settings: Settings, config: SinkConfig | None = None) -> None:
    """The sink as a process: until SIGTERM or SIGINT."""
    from infra.stack import clickhouse_store
    from streams.sink import KafkaEventSink

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    store = clickhouse_store(settings)
    dlq = KafkaEventSink(settings.bootstrap, client_id="tokenweir-sink")
    await dlq.start()
    try:
        await ClickHouseSink(bootstrap=settings.bootstrap, store=store,
                             database=settings.clickhouse_database, dead_letters=dlq,
                             config=config).run(stop)
    finally:
        await dlq.stop()
        await store.close()
