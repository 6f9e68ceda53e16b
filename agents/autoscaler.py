"""The autoscaler agent: demand windows on ``tw.demand``, ScaleDecisions on ``tw.scale``.

Two steps joined by a topic, so that the policy sees exactly what was recorded:

- **demand** (:func:`run_demand`): reads admitted MU (``tw.shard.<model>``), throttled MU
  and answers (``tw.responses``), heartbeats (``tw.heartbeats``) and the latest decisions
  (``tw.scale``) into a :class:`agents.demand.DemandAggregator` and publishes one
  :class:`DemandWindow` per model every ``tick_s`` to ``tw.demand`` (key model).
- **decide** (:func:`run_decisions`): consumes ``tw.demand`` and runs every window
  through :class:`ScaleLoop` — :class:`agents.scaling.ScalingPolicy`, the class the trace
  simulator drives — producing a :class:`ScaleDecision` when desired ≠ current, when the
  desired count changes, and every ``resend_s`` otherwise (so that a restarted actuator
  hears the current target soon). Decision ids are derived from the window, so a
  window decided twice gives the same id and actuators drop the duplicate.

State. The policy's state is a function of the windows of the last stabilisation
window (plus the shorter start-up and panic look-backs), and ``tw.demand`` keeps them.
A restarted decide step therefore rebuilds it by replaying, silently, the windows of
the last ``restore_s`` up to its committed offset, then goes on deciding from there:
no state topic of its own, and the windows stay the one source of truth.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Annotated, Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from agents import AgentsError
from agents.demand import DemandAggregator
from agents.scaling import DemandWindow, ScalingConfig, ScalingPolicy, ScalingState, agent_decide
from schemas.config import Settings
from schemas.errors import ConfigError
from schemas.events import Rejection, ScaleDecision, WorkerHeartbeat
from schemas.tenancy import ControlPlaneConfig, load_config
from streams import DecodeError
from streams.codec import decode
from streams.consumer import seek_to_time
from streams.deadletter import decode_or_dead_letter
from streams.sink import EventSink, KafkaEventSink
from streams.topics import (
    DEMAND,
    HEARTBEATS,
    RESERVED_MU_HEADER,
    RESPONSES,
    SCALE,
    registry,
    shard_topic,
)

log = logging.getLogger(__name__)
_WINDOW: TypeAdapter[DemandWindow] = TypeAdapter(DemandWindow)
_BEAT: TypeAdapter[WorkerHeartbeat] = TypeAdapter(WorkerHeartbeat)
_REJECTION: TypeAdapter[Rejection] = TypeAdapter(Rejection)
_DECISION: TypeAdapter[ScaleDecision] = TypeAdapter(ScaleDecision)
DECIDE_GROUP = "tw.autoscaler"
_SCALE_TAIL = 500  # decisions read back at start to learn the replicas asked for
Overrides = dict[str, float | int]  # ScalingConfig fields


class AutoscalerConfig(BaseModel):
    """The ``[scaling]`` section of the control-plane file::

        [scaling]
        tick_s = 2
        policy = { stabilisation_s = 300, target_utilisation = 0.65 }
        [scaling.models.tiny-llama]
        min_replicas = 1
        max_replicas = 4

    ``policy`` and ``models.<m>`` hold :class:`ScalingConfig` fields (per model over
    every model); a model's ``capacity_mu_per_min`` defaults to its cost model's.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tick_s: Annotated[float, Field(gt=0)] = 2.0  # s between windows
    stable_window_s: Annotated[float, Field(gt=0)] = 60.0  # s, long demand window
    panic_window_s: Annotated[float, Field(gt=0)] = 6.0  # s, short demand window
    beat_timeout_s: Annotated[float, Field(gt=0)] = 5.0  # s without a beat: worker gone
    resend_s: Annotated[float, Field(ge=0)] = 30.0  # s, unchanged decision re-sent (0: never)
    policy: Overrides = {}
    models: dict[str, Overrides] = {}

    @model_validator(mode="after")
    def _policies_valid(self) -> AutoscalerConfig:
        for model in ("*", *self.models):
            self.scaling(model, 1.0)  # raises on an unknown field or a bad value
        return self

    def scaling(self, model: str, capacity_mu_per_min: float) -> ScalingConfig:
        fields: dict[str, Any] = {"capacity_mu_per_min": capacity_mu_per_min,
                                  **self.policy, **self.models.get(model, {})}
        try:
            return ScalingConfig(**fields)
        except ValidationError as exc:
            raise ConfigError(f"[scaling] for model {model}: {exc}") from exc

    def restore_s(self, config: ScalingConfig) -> float:
        """Seconds of windows that rebuild a model's policy state exactly."""
        return config.stabilisation_s + max(config.startup_s, config.panic_s) + 2 * self.tick_s


def load_autoscaler_config(control: ControlPlaneConfig) -> AutoscalerConfig:
    try:
        return AutoscalerConfig.model_validate(control.scaling)
    except ValidationError as exc:
        raise ConfigError(f"[scaling]: {exc}") from exc


class ScaleLoop:
    """Windows in, the decisions worth publishing out; one policy state per model. Pure."""

    def __init__(self, config_for: Callable[[str], ScalingConfig], *, resend_s: float) -> None:
        self._config_for = config_for
        self._resend_s = resend_s  # s of window time
        self._policies: dict[str, ScalingPolicy] = {}
        self.states: dict[str, ScalingState] = {}
        self._sent: dict[str, ScaleDecision] = {}

    def policy(self, model: str) -> ScalingPolicy:
        if model not in self._policies:
            self._policies[model] = ScalingPolicy(self._config_for(model))
        return self._policies[model]

    def step(self, window: DemandWindow, *, publish: bool = True) -> ScaleDecision | None:
        """Decide on ``window``; the decision when it should go out. ``publish=False``:
        a window replayed to rebuild state, decided (and published) before a restart."""
        state = self.states.get(window.model, ScalingState())
        state, decision = agent_decide(self.policy(window.model), state, window)
        self.states[window.model] = state
        if not publish:
            return None
        last = self._sent.get(window.model)
        due = (last is None or decision.desired != decision.current
               or decision.desired != last.desired
               or (self._resend_s > 0 and window.at - last.decided_at >= self._resend_s))
        if not due:
            return None
        self._sent[window.model] = decision
        return decision


def capacity_for(control: ControlPlaneConfig, config: AutoscalerConfig) -> Callable[[str],
                                                                                     ScalingConfig]:
    def config_for(model: str) -> ScalingConfig:
        return config.scaling(model, control.cost(model).capacity_mu_per_min)

    return config_for


def load(settings: Settings) -> tuple[ControlPlaneConfig, AutoscalerConfig]:
    control = load_config(settings.control_config) if settings.control_config else (
        ControlPlaneConfig())
    return control, load_autoscaler_config(control)


# -- decide ---------------------------------------------------------------------------------
async def run_decisions(settings: Settings, stop: asyncio.Event, *,
                        sink: EventSink | None = None) -> None:
    """Consume ``tw.demand`` and publish ScaleDecisions until ``stop`` is set."""
    control, config = load(settings)
    loop = ScaleLoop(capacity_for(control, config), resend_s=config.resend_s)
    restore_s = max(config.restore_s(loop.policy(m).config) for m in settings.models)
    own_sink = sink is None
    out: EventSink = sink or KafkaEventSink(settings.bootstrap, client_id="autoscaler-decide")
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=DECIDE_GROUP,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    tp = TopicPartition(DEMAND, 0)
    try:
        if own_sink:
            await out.start()  # type: ignore[attr-defined]
        await consumer.start()
        consumer.assign([tp])
        live_from = await _restore_position(consumer, tp, restore_s)
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=500)
            records = batches.get(tp, [])
            if not records:
                continue
            for record in records:
                await _decide_one(loop, out, record, publish=record.offset >= live_from)
            await out.flush()
            await consumer.commit({tp: records[-1].offset + 1})
    except KafkaError as exc:
        raise AgentsError(f"autoscaler decide step: {exc!r}") from exc
    finally:
        await consumer.stop()
        if own_sink:
            await out.stop()  # type: ignore[attr-defined]


async def _restore_position(consumer: AIOKafkaConsumer, tp: TopicPartition,
                            restore_s: float) -> int:
    """Seek to where state must be rebuilt from; the first offset whose decisions go out."""
    committed = await consumer.committed(tp)
    end = (await consumer.end_offsets([tp]))[tp]
    found = (await consumer.offsets_for_times({tp: int((time.time() - restore_s) * 1000)}))[tp]
    begin = found.offset if found is not None else end
    if committed is None or committed <= begin:
        # Nothing decided in the look-back (first start, or down for longer than it):
        # every window from there on is new.
        consumer.seek(tp, begin)
        return begin
    consumer.seek(tp, begin)
    log.info("autoscaler: rebuilding state from %d windows before offset %d",
             committed - begin, committed)
    return committed


async def _decide_one(loop: ScaleLoop, sink: EventSink, record: ConsumerRecord[bytes, bytes],
                      *, publish: bool) -> None:
    window = await decode_or_dead_letter(
        sink, _WINDOW, raw=record.value, key=record.key, topic=record.topic,
        partition=record.partition, offset=record.offset, consumer="autoscaler")
    if window is None:
        return
    try:
        decision = loop.step(window, publish=publish)
    except ConfigError as exc:
        log.error("autoscaler: no policy for %s: %s", window.model, exc)
        return
    if decision is not None:
        await sink.send(SCALE, decision, key=decision.model)


# -- demand ---------------------------------------------------------------------------------
class DemandReader:
    """Feeds records of the observed topics to a :class:`DemandAggregator` (no Kafka here)."""

    def __init__(self, aggregator: DemandAggregator) -> None:
        self.aggregator = aggregator
        self._shard_topics = {shard_topic(m): m for m in aggregator.models}

    def feed(self, topic: str, value: bytes | None, headers: Any, timestamp_ms: int) -> None:
        if value is None:
            return
        try:
            if topic in self._shard_topics:
                self._routed(self._shard_topics[topic], value, headers, timestamp_ms / 1000.0)
            elif topic == RESPONSES:
                self._reply(value)
            elif topic == HEARTBEATS:
                self.aggregator.heartbeat(decode(value, _BEAT))
            elif topic == SCALE:
                decision = decode(value, _DECISION)
                self.aggregator.asked(decision.model, decision.desired, decision.decided_at)
        except (DecodeError, ValueError, TypeError, KeyError) as exc:
            # Another agent's topic: its owner dead-letters what is malformed; we skip it.
            log.debug("autoscaler: skipped a record of %s: %s", topic, exc)

    def _routed(self, model: str, value: bytes, headers: Any, at: float) -> None:
        mu = next((float(v.decode()) for k, v in headers or () if k == RESERVED_MU_HEADER),
                  None)
        if mu is None or not math.isfinite(mu):
            return  # not routed by admission: no reservation to count
        request_id = json.loads(value)["request_id"]
        self.aggregator.admitted(model, str(request_id), mu, at)

    def _reply(self, value: bytes) -> None:
        doc = json.loads(value)
        if doc.get("kind") == "rejection":
            rejection = decode(value, _REJECTION)
            self.aggregator.throttled(rejection.model, rejection.reason,
                                      rejection.model_units, rejection.rejected_at)
        elif doc.get("kind") == "result":
            self.aggregator.answered(str(doc["request_id"]), float(doc["completed_at"]))


async def run_demand(settings: Settings, stop: asyncio.Event, *,
                     sink: EventSink | None = None) -> None:
    """Publish a DemandWindow per model every ``tick_s`` until ``stop`` is set."""
    _, config = load(settings)
    aggregator = DemandAggregator(settings.models, stable_s=config.stable_window_s,
                                  panic_s=config.panic_window_s,
                                  beat_timeout_s=config.beat_timeout_s)
    reader = DemandReader(aggregator)
    own_sink = sink is None
    out: EventSink = sink or KafkaEventSink(settings.bootstrap, client_id="autoscaler-demand")
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False)
    try:
        if own_sink:
            await out.start()  # type: ignore[attr-defined]
        await consumer.start()
        await _assign_observed(consumer, settings, config.stable_window_s + config.tick_s)
        next_tick = time.time() + config.tick_s
        while not stop.is_set():
            wait_ms = max(0, min(200, int((next_tick - time.time()) * 1000)))
            for records in (await consumer.getmany(timeout_ms=wait_ms)).values():
                for r in records:
                    reader.feed(r.topic, r.value, r.headers, r.timestamp)
            now = time.time()
            if now >= next_tick:
                for model in aggregator.models:
                    await out.send(DEMAND, aggregator.window(model, now), key=model)
                await out.flush()
                next_tick = max(next_tick + config.tick_s, now)
    except KafkaError as exc:
        raise AgentsError(f"autoscaler demand step: {exc!r}") from exc
    finally:
        await consumer.stop()
        if own_sink:
            await out.stop()  # type: ignore[attr-defined]


async def _assign_observed(consumer: AIOKafkaConsumer, settings: Settings,
                           lookback_s: float) -> None:
    """Every partition of the observed topics, from ``lookback_s`` ago (tw.scale: its tail)."""
    wanted = {shard_topic(m) for m in settings.models} | {RESPONSES, HEARTBEATS}
    # Partition counts as provisioned from the registry (`tokenweir up`).
    tps = [TopicPartition(spec.name, p) for spec in registry(settings) if spec.name in wanted
           for p in range(spec.partitions)]
    scale = TopicPartition(SCALE, 0)
    consumer.assign([*tps, scale])
    await seek_to_time(consumer, tps, time.time() - lookback_s)
    ends = await consumer.end_offsets([scale])
    begins = await consumer.beginning_offsets([scale])
    consumer.seek(scale, max(begins[scale], ends[scale] - _SCALE_TAIL))


async def run(settings: Settings, *, demand: bool = True, decide: bool = True) -> None:
    """Both steps (or one) until SIGTERM/SIGINT."""
    import signal

    stop = asyncio.Event()
    running = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        running.add_signal_handler(sig, stop.set)
    steps = []
    if demand:
        steps.append(asyncio.create_task(run_demand(settings, stop), name="demand"))
    if decide:
        steps.append(asyncio.create_task(run_decisions(settings, stop), name="decide"))
    if not steps:
        raise AgentsError("nothing to run: both the demand and the decide steps are off")
    done, _ = await asyncio.wait(steps, return_when=asyncio.FIRST_EXCEPTION)
    stop.set()
    await asyncio.gather(*steps, return_exceptions=True)
    for task in done:
        task.result()
