"""The ClickHouse sink without Kafka or ClickHouse: decoding per topic, the id windows,
duplicate filtering, commit-after-insert, back-off and dead letters.

An in-memory consumer stands in for aiokafka and :class:`MemoryStore` for ClickHouse.
"""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Callable
from typing import Annotated, Any

import pytest
from aiokafka.structs import ConsumerRecord
from pydantic import BaseModel, StringConstraints, TypeAdapter

from agents import AgentsError
from agents.sink import ClickHouseSink, SinkConfig
from agents.sink_fast import FastDecoder, Unsupported
from agents.sink_rows import (
    NO_SHARD,
    USAGE_TABLE,
    IdWindow,
    TopicDecoder,
    fresh_rows,
)
from infra.clickhouse.memory import MemoryStore
from schemas.events import (
    Alert,
    DeadLetter,
    HealthEvent,
    InferenceRequest,
    Rejection,
    ScaleDecision,
)
from streams.codec import decode, encode
from streams.sink import MemoryEventSink
from streams.topics import ALERTS, DLQ, HEALTH, RESPONSES, SCALE, USAGE
from tests.builders import make_result, make_usage
from tests.fakes import FakeGroupConsumer

DB = "tw"
Record = ConsumerRecord[bytes, bytes]
DEAD: TypeAdapter[DeadLetter] = TypeAdapter(DeadLetter)
FAST = SinkConfig(batch_max_records=100, batch_max_wait_s=0.02, backoff_initial_s=0.01,
                  backoff_max_s=0.04)


# -- pure: decoding ---------------------------------------------------------------------


def test_decode_usage_maps_every_column_with_epoch_seconds() -> None:
    event = make_usage(request_id="u-1", cached_tokens=3, images=1, queue_s=0.5,
                       finished_at=1_790_000_000.75)
    batch = TopicDecoder(USAGE).decode([encode(event)])
    assert batch.bad == {}
    # The stores truncate finished_at to the second (contract test on both backends).
    assert batch.rows == [("u-1", "acme", "tiny-llama", 10, 5, 3, 1, 0.06, "ok", 0.5, 0.0, 0.0,
                           "w-1", 0, 1_790_000_000.75)]


@pytest.mark.parametrize(("event", "expected"), [
    pytest.param(make_result(request_id="r-ok", finish_reason="stop", worker="w-2", shard=3,
                             completed_at=1000.0),
                 ("r-ok", "acme", "tiny-llama", "ok", "stop", "", 0, 0, 0.0, 0.0, 0.0, 0.0,
                  "w-2", 3, 1000), id="result"),
    pytest.param(make_result(request_id="r-err", status="error", error="boom",
                             completed_at=2000.0),
                 ("r-err", "acme", "tiny-llama", "error", "", "boom", 0, 0, 0.0, 0.0, 0.0, 0.0,
                  "", NO_SHARD, 2000), id="error-without-worker"),
    pytest.param(Rejection(request_id="r-no", tenant="acme", model="tiny-llama",
                           reason="rate_limited", rejected_at=3000.9),
                 ("r-no", "acme", "tiny-llama", "rejected", "", "rate_limited", 0, 0, 0.0, 0.0,
                  0.0, 0.0, "", NO_SHARD, 3000), id="rejection"),
])
def test_decode_replies_to_request_results(event: Any, expected: tuple[Any, ...]) -> None:
    assert TopicDecoder(RESPONSES).decode([encode(event)]).rows == [expected]


def test_decode_scale_health_alerts() -> None:
    scale = ScaleDecision(decision_id="d-1", model="m", current=1, desired=3, reason="up",
                          utilisation=0.9, decided_at=10.0)
    health = HealthEvent(event_id="h-1", worker="w-1", model="m", previous=None,
                         state="suspect", reason="late", at=20.0)
    alert = Alert(alert_id="a-1", rule="lag", subject="sink", severity="warning", message="m",
                  value=None, threshold=5.0, fired_at=30.0)
    assert TopicDecoder(SCALE).decode([encode(scale)]).rows == [
        ("d-1", "m", 1, 3, "up", 0.0, 0.0, 0.9, 10)]
    assert TopicDecoder(HEALTH).decode([encode(health)]).rows == [
        ("h-1", "w-1", "m", "", "suspect", "late", 20)]
    assert TopicDecoder(ALERTS).decode([encode(alert)]).rows == [
        ("a-1", "lag", "sink", "warning", "m", None, 5.0, 30)]


def test_decode_batch_with_bad_records_keeps_the_good_ones() -> None:
    good = [encode(make_usage(request_id=f"g-{i}")) for i in range(3)]
    values: list[bytes | None] = [good[0], b'{"tenant": ', good[1], None,
                                  encode(make_result()), good[2]]
    batch = TopicDecoder(USAGE).decode(values)
    assert [r[0] if r else None for r in batch.rows] == ["g-0", None, "g-1", None, None, "g-2"]
    assert batch.bad[1].startswith("invalid JSON")
    assert batch.bad[3] == "empty record (null value)"
    assert "Extra inputs are not permitted" in batch.bad[4]


def test_decode_large_batch_in_chunks_keeps_indices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agents.sink_rows.DECODE_CHUNK", 3)
    values: list[bytes | None] = [usage(f"c-{i}") for i in range(8)]
    values[4] = b"{"
    batch = TopicDecoder(USAGE).decode(values)
    assert list(batch.bad) == [4]
    assert [r[0] if r else None for r in batch.rows] == [
        "c-0", "c-1", "c-2", "c-3", None, "c-5", "c-6", "c-7"]


def test_decode_records_that_only_parse_when_joined_are_bad() -> None:
    # Each half alone is not JSON; naively joined with "," they would form two documents.
    whole = encode(make_usage(request_id="x-1")).decode()
    head, tail = whole[:-20], whole[-20:]
    batch = TopicDecoder(USAGE).decode([f'{whole},{head}'.encode(), tail.encode()])
    assert set(batch.bad) == {0, 1}


def _variant(base: Any, changes: dict[str, Any]) -> bytes:
    """``base`` as JSON with top-level or dotted (nested) keys changed or dropped."""
    doc = json.loads(encode(base))
    for path, value in changes.items():
        *outer, key = path.split(".")
        target = doc
        for name in outer:
            target = target[name]
        if value is _DROP:
            target.pop(key)
        else:
            target[key] = value
    return json.dumps(doc).encode()


def _usage_variant(**changes: Any) -> bytes:
    return _variant(make_usage(request_id="v-1", cached_tokens=2, queue_s=0.25), changes)


_DROP = object()
# (changes, whether the fast path should take the record itself): where it does not,
# the model decides alone. Both verdicts must always match the model's.
USAGE_VARIANTS = [
    pytest.param({}, True, id="valid"),
    pytest.param({"cached_tokens": _DROP, "status": _DROP, "images": _DROP, "queue_s": _DROP,
                  "schema_version": _DROP}, True, id="defaults"),
    pytest.param({"input_tokens": "10"}, False, id="string-for-int"),
    pytest.param({"input_tokens": 10.0}, False, id="float-for-int"),
    pytest.param({"input_tokens": True}, False, id="bool-for-int"),
    pytest.param({"model_units": 1}, True, id="int-for-float"),
    pytest.param({"model_units": True}, False, id="bool-for-float"),
    pytest.param({"model_units": 1e400}, False, id="float-overflow"),
    pytest.param({"input_tokens": 2**70}, True, id="huge-int"),
    pytest.param({"output_tokens": -1}, False, id="negative"),
    pytest.param({"queue_s": -0.5}, False, id="negative-float"),
    pytest.param({"tenant": "bad tenant!"}, False, id="pattern"),
    pytest.param({"tenant": "acme\n"}, False, id="pattern-trailing-newline"),
    pytest.param({"tenant": "\nacme"}, False, id="pattern-leading-newline"),
    pytest.param({"worker": "w\u00e9"}, False, id="pattern-non-ascii"),
    pytest.param({"model": "m" * 64}, True, id="pattern-longest"),
    pytest.param({"model": "m" * 65}, False, id="pattern-too-long"),
    pytest.param({"request_id": "x" * 200}, False, id="too-long-id"),
    pytest.param({"request_id": ""}, False, id="empty-id"),
    pytest.param({"status": "weird"}, False, id="literal"),
    pytest.param({"status": None}, False, id="literal-null"),
    pytest.param({"schema_version": 2}, False, id="schema-version"),
    pytest.param({"schema_version": 1.0}, False, id="schema-version-float"),
    pytest.param({"schema_version": True}, False, id="schema-version-bool"),
    pytest.param({"extra": 1}, False, id="extra-field"),
    pytest.param({"worker": _DROP}, False, id="missing-required"),
    pytest.param({"shard": None}, False, id="null"),
    pytest.param({"finished_at": _DROP}, True, id="default-factory"),
]


def _typed(rows: list[Any] | None) -> list[Any] | None:
    """Rows with each value's type: 1 == 1.0, but an Int column is no Float column."""
    if rows is None:
        return None
    return [None if row is None else [(type(v), v) for v in row] for row in rows]


def _assert_paths_agree(topic: str, raw: bytes, fast_takes: bool,
                        factory_column: int | None = None) -> None:
    decoder = TopicDecoder(topic)
    by_model = decoder._decode_each([raw])  # the pydantic model, one record
    fast = decoder._rows_of_all(b"[" + raw + b"]", 1)  # the batch path's Structs
    full = decoder.decode([raw, raw])  # the batch path with its fallback
    assert (fast is not None) == fast_takes
    model_rows: list[Any] = by_model.rows
    if factory_column is not None and fast is not None:  # a default factory (now)
        fast = [row[:factory_column] + row[factory_column + 1:] for row in fast]
        model_rows = [row[:factory_column] + row[factory_column + 1:] for row in model_rows]
    if fast is not None:
        assert model_rows[0] is not None and _typed(fast) == _typed(model_rows)
    assert full.bad == {i: reason for i in (0, 1) for reason in by_model.bad.values()}
    if factory_column is None:
        assert _typed(full.rows) == _typed(model_rows * 2)


@pytest.mark.parametrize(("changes", "fast_takes"), USAGE_VARIANTS)
def test_decode_batch_fast_path_agrees_with_the_model(changes: dict[str, Any],
                                                      fast_takes: bool) -> None:
    factory = len(USAGE_TABLE.columns) - 1 if "finished_at" in changes else None
    _assert_paths_agree(USAGE, _usage_variant(**changes), fast_takes, factory)


_RESULT = make_result(request_id="r-1", finish_reason="stop", worker="w-2", shard=3,
                      completed_at=1000.5)
_REJECTION = Rejection(request_id="r-2", tenant="acme", model="tiny-llama",
                       reason="rate_limited", retry_after_s=1.5, rejected_at=2000.0)
REPLY_VARIANTS = [
    pytest.param(_RESULT, {}, True, id="result"),
    pytest.param(_REJECTION, {}, True, id="rejection"),
    pytest.param(_RESULT, {"usage.input_tokens": 7, "timings.ttft_s": 0.5}, True,
                 id="result-nested-values"),
    pytest.param(_RESULT, {"usage": _DROP, "timings": _DROP, "worker": None, "shard": None,
                           "finish_reason": None, "error": None}, True,
                 id="result-nested-defaults-and-nulls"),
    pytest.param(_RESULT, {"token_ids": [1, 2, 3]}, True, id="result-token-ids"),
    pytest.param(_RESULT, {"token_ids": [1, True]}, False, id="result-token-ids-bool"),
    pytest.param(_RESULT, {"usage.extra": 1}, False, id="result-nested-extra"),
    pytest.param(_RESULT, {"timings.queue_s": -1.0}, False, id="result-nested-negative"),
    pytest.param(_RESULT, {"usage": None}, False, id="result-nested-null"),
    pytest.param(_RESULT, {"kind": _DROP}, False, id="result-no-discriminator"),
    pytest.param(_RESULT, {"kind": "other"}, False, id="result-bad-discriminator"),
    pytest.param(_RESULT, {"kind": "rejection"}, False, id="result-as-rejection"),
    pytest.param(_RESULT, {"worker": "w\n"}, False, id="result-optional-pattern"),
    pytest.param(_RESULT, {"error": "e" * 1025}, False, id="result-too-long-text"),
    pytest.param(_RESULT, {"error": "\U0001f600" * 1024}, True, id="result-text-in-code-points"),
    pytest.param(_RESULT, {"error": "\u00e9" * 1025}, False, id="result-too-long-non-ascii"),
    pytest.param(_REJECTION, {"reason": "because"}, False, id="rejection-literal"),
    pytest.param(_REJECTION, {"retry_after_s": None, "detail": "d" * 1024}, True,
                 id="rejection-optional-null-longest-text"),
    pytest.param(_REJECTION, {"tenant": "acme\n"}, False, id="rejection-pattern"),
]


@pytest.mark.parametrize(("event", "changes", "fast_takes"), REPLY_VARIANTS)
def test_decode_replies_fast_path_agrees_with_the_model(event: Any, changes: dict[str, Any],
                                                        fast_takes: bool) -> None:
    _assert_paths_agree(RESPONSES, _variant(event, changes), fast_takes)


@pytest.mark.parametrize(("topic", "event", "changes", "fast_takes"), [
    pytest.param(SCALE, ScaleDecision(decision_id="d-1", model="m", current=1, desired=3,
                                      reason="up", decided_at=10.0), {}, True, id="scale"),
    pytest.param(SCALE, ScaleDecision(decision_id="d-1", model="m", current=1, desired=3,
                                      reason="up", decided_at=10.0),
                 {"current": -1}, False, id="scale-negative"),
    pytest.param(HEALTH, HealthEvent(event_id="h-1", worker="w-1", model="m", previous=None,
                                     state="suspect", reason="late", at=20.0),
                 {}, True, id="health"),
    pytest.param(HEALTH, HealthEvent(event_id="h-1", worker="w-1", model="m", previous=None,
                                     state="suspect", reason="late", at=20.0),
                 {"previous": "dead"}, False, id="health-literal"),
    pytest.param(ALERTS, Alert(alert_id="a-1", rule="lag", subject="sink", severity="warning",
                               message="m", value=None, threshold=5.0, fired_at=30.0),
                 {}, True, id="alert"),
    pytest.param(ALERTS, Alert(alert_id="a-1", rule="lag", subject="sink", severity="warning",
                               message="m", value=None, threshold=5.0, fired_at=30.0),
                 {"value": "high"}, False, id="alert-type"),
])
def test_decode_other_topics_fast_path_agrees_with_the_model(
        topic: str, event: Any, changes: dict[str, Any], fast_takes: bool) -> None:
    _assert_paths_agree(topic, _variant(event, changes), fast_takes)


@pytest.mark.parametrize("raw", [
    pytest.param(b'{"request_id": "v-1", "request_id": "v-2"}', id="duplicate-key"),
    pytest.param(b'{"tenant": "\\ud800"}', id="lone-surrogate"),
    pytest.param(b'{"model_units": NaN}', id="nan"),
])
def test_decode_batch_fast_path_agrees_on_odd_json(raw: bytes) -> None:
    doc = _usage_variant().decode()
    spliced = ("{" + raw.decode()[1:-1] + ", " + doc[1:]).encode()  # odd member(s) first
    decoder = TopicDecoder(USAGE)
    by_model = decoder._decode_each([spliced])
    assert decoder.decode([spliced]).rows == by_model.rows
    assert decoder.decode([spliced]).bad == by_model.bad


def test_fast_decoder_refuses_a_model_with_validators() -> None:
    # A Struct would not run the validator: such a model keeps the pydantic batch path.
    with pytest.raises(Unsupported, match="validators"):
        FastDecoder(InferenceRequest)


def test_fast_decoder_refuses_a_pattern_in_a_nested_model() -> None:
    class Inner(BaseModel):
        name: Annotated[str, StringConstraints(pattern=r"^a$")]

    class Outer(BaseModel):
        inner: Inner

    with pytest.raises(Unsupported, match="top-level"):
        FastDecoder(Outer)


def test_decoder_refuses_unknown_topic() -> None:
    with pytest.raises(AgentsError, match="does not read"):
        TopicDecoder("tw.requests")


# -- pure: dedupe ------------------------------------------------------------------------


def test_id_window_keeps_at_least_capacity_and_forgets_beyond_twice() -> None:
    window = IdWindow(3)
    window.add_all(["a", "a", "b"])
    window.add_all(["c"])  # 3 ids: they become the previous generation
    window.add_all(["d", "e"])
    assert all(x in window for x in "abcde") and len(window) == 5
    window.add_all(["f"])  # a second full generation: a, b, c are forgotten
    assert not any(x in window for x in "abc") and all(x in window for x in "def")
    assert window.isdisjoint({"a", "z"}) and not window.isdisjoint({"f"})
    with pytest.raises(AgentsError):
        IdWindow(0)


def test_fresh_rows_drops_window_batch_and_known_duplicates() -> None:
    window = IdWindow(10)
    window.add_all(["old"])
    seen: set[str] = set()
    rows = [("old", 1), ("new", 2), ("new", 3), ("stored", 4), ("other", 5)]
    kept, dropped = fresh_rows(rows, window, seen, {"stored"})
    assert kept == [("new", 2), ("other", 5)] and dropped == 3
    assert seen == {"new", "other"}


# -- the runner ---------------------------------------------------------------------------


class TracingStore(MemoryStore):
    def __init__(self, trace: list[str]) -> None:
        super().__init__()
        self.trace = trace

    def _store(self, table: str, columns: Any, rows: Any) -> None:
        super()._store(table, columns, rows)
        self.trace.append(f"insert {table.split('.')[-1]} {len(rows)}")


class Rig:
    def __init__(self, partitions: dict[str, int] | None = None,
                 config: SinkConfig = FAST) -> None:
        self.trace: list[str] = []
        self.consumer = FakeGroupConsumer(partitions or {USAGE: 2, RESPONSES: 1}, self.trace)
        self.store = TracingStore(self.trace)
        self.dlq = MemoryEventSink()
        self.config = config

    def sink(self) -> ClickHouseSink:
        return ClickHouseSink(bootstrap="unused:9092", store=self.store, database=DB,
                              dead_letters=self.dlq, config=self.config, consumer=self.consumer)

    async def run_until(self, done: Callable[[ClickHouseSink], bool],
                        sink: ClickHouseSink | None = None,
                        timeout_s: float = 5.0) -> ClickHouseSink:
        sink = sink or self.sink()
        stop = asyncio.Event()
        task = asyncio.create_task(sink.run(stop))
        try:
            async with asyncio.timeout(timeout_s):
                while not done(sink):
                    if task.done():
                        task.result()
                    await asyncio.sleep(0.005)
        finally:
            stop.set()
            await task
        return sink

    def usage_ids(self) -> list[object]:
        return self.store.ids(f"{DB}.usage_events", "request_id")

    def all_committed(self) -> bool:
        return all(self.consumer.committed.get(tp, 0) == len(records)
                   for tp, records in self.consumer.log.items())


def usage(request_id: str) -> bytes:
    return encode(make_usage(request_id=request_id))


async def test_sink_writes_usage_and_replies_then_commits() -> None:
    rig = Rig()
    for i in range(5):
        rig.consumer.produce(USAGE, usage(f"u-{i}"), partition=i % 2)
    rig.consumer.produce(RESPONSES, encode(make_result(request_id="r-1")))
    rig.consumer.produce(RESPONSES, encode(Rejection(request_id="r-2", tenant="acme",
                                                     model="tiny-llama", reason="invalid")))
    sink = await rig.run_until(lambda s: rig.all_committed())
    assert sorted(rig.usage_ids()) == [f"u-{i}" for i in range(5)]  # type: ignore[type-var]
    statuses = sorted(r["status"] for r in rig.store.tables[f"{DB}.request_results"])
    assert statuses == ["ok", "rejected"]
    assert sink.counters.inserted == {"usage_events": 5, "request_results": 2}
    assert sink.counters.committed == 7 and sink.counters.duplicates == 0


async def test_sink_duplicates_within_and_across_batches_are_dropped() -> None:
    rig = Rig(partitions={USAGE: 1})
    for rid in ("a", "b", "a", "c", "b"):  # duplicates within one batch
        rig.consumer.produce(USAGE, usage(rid))
    sink = rig.sink()
    await rig.run_until(lambda s: rig.all_committed(), sink)
    for rid in ("c", "d", "a"):  # redelivered later: caught by the window, not ClickHouse
        rig.consumer.produce(USAGE, usage(rid))
    lookups = len(rig.store.lookups)
    await rig.run_until(lambda s: rig.all_committed(), sink)
    assert sorted(rig.usage_ids()) == ["a", "b", "c", "d"]  # type: ignore[type-var]
    assert sink.counters.duplicates == 4
    assert len(rig.store.lookups) == lookups  # the window answered, no lookup


async def test_sink_first_batch_after_restart_checks_clickhouse() -> None:
    rig = Rig(partitions={USAGE: 1})
    for rid in ("a", "b"):
        rig.consumer.produce(USAGE, usage(rid))
    await rig.run_until(lambda s: rig.all_committed())
    # Redelivery after a crash between insert and commit: the offsets go back.
    rig.consumer.committed.clear()
    rig.consumer.produce(USAGE, usage("c"))
    restarted = await rig.run_until(lambda s: rig.all_committed())
    assert sorted(rig.usage_ids()) == ["a", "b", "c"]  # type: ignore[type-var]
    assert restarted.counters.duplicates == 2 and restarted.counters.inserted == {
        "usage_events": 1}
    assert any(sorted(ids) == ["a", "b", "c"] for _, ids in rig.store.lookups)


async def test_sink_id_lookup_drops_what_clickhouse_already_has() -> None:
    rig = Rig(partitions={USAGE: 1})
    rig.store.tables[f"{DB}.usage_events"] = [{"request_id": "id-4"}]  # written before
    for i in range(6):
        rig.consumer.produce(USAGE, usage(f"id-{i}"))
    sink = await rig.run_until(lambda s: rig.all_committed())
    assert [(t, sorted(ids)) for t, ids in rig.store.lookups] == [
        (f"{DB}.usage_events", [f"id-{i}" for i in range(6)])]
    assert sink.counters.duplicates == 1 and sink.counters.inserted == {"usage_events": 5}


async def test_sink_commits_only_after_the_insert() -> None:
    rig = Rig(partitions={USAGE: 1})
    for i in range(3):
        rig.consumer.produce(USAGE, usage(f"u-{i}"))
    await rig.run_until(lambda s: rig.all_committed())
    assert [t for t in rig.trace if t != "stop"] == ["insert usage_events 3",
                                                    "commit tw.usage/0=3"]


@pytest.mark.parametrize("landed", [pytest.param(False, id="failed-insert-lost"),
                                    pytest.param(True, id="failed-insert-landed")])
async def test_sink_store_failures_back_off_pause_and_lose_nothing(landed: bool) -> None:
    rig = Rig(partitions={USAGE: 2})
    rig.store.fail_inserts = 3
    rig.store.land_before_failing = landed  # an insert that raised may still have landed
    for i in range(300):
        rig.consumer.produce(USAGE, usage(f"u-{i}"), partition=i % 2)
    sink = await rig.run_until(lambda s: rig.all_committed())
    assert sorted(rig.usage_ids()) == sorted(f"u-{i}" for i in range(300))  # type: ignore[type-var]
    assert sink.counters.retries == 3 and rig.consumer.ever_paused
    # Rows of a landed failure are found in ClickHouse on the retry: counted as duplicates.
    assert sink.counters.inserted["usage_events"] == (0 if landed else 300)
    assert sink.counters.duplicates == (300 if landed else 0)
    first_commit = next(i for i, t in enumerate(rig.trace) if t.startswith("commit"))
    assert rig.trace[:first_commit] == ["insert usage_events 100"]


async def test_sink_store_unreachable_commits_nothing_until_back() -> None:
    rig = Rig(partitions={USAGE: 1})
    rig.store.down = True
    for i in range(10):
        rig.consumer.produce(USAGE, usage(f"u-{i}"))
    sink = await rig.run_until(lambda s: s.counters.retries >= 3)
    assert rig.consumer.committed == {} and rig.usage_ids() == []
    rig.store.down = False
    await rig.run_until(lambda s: rig.all_committed(), sink)
    assert len(rig.usage_ids()) == 10


async def test_sink_commit_failure_does_not_insert_again() -> None:
    rig = Rig(partitions={USAGE: 1})
    rig.consumer.fail_commits = 1
    for i in range(3):
        rig.consumer.produce(USAGE, usage(f"u-{i}"))
    sink = await rig.run_until(lambda s: s.counters.batches >= 1)
    assert rig.consumer.committed == {} and len(rig.usage_ids()) == 3
    rig.consumer.produce(USAGE, usage("u-3"))
    rig.consumer.committed.clear()
    restarted = await rig.run_until(lambda s: rig.all_committed())
    assert sorted(rig.usage_ids()) == [f"u-{i}" for i in range(4)]  # type: ignore[type-var]
    assert restarted.counters.duplicates == 3 and sink.counters.retries == 0


async def test_sink_bad_record_goes_to_dead_letters_and_is_committed() -> None:
    rig = Rig(partitions={USAGE: 1})
    rig.consumer.produce(USAGE, usage("u-0"))
    rig.consumer.produce(USAGE, b"not json")
    rig.consumer.produce(USAGE, encode(make_usage(request_id="u-2")).replace(b'"shard":0',
                                                                              b'"shard":-1'))
    rig.consumer.produce(USAGE, usage("u-3"))
    sink = await rig.run_until(lambda s: rig.all_committed())
    assert rig.usage_ids() == ["u-0", "u-3"]
    dead = [decode(r.value, DEAD) for r in rig.dlq.on(DLQ)]
    assert [(d.origin_offset, d.consumer) for d in dead] == [(1, "sink"), (2, "sink")]
    assert dead[0].raw == b"not json" and dead[0].reason.startswith("invalid JSON")
    assert "shard" in dead[1].reason
    assert sink.counters.dead_lettered == 2 and rig.dlq.flushed == 2


def test_sink_config_rejects_inverted_backoff() -> None:
    with pytest.raises(AgentsError, match="backoff"):
        ClickHouseSink(bootstrap="x:1", store=MemoryStore(), database=DB,
                       dead_letters=MemoryEventSink(),
                       config=SinkConfig(backoff_initial_s=5, backoff_max_s=1),
                       consumer=FakeGroupConsumer({USAGE: 1}))


async def test_sink_overlapping_runs_restore_the_gc_settings_once_both_stop() -> None:
    # Sinks raise the young-generation threshold while they run (several may share a
    # process); the process's own settings come back only after the last one stops.
    before = gc.get_threshold()
    first, second = Rig(), Rig()
    first.consumer.produce(USAGE, usage("u-1"))
    second.consumer.produce(USAGE, usage("u-2"))
    stop_first, stop_second = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(first.sink().run(stop_first)),
             asyncio.create_task(second.sink().run(stop_second))]
    try:
        async with asyncio.timeout(5):
            while not (first.all_committed() and second.all_committed()):
                for task in tasks:
                    if task.done():
                        task.result()  # a sink's own error, not a timeout
                await asyncio.sleep(0.005)
        assert gc.get_threshold()[0] > before[0] and gc.get_freeze_count() > 0
        stop_first.set()
        await tasks[0]
        assert gc.get_threshold()[0] > before[0]  # the second still runs
    finally:
        stop_first.set()
        stop_second.set()
        await asyncio.gather(*tasks)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
