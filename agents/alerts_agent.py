"""The alerting agent: streams and consumer lag in, Alerts on ``tw.alerts`` out.

It reads ``tw.responses``, ``tw.health`` and ``tw.scale``, polls every
consumer group's lag through the Kafka admin API every ``lag_interval_s``,
feeds each observation to the pure :class:`agents.alerting.AlertEvaluator` and
produces what it decides, keyed ``<rule>/<subject>``. It joins no consumer
group and commits nothing, so it never shows up in the lag it watches.

A restart neither blinds it nor repeats it. It first reads back the alerts it
published within the longest cooldown, whose cooldowns then hold as before.
Then it starts its topics the longest window back (by record time), so its
windows are full at once. A record from before the start is observed at its
record time, and a later one at the clock. An alert that fires from the replay
is one that was missed while the agent was down.

A record that does not decode is dead-lettered to ``tw.dlq`` with its reason;
a failed lag poll or produce is logged and counted. Neither stops the agent.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from pydantic import TypeAdapter

from agents import AgentsError
from agents.alerting import (
    AlertEvaluator,
    AlertState,
    ConsumerLag,
    Observation,
    alert_key,
    load_rules,
    with_scaling_maxima,
)
from infra import InfraError
from infra.alerts import tail_alerts
from schemas.config import Settings
from schemas.errors import SchemaError
from schemas.events import Alert, HealthEvent, Reply, ScaleDecision
from schemas.tenancy import load_config
from streams import StreamsError
from streams.client import reply_partitions as topic_partitions
from streams.consumer import seek_to_time
from streams.deadletter import decode_or_dead_letter
from streams.lag import group_lags
from streams.sink import EventSink
from streams.topics import ALERTS, HEALTH, RESPONSES, SCALE

log = logging.getLogger(__name__)

_ADAPTERS: dict[str, TypeAdapter[Any]] = {
    RESPONSES: TypeAdapter(Reply),
    HEALTH: TypeAdapter(HealthEvent),
    SCALE: TypeAdapter(ScaleDecision),
}
SWEEP_S = 30.0  # how often emptied windows and ended cooldowns are forgotten


class LagSource(Protocol):
    async def poll(self) -> list[ConsumerLag]: ...


class KafkaLagSource:
    """Lag of every consumer group: log end minus committed offset, summed over partitions."""

    def __init__(self, bootstrap: str, *, groups: list[str] | None = None) -> None:
        self._bootstrap = bootstrap
        self._groups = groups or ["*"]  # glob patterns: groups to poll at all
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
        self._ends = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                      client_id="tokenweir-alerter-lag")

    async def start(self) -> None:
        try:
            await self._admin.start()
            await self._ends.start()
        except KafkaError as exc:
            await self.stop()
            raise AgentsError(f"cannot reach {self._bootstrap} for lag: {exc!r}") from exc

    async def stop(self) -> None:
        await self._ends.stop()
        await self._admin.close()

    async def poll(self) -> list[ConsumerLag]:
        lags = await group_lags(self._admin, self._ends, self._groups)
        return [ConsumerLag(group=g, lag=lag) for g, lag in lags.items()]


class AlertAgent:
    def __init__(self, bootstrap: str, evaluator: AlertEvaluator, sink: EventSink, *,
                 lag_source: LagSource | None = None, lag_interval_s: float = 10.0,
                 clock: Callable[[], float] = time.time, name: str = "alerter") -> None:
        self._bootstrap = bootstrap
        self._evaluator = evaluator
        self._sink = sink
        self._lag_source = lag_source
        self._lag_interval_s = lag_interval_s
        self._clock = clock
        self.name = name
        self.state = AlertState()
        # When run() began (epoch s): older records are replayed, observed at their own
        # time. Until then every record is observed at the clock.
        self._started_at = -math.inf
        # observed, dead_lettered, alerts, lag_polls, lag_poll_errors, produce_errors
        self.counts: collections.Counter[str] = collections.Counter()

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=self._bootstrap, enable_auto_commit=False,
                                    client_id=f"tokenweir-{self.name}")
        self._started_at = self._clock()
        try:
            await consumer.start()
            await self._restore_cooldowns()
            await self._assign_from(consumer, self._started_at - self._evaluator.lookback_s)
        except KafkaError as exc:
            await consumer.stop()
            raise AgentsError(f"alerter cannot read its topics: {exc!r}") from exc
        except BaseException:
            await consumer.stop()
            raise
        tasks = [asyncio.create_task(self._poll_lag(stop), name="alerter-lag"),
                 asyncio.create_task(self._sweep(stop), name="alerter-sweep")]
        if ready is not None:
            ready.set()
        try:
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=500, max_records=1000)
                for records in batches.values():
                    for record in records:
                        await self._handle(record)
                if batches:
                    await self._flush()
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._flush()
            await consumer.stop()

    async def _assign_from(self, consumer: AIOKafkaConsumer, since: float) -> None:
        tps = []
        for topic in _ADAPTERS:
            try:
                partitions = await topic_partitions(self._bootstrap, topic)
            except StreamsError as exc:
                raise AgentsError(f"{exc} (run `tokenweir up`)") from exc
            tps += [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        await seek_to_time(consumer, tps, since)
        # Resolve positions now: a record produced after ready is set is never skipped.
        for tp in tps:
            await consumer.position(tp)

    async def _restore_cooldowns(self) -> None:
        """Read back the alerts published within the longest cooldown."""
        def restore(alert: Alert) -> None:
            self._evaluator.restore(self.state, alert)
            self.counts["cooldowns_restored"] += 1

        since = self._started_at - self._evaluator.longest_cooldown_s
        try:
            skipped = await tail_alerts(self._bootstrap, restore, since=since)
        except InfraError as exc:
            raise AgentsError(f"alerter cannot read back its alerts: {exc}") from exc
        if skipped:
            log.warning("alerter: %d undecodable records on %s skipped", skipped, ALERTS)

    async def _handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        try:
            event = await decode_or_dead_letter(
                self._sink, _ADAPTERS[record.topic], raw=record.value, key=record.key,
                topic=record.topic, partition=record.partition, offset=record.offset,
                consumer=self.name)
        except StreamsError as exc:
            self.counts["produce_errors"] += 1
            log.warning("cannot dead-letter %s@%d: %s", record.topic, record.offset, exc)
            return
        if event is None:
            self.counts["dead_lettered"] += 1
            return
        at = record.timestamp / 1000
        await self._observe(event, at if 0 < at < self._started_at else None)

    async def _observe(self, obs: Observation, at: float | None = None) -> None:
        """``at``: when it happened (epoch s) if not now (a record from before the start)."""
        self.counts["observed"] += 1
        for alert in self._evaluator.observe(self.state, obs, self._clock() if at is None else at):
            try:
                await self._sink.send(ALERTS, alert, key=alert_key(alert))
            except StreamsError as exc:
                self.counts["produce_errors"] += 1
                log.warning("cannot publish alert %s: %s", alert_key(alert), exc)
                continue
            self.counts["alerts"] += 1
            log.info("alert %s: %s", alert_key(alert), alert.message)

    async def _flush(self) -> None:
        try:
            await self._sink.flush()
        except StreamsError as exc:
            self.counts["produce_errors"] += 1
            log.warning("alerts not acknowledged: %s", exc)

    async def _poll_lag(self, stop: asyncio.Event) -> None:
        if self._lag_source is None:
            return
        while not stop.is_set():
            try:
                lags = await self._lag_source.poll()
            except KafkaError as exc:
                self.counts["lag_poll_errors"] += 1
                log.warning("consumer lag poll failed: %r", exc)
            else:
                self.counts["lag_polls"] += 1
                for lag in lags:
                    await self._observe(lag)
                await self._flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._lag_interval_s)

    async def _sweep(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SWEEP_S)
            self._evaluator.sweep(self.state, self._clock())


def scaling_maxima(settings: Settings) -> dict[str, int]:
    """Each configured model's max replicas as the autoscaler sees them ([scaling] section)."""
    if settings.control_config is None:
        return {}
    from agents.autoscaler import load_autoscaler_config

    try:
        scaling = load_autoscaler_config(load_config(settings.control_config))
        # The max does not depend on capacity; any positive capacity validates.
        return {m: scaling.scaling(m, 1.0).max_replicas for m in settings.models}
    except SchemaError as exc:
        raise AgentsError(f"alerter: {exc}") from exc


async def serve(settings: Settings, rules_path: Path | None = None, *,
                lag_interval_s: float = 10.0, say: Callable[[str], None] = print) -> None:
    """Run the alerter until SIGTERM or SIGINT (``tokenweir alerter``)."""
    from streams.sink import KafkaEventSink

    bootstrap = settings.bootstrap
    maxima = scaling_maxima(settings)
    rules = with_scaling_maxima(load_rules(rules_path), maxima)
    evaluator = AlertEvaluator(rules)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sink = KafkaEventSink(bootstrap, client_id="tokenweir-alerter")
    lags = KafkaLagSource(bootstrap)
    try:
        await sink.start()
    except StreamsError as exc:
        raise AgentsError(str(exc)) from exc
    try:
        await lags.start()
        agent = AlertAgent(bootstrap, evaluator, sink, lag_source=lags,
                           lag_interval_s=lag_interval_s)
        ready = asyncio.Event()
        ready_task = asyncio.create_task(ready.wait())
        ready_task.add_done_callback(lambda _: say(
            f"alerter: {len(evaluator.rules)} rules "
            f"({', '.join(r.name for r in evaluator.rules)}), publishing to {ALERTS}"
            + (f"; autoscaler max replicas {maxima}" if maxima else "")))
        await agent.run(stop, ready)
        ready_task.cancel()
        say(f"alerter: stopped ({dict(agent.counts)})")
    finally:
        await lags.stop()
        await sink.stop()
