"""What every actuator shares: which decisions to apply (pure) and the ``tw.scale`` reader."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import TypeAdapter

from infra import InfraError
from schemas.events import HealthEvent, ScaleDecision
from streams import DecodeError
from streams.codec import decode
from streams.topics import HEALTH, SCALE

log = logging.getLogger(__name__)
T = TypeVar("T")
_DECISION: TypeAdapter[ScaleDecision] = TypeAdapter(ScaleDecision)
_HEALTH: TypeAdapter[HealthEvent] = TypeAdapter(HealthEvent)
SCALE_TAIL = 500  # decisions read back at start to find each model's latest
_SEEN_IDS = 10_000  # decision ids remembered for duplicate detection


class DecisionGate:
    """Applies each model's newest decision once: older ``decided_at`` and seen ids are dropped."""

    def __init__(self) -> None:
        self._latest: dict[str, float] = {}  # model -> decided_at (s) of the last applied
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()

    def accept(self, decision: ScaleDecision) -> bool:
        if decision.decision_id in self._seen:
            return False  # redelivered, or decided twice from one window
        if decision.decided_at < self._latest.get(decision.model, float("-inf")):
            return False  # stale: a newer decision for this model was applied
        self._seen[decision.decision_id] = None
        if len(self._seen) > _SEEN_IDS:
            self._seen.popitem(last=False)
        self._latest[decision.model] = decision.decided_at
        return True


def latest_per_model(decisions: list[ScaleDecision]) -> list[ScaleDecision]:
    """Each model's newest decision (by ``decided_at``, then log order)."""
    latest: dict[str, ScaleDecision] = {}
    for d in decisions:
        if d.model not in latest or d.decided_at >= latest[d.model].decided_at:
            latest[d.model] = d
    return list(latest.values())


ApplyDecision = Callable[[ScaleDecision], Awaitable[None]]
OnHealth = Callable[[HealthEvent], Awaitable[None]]
OnIdle = Callable[[], Awaitable[None]]


async def follow_decisions(bootstrap: str, stop: asyncio.Event, apply: ApplyDecision, *,
                           on_health: OnHealth | None = None, on_idle: OnIdle | None = None,
                           idle_s: float = 1.0) -> None:
    """Apply the latest decision per model from the tail of ``tw.scale``, then every new
    accepted one; health events (from now on) go to ``on_health``; ``on_idle`` runs at
    least every ``idle_s`` (reconciliation)."""
    gate = DecisionGate()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    scale, health = TopicPartition(SCALE, 0), TopicPartition(HEALTH, 0)
    tps = [scale, health] if on_health else [scale]
    try:
        await consumer.start()
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        begin = (await consumer.beginning_offsets([scale]))[scale]
        consumer.seek(scale, max(begin, ends[scale] - SCALE_TAIL))
        if on_health:
            consumer.seek(health, ends[health])
        backlog: list[ScaleDecision] = []
        caught_up = ends[scale] <= begin
        next_idle = time.monotonic()
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=int(idle_s * 500))
            for record in batches.get(scale, []):
                decision = _decode(record.value, _DECISION, SCALE)
                if decision is not None:
                    if caught_up:
                        if gate.accept(decision):
                            await apply(decision)
                    else:
                        backlog.append(decision)
                if not caught_up and record.offset + 1 >= ends[scale]:
                    caught_up = True
                    for latest in latest_per_model(backlog):
                        if gate.accept(latest):
                            await apply(latest)
                    backlog = []
            for record in batches.get(health, []):
                event = _decode(record.value, _HEALTH, HEALTH)
                if event is not None and on_health is not None:
                    await on_health(event)
            if on_idle is not None and time.monotonic() >= next_idle:
                await on_idle()
                next_idle = time.monotonic() + idle_s
    except KafkaError as exc:
        raise InfraError(f"actuator: reading {SCALE}: {exc!r}") from exc
    finally:
        await consumer.stop()


def _decode(raw: bytes | None, adapter: TypeAdapter[T], topic: str) -> T | None:
    try:
        return decode(raw, adapter)
    except DecodeError as exc:
        # Not ours to dead-letter (the producer's consumers do): skip it, loudly.
        log.warning("actuator: unusable record on %s skipped: %s", topic, exc.reason)
        return None
