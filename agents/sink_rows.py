"""The sink's pure part: records of one topic -> ClickHouse rows, and the id windows.

No I/O here. :class:`TopicDecoder` validates a whole batch of raw values at
once (one JSON array, one msgspec call into Structs derived from the event
model, see :mod:`agents.sink_fast`) and only when that fails falls back to the
pydantic model one record at a time, which finds the bad ones and their
reasons. Every table's first column is its idempotency key (request, decision,
event or alert id), so ``row[0]`` is the id the dedupe filter works on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter
from typing import Any, cast

from pydantic import TypeAdapter, ValidationError

from agents import AgentsError
from agents.sink_fast import FastDecoder, Unsupported
from schemas.events import (
    Alert,
    HealthEvent,
    InferenceResult,
    Rejection,
    Reply,
    ScaleDecision,
    UsageEvent,
)
from streams import DecodeError
from streams.codec import decode
from streams.topics import ALERTS, HEALTH, RESPONSES, SCALE, USAGE

log = logging.getLogger(__name__)
Row = tuple[Any, ...]

# Raw values joined into one JSON array with this separator. A raw newline is
# not allowed inside a JSON string, and a comma cannot follow ':' '[' or ',',
# so a string or value cannot span two records: a batch that parses holds
# exactly the records' own documents (their count is checked as well).
_JOIN = b",\n"
# Records validated per decoding call. The call holds the GIL throughout, so
# a long one would stall the store's thread (its Arrow building and the return
# from chDB) for as long: small calls let the two threads interleave.
DECODE_CHUNK = 1000


@dataclass(frozen=True)
class TableSpec:
    name: str
    columns: tuple[str, ...]  # the first is the idempotency key

    @property
    def id_column(self) -> str:
        return self.columns[0]


USAGE_TABLE = TableSpec("usage_events", (
    "request_id", "tenant", "model", "input_tokens", "output_tokens", "cached_tokens", "images",
    "model_units", "status", "queue_s", "ttft_s", "tpot_s", "worker", "shard", "finished_at"))
RESULTS_TABLE = TableSpec("request_results", (
    "request_id", "tenant", "model", "status", "finish_reason", "error", "input_tokens",
    "output_tokens", "queue_s", "ttft_s", "tpot_s", "total_s", "worker", "shard",
    "completed_at"))
SCALE_TABLE = TableSpec("scale_decisions", (
    "decision_id", "model", "current", "desired", "reason", "demand_stable_mu_per_min",
    "demand_panic_mu_per_min", "utilisation", "decided_at"))
HEALTH_TABLE = TableSpec("health_events", (
    "event_id", "worker", "model", "previous", "state", "reason", "at"))
ALERTS_TABLE = TableSpec("alerts", (
    "alert_id", "rule", "subject", "severity", "message", "value", "threshold", "fired_at"))


# DateTime columns get epoch seconds; both stores truncate fractional ones to the
# second. The usage row is every column straight from the event, so the row is
# built by one C call (a Python function building it cost ~0.3 µs/event more).
_usage_row: Callable[[UsageEvent], Row] = attrgetter(*USAGE_TABLE.columns)


NO_SHARD = -1  # request_results.shard when the reply names none (rejections)


def _reply_row(e: InferenceResult | Rejection) -> Row:
    if e.kind == "rejection":  # not isinstance: a Rejection's Struct is no Rejection
        return (e.request_id, e.tenant, e.model, "rejected", "", e.reason, 0, 0, 0.0, 0.0, 0.0,
                0.0, "", NO_SHARD, int(e.rejected_at))
    t, u = e.timings, e.usage
    return (e.request_id, e.tenant, e.model, e.status, e.finish_reason or "", e.error or "",
            u.input_tokens, u.output_tokens, t.queue_s, t.ttft_s, t.tpot_s, t.total_s,
            e.worker or "", NO_SHARD if e.shard is None else e.shard, int(e.completed_at))


def _scale_row(e: ScaleDecision) -> Row:
    return (e.decision_id, e.model, e.current, e.desired, e.reason, e.demand_stable_mu_per_min,
            e.demand_panic_mu_per_min, e.utilisation, int(e.decided_at))


def _health_row(e: HealthEvent) -> Row:
    return (e.event_id, e.worker, e.model, e.previous or "", e.state, e.reason, int(e.at))


def _alert_row(e: Alert) -> Row:
    return (e.alert_id, e.rule, e.subject, e.severity, e.message, e.value, e.threshold,
            int(e.fired_at))


@dataclass(frozen=True)
class _Mapping:
    table: TableSpec
    kind: Any  # the event type (or union) the topic carries
    to_row: Callable[[Any], Row]  # of a model instance or its Struct (same attributes)


_MAPPINGS: dict[str, _Mapping] = {
    USAGE: _Mapping(USAGE_TABLE, UsageEvent, _usage_row),
    RESPONSES: _Mapping(RESULTS_TABLE, Reply, _reply_row),
    SCALE: _Mapping(SCALE_TABLE, ScaleDecision, _scale_row),
    HEALTH: _Mapping(HEALTH_TABLE, HealthEvent, _health_row),
    ALERTS: _Mapping(ALERTS_TABLE, Alert, _alert_row),
}
SINK_TOPICS: tuple[str, ...] = tuple(_MAPPINGS)
TABLES: tuple[TableSpec, ...] = tuple(m.table for m in _MAPPINGS.values())


@dataclass
class DecodedBatch:
    """Rows aligned with the input values; ``None`` where ``bad`` has the reason."""

    rows: list[Any]  # rows, or events when decoded without a row mapping
    bad: dict[int, str] = field(default_factory=dict)  # input index -> reason


class BatchDecoder:
    """Raw values -> events of ``kind``, each mapped by ``to_row`` (the events themselves
    when None): all at once through the fast Struct decoder when every value is good,
    else one by one through pydantic, whose reasons name the bad ones."""

    def __init__(self, kind: Any, to_row: Callable[[Any], Any] | None = None) -> None:
        self._one: TypeAdapter[Any] = TypeAdapter(kind)
        self._many: TypeAdapter[list[Any]] = TypeAdapter(cast(Any, list)[kind])
        self._to_row = to_row
        self._fast = _fast_decoder(kind)

    def decode(self, values: Sequence[bytes | None]) -> DecodedBatch:
        if len(values) <= DECODE_CHUNK:
            return self._decode_chunk(values)
        out = DecodedBatch(rows=[])
        for start in range(0, len(values), DECODE_CHUNK):
            part = self._decode_chunk(values[start:start + DECODE_CHUNK])
            out.rows.extend(part.rows)
            out.bad.update((start + i, reason) for i, reason in part.bad.items())
        return out

    def _decode_chunk(self, values: Sequence[bytes | None]) -> DecodedBatch:
        joined = _joined(values)
        if joined is not None:
            rows = self._rows_of_all(joined, len(values))
            if rows is not None:
                return DecodedBatch(rows=rows)
        return self._decode_each(values)

    def _rows_of_all(self, joined: bytes, count: int) -> list[Row | None] | None:
        """Rows of every value at once, or None when any one is bad."""
        if self._fast is not None:
            events = self._fast.decode(joined)
            if events is None:
                return None
        else:
            try:
                events = self._many.validate_json(joined, strict=True)
            except ValidationError:
                return None
        if len(events) != count:
            return None
        return events if self._to_row is None else list(map(self._to_row, events))

    def _decode_each(self, values: Sequence[bytes | None]) -> DecodedBatch:
        out = DecodedBatch(rows=[])
        for i, raw in enumerate(values):
            try:
                event = decode(raw, self._one)
            except DecodeError as exc:
                out.rows.append(None)
                out.bad[i] = exc.reason
                continue
            out.rows.append(event if self._to_row is None else self._to_row(event))
        return out


class TopicDecoder(BatchDecoder):
    """Raw values of one topic -> rows of its table."""

    def __init__(self, topic: str) -> None:
        mapping = _MAPPINGS.get(topic)
        if mapping is None:
            raise AgentsError(f"the sink does not read topic {topic!r}; it reads {SINK_TOPICS}")
        super().__init__(mapping.kind, mapping.to_row)
        self.topic = topic
        self.table = mapping.table


def _fast_decoder(kind: Any) -> FastDecoder | None:
    try:
        return FastDecoder(kind)
    except Unsupported:
        log.warning("sink: no fast decoding for %r: pydantic decodes it", kind, exc_info=True)
        return None


def _joined(values: Sequence[bytes | None]) -> bytes | None:
    """One JSON array of the values; None when one is null or not an object's text."""
    try:
        if sum(map(bytes.startswith, values, repeat(b"{"))) != len(values):  # type: ignore[arg-type]
            return None
        return b"[" + _JOIN.join(values) + b"]"  # type: ignore[arg-type]
    except TypeError:  # a null value
        return None


class IdWindow:
    """The ids written most recently: at least the last ``capacity``, at most twice that.

    Two generations of sets: ids go into the current one, and when it holds
    ``capacity`` it becomes the previous one (the one before is forgotten).
    Every operation is a set operation in C; a queue of ids in write order,
    trimmed one by one, cost ~10 % of the sink's time at 100k events/s.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise AgentsError(f"id window capacity must be at least 1, not {capacity}")
        self.capacity = capacity
        self._current: set[str] = set()
        self._previous: set[str] = set()

    def __contains__(self, item: object) -> bool:
        return item in self._current or item in self._previous

    def __len__(self) -> int:
        return len(self._current) + len(self._previous - self._current)

    def isdisjoint(self, ids: set[str]) -> bool:
        return self._current.isdisjoint(ids) and self._previous.isdisjoint(ids)

    def add_all(self, ids: Iterable[str]) -> None:
        self._current.update(ids)
        if len(self._current) >= self.capacity:
            self._previous, self._current = self._current, set()


def fresh_rows(rows: Iterable[Row], window: IdWindow, seen: set[str],
               known: set[str] | frozenset[str] = frozenset()) -> tuple[list[Row], int]:
    """Rows whose id is in none of ``window`` (written before), ``seen`` (earlier in this
    batch; updated) and ``known`` (found in ClickHouse); and how many were dropped."""
    rows = list(rows)
    ids = [row[0] for row in rows]
    unique = set(ids)
    if (len(unique) == len(ids) and unique.isdisjoint(seen) and window.isdisjoint(unique)
            and unique.isdisjoint(known)):
        seen |= unique  # the usual case, checked in C: nothing to drop
        return rows, 0
    kept: list[Row] = []
    dropped = 0
    for row in rows:
        rid = row[0]
        if rid in seen or rid in window or rid in known:
            dropped += 1
            continue
        seen.add(rid)
        kept.append(row)
    return kept, dropped
