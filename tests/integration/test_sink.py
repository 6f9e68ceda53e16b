"""The ClickHouse sink on real Kafka and real ClickHouse (chDB and the server):
exact row counts, per-minute sums, duplicates, a redelivery, and a server outage."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import pytest

from agents.sink import ClickHouseSink, SinkConfig
from bench.sink_outage import outage_run, set_group_offsets
from infra.clickhouse.migrate import migrate
from infra.clickhouse.store import ClickHouseStore
from schemas.config import Settings
from schemas.events import Alert, HealthEvent, Rejection, ScaleDecision
from streams.codec import encode
from streams.sink import KafkaEventSink
from streams.topics import ALERTS, HEALTH, RESPONSES, SCALE, USAGE
from tests.builders import make_result, make_usage
from tests.integration.conftest import eventually

_ids = itertools.count()
TOPICS = (USAGE, RESPONSES, SCALE, HEALTH, ALERTS)
MINUTE = 1_790_000_040.0  # epoch s at the start of a minute



class Member:
    """One sink of a group, started and stopped by the test."""

    def __init__(self, settings: Settings, store: ClickHouseStore, database: str,
                 group: str) -> None:
        self.dlq = KafkaEventSink(settings.bootstrap, client_id="test-sink-dlq")
        self.sink = ClickHouseSink(bootstrap=settings.bootstrap, store=store, database=database,
                                   dead_letters=self.dlq,
                                   config=SinkConfig(group_id=group, batch_max_wait_s=0.2))
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Member:
        await self.dlq.start()
        self._task = asyncio.create_task(self.sink.run(self._stop))
        return self

    async def until(self, done: Callable[[ClickHouseSink], bool],
                    timeout_s: float = 60.0) -> None:
        assert self._task is not None
        async with asyncio.timeout(timeout_s):
            while not done(self.sink):
                if self._task.done():
                    self._task.result()  # the sink's own failure, not a timeout
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self._task is None or self._stop.is_set():
            return
        self._stop.set()
        await self._task
        await self.dlq.stop()


class RunningSink:
    """A fresh member per run: started, run until ``done``, stopped."""

    def __init__(self, settings: Settings, store: ClickHouseStore, database: str,
                 group: str) -> None:
        self.settings, self.store, self.database, self.group = settings, store, database, group

    async def run_until(self, done: Callable[[ClickHouseSink], bool],
                        timeout_s: float = 60.0) -> ClickHouseSink:
        member = await Member(self.settings, self.store, self.database, self.group).start()
        try:
            await member.until(done, timeout_s)
        finally:
            await member.stop()
        return member.sink


async def produce(bootstrap: str, records: list[tuple[str, bytes]]) -> None:
    producer = KafkaEventSink(bootstrap, client_id="test-sink-producer")
    await producer.start()
    try:
        for topic, value in records:
            await producer.send(topic, value, key=b"k")
        await producer.flush()
    finally:
        await producer.stop()


def traffic(tag: str) -> tuple[list[tuple[str, bytes]], dict[str, int]]:
    """Every kind of record, with duplicates and one bad record; and the rows expected."""
    usage = [encode(make_usage(request_id=f"{tag}-u{i}", tenant="acme" if i % 2 else "globex",
                               input_tokens=10 * i, output_tokens=i, model_units=0.25 * i,
                               finished_at=MINUTE + i)) for i in range(40)]
    results = [encode(make_result(request_id=f"{tag}-r{i}", completed_at=MINUTE + i))
               for i in range(10)]
    rejections = [encode(Rejection(request_id=f"{tag}-x{i}", tenant="acme", model="tiny-llama",
                                   reason="rate_limited", rejected_at=MINUTE)) for i in range(5)]
    scale = [encode(ScaleDecision(decision_id=f"{tag}-d{i}", model="tiny-llama", current=1,
                                  desired=2, reason="up", decided_at=MINUTE)) for i in range(3)]
    health = [encode(HealthEvent(event_id=f"{tag}-h{i}", worker="w-1", model="tiny-llama",
                                 previous="healthy", state="suspect", reason="late",
                                 at=MINUTE)) for i in range(2)]
    alerts = [encode(Alert(alert_id=f"{tag}-a{i}", rule="lag", subject="sink",
                           severity="warning", message="lagging", value=3.0, fired_at=MINUTE))
              for i in range(2)]
    records = ([(USAGE, v) for v in usage] + [(USAGE, usage[3]), (USAGE, usage[7])]  # dups
               + [(RESPONSES, v) for v in results + rejections] + [(RESPONSES, results[0])]
               + [(SCALE, v) for v in scale + scale[:1]] + [(HEALTH, v) for v in health]
               + [(ALERTS, v) for v in alerts + alerts] + [(USAGE, b'{"not": "usage"}')])
    expected = {"usage_events": 40, "request_results": 15, "scale_decisions": 3,
                "health_events": 2, "alerts": 2}
    return records, expected


async def counts(store: ClickHouseStore, database: str) -> dict[str, tuple[int, int]]:
    out = {}
    for table, key in (("usage_events", "request_id"), ("request_results", "request_id"),
                       ("scale_decisions", "decision_id"), ("health_events", "event_id"),
                       ("alerts", "alert_id")):
        [(rows, distinct)] = await store.query(
            f"SELECT count(), uniqExact({key}) FROM {database}.{table}")
        out[table] = (int(rows), int(distinct))
    return out


async def test_sink_writes_every_topic_exactly_once_and_survives_redelivery(
        store, settings, stack):
    n = next(_ids)
    database, group, tag = f"tw_sink_{n}", f"test-sink-{store.backend}-{n}", f"s{n}"
    await migrate(store, database)
    start = await set_group_offsets(settings.bootstrap, group, TOPICS)
    records, expected = traffic(tag)
    await produce(settings.bootstrap, records)
    runner = RunningSink(settings, store, database, group)

    first = await runner.run_until(lambda s: s.counters.committed >= len(records))
    assert first.counters.dead_lettered == 1
    assert first.counters.duplicates == len(records) - 1 - sum(expected.values())
    assert await counts(store, database) == {t: (n, n) for t, n in expected.items()}
    [(requests, input_tokens, mu)] = await store.query(
        f"SELECT sum(requests), sum(input_tokens), sum(model_units) "
        f"FROM {database}.usage_minute")
    assert (requests, input_tokens, mu) == (40, 10 * sum(range(40)), 0.25 * sum(range(40)))
    [(replies, ok, rejected)] = await store.query(
        f"SELECT sum(replies), sum(ok), sum(rejected) FROM {database}.results_minute")
    assert (replies, ok, rejected) == (15, 10, 5)

    # A crash after the insert and before the commit: the group reads it all again.
    await set_group_offsets(settings.bootstrap, group, TOPICS,
                            {tp: o for tp, o in start.items() if tp.topic in TOPICS})
    again = await runner.run_until(lambda s: s.counters.committed >= len(records))
    assert again.counters.rows == 0
    assert again.counters.duplicates == len(records) - 1
    assert await counts(store, database) == {t: (n, n) for t, n in expected.items()}
    [(requests_after,)] = await store.query(
        f"SELECT sum(requests) FROM {database}.usage_minute")
    assert requests_after == 40


@pytest.mark.parametrize("outage_s", [pytest.param(10.0, id="10s")])
async def test_sink_clickhouse_server_outage_loses_and_duplicates_nothing(
        outage_s, settings, stack):
    n = next(_ids)
    result = await outage_run(settings, f"tw_sink_outage_{n}", outage_s=outage_s,
                              before_s=3.0, after_s=3.0, rate_per_s=300.0,
                              group=f"test-sink-outage-{n}", prefix=f"o{n}", say=print)
    assert result["produced"] > 3000
    assert result["retries"] >= 1
    assert result["lost"] == 0 and result["duplicated"] == 0
    assert result["rows"] == result["distinct"] == result["produced"]


async def test_sink_members_joining_and_leaving_mid_stream_write_each_event_once(
        store, settings, stack):
    """Two sinks of one group over a live stream: the second joins while the first is
    writing (a rebalance takes partitions from it), then the first leaves (its
    partitions move to the second). Each event lands exactly once."""
    n = next(_ids)
    database, group, tag = f"tw_sink_{n}", f"test-sink-members-{store.backend}-{n}", f"m{n}"
    await migrate(store, database)
    await set_group_offsets(settings.bootstrap, group, (USAGE,))
    events = [(f"{tag}-{i}".encode(), encode(make_usage(request_id=f"{tag}-{i}",
                                                          finished_at=MINUTE + i % 60)))
              for i in range(4000)]

    async def stream() -> None:  # keyed by request: every partition gets some; ~16 s
        producer = KafkaEventSink(settings.bootstrap, client_id="test-sink-producer")
        await producer.start()
        try:
            for i, (key, value) in enumerate(events, 1):
                await producer.send(USAGE, value, key=key)
                if i % 50 == 0:  # acknowledged in paced steps, the last one included
                    await producer.flush()
                    await asyncio.sleep(0.2)
        finally:
            await producer.stop()

    async def all_rows() -> bool:
        [(count,)] = await store.query(f"SELECT count() FROM {database}.usage_events")
        return int(count) >= len(events)

    producing = asyncio.create_task(stream())
    first = await Member(settings, store, database, group).start()
    second = Member(settings, store, database, group)
    try:
        await first.until(lambda s: s.counters.rows >= 200)
        await second.start()
        await second.until(lambda s: s.counters.rows > 0)
        assert not producing.done()  # both joined mid-stream
        await first.stop()
        await producing
        assert await eventually(all_rows, timeout_s=90, interval_s=0.2)
    finally:
        await first.stop()
        await second.stop()
        await producing
    [(count, distinct)] = await store.query(
        f"SELECT count(), uniqExact(request_id) FROM {database}.usage_events")
    assert (count, distinct) == (len(events), len(events))
    [(requests,)] = await store.query(f"SELECT sum(requests) FROM {database}.usage_minute")
    assert requests == len(events)
