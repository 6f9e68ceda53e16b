"""The admission and metering agents: thin Faust shells around AdmissionController.

Both run in one Faust app so that the tenant table, keyed by tenant, is
co-partitioned with ``tw.requests`` and ``tw.usage``: the instance that owns a
tenant's bucket also receives its usage. Heartbeats are read by every
instance (each router needs the whole fleet) outside the consumer group.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta
from pathlib import Path

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import TypeAdapter

from agents.control import AdmissionController, Admit, Reject, Settle
from agents.limiter import TenantState
from schemas.config import Settings
from schemas.errors import ConfigError
from schemas.events import InferenceRequest, TenantUsage, UsageEvent, WorkerHeartbeat
from schemas.tenancy import ControlPlaneConfig, load_config
from streams import DecodeError
from streams.app import FaustEventSink, raw_topic
from streams.codec import decode
from streams.deadletter import decode_or_dead_letter
from streams.sink import EventSink
from streams.topics import HEARTBEATS, METERING, REQUESTS, USAGE

log = logging.getLogger(__name__)
_REQUEST: TypeAdapter[InferenceRequest] = TypeAdapter(InferenceRequest)
_USAGE: TypeAdapter[UsageEvent] = TypeAdapter(UsageEvent)
_BEAT: TypeAdapter[WorkerHeartbeat] = TypeAdapter(WorkerHeartbeat)


class ConfigWatcher:
    """Re-reads the control-plane file when its mtime changes; keeps the last good one."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._mtime = 0.0
        self.config = load_config(path) if path else ControlPlaneConfig()
        if path:
            self._mtime = path.stat().st_mtime

    def poll(self) -> ControlPlaneConfig | None:
        if self.path is None:
            return None
        try:
            mtime = self.path.stat().st_mtime
            if mtime == self._mtime:
                return None
            self._mtime = mtime
            self.config = load_config(self.path)
        except (OSError, ConfigError) as exc:
            log.error("control-plane config not reloaded, keeping the previous one: %s", exc)
            return None
        return self.config


async def apply_admission(sink: EventSink, request: InferenceRequest,
                          decision: Admit | Reject) -> None:
    if isinstance(decision, Reject):
        await sink.send(request.reply_topic, decision.rejection, key=request.request_id)
    else:
        await sink.send(f"tw.shard.{decision.route.model}", request,
                        key=request.session_key or request.request_id,
                        partition=decision.route.shard)


def register(app: faust.App, settings: Settings) -> AdmissionController:
    watcher = ConfigWatcher(settings.control_config)
    ctl = AdmissionController(watcher.config, models=settings.models)
    sink = FaustEventSink(app)
    tenants = app.Table("tenants", default=None, partitions=settings.tenant_partitions)
    minute = app.Table("mu-minute", default=float, partitions=settings.tenant_partitions
                       ).tumbling(60, expires=timedelta(minutes=10)).relative_to_now()
    recent = app.Table("mu-10s", default=float, partitions=settings.tenant_partitions
                       ).hopping(10, 5, expires=timedelta(minutes=2)).relative_to_now()
    seen: dict[str, set[str]] = {}  # tenant -> models, for snapshots

    def state_of(tenant: str) -> TenantState | None:
        raw = tenants.get(tenant)
        return None if raw is None else TenantState.model_validate(raw)

    @app.agent(raw_topic(app, REQUESTS), name="tokenweir.admission")
    async def admission(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            msg = event.message
            request = await decode_or_dead_letter(
                sink, _REQUEST, raw=msg.value, key=msg.key, topic=msg.topic,
                partition=msg.partition, offset=msg.offset, consumer="admission")
            if request is None:
                continue
            decision = ctl.admit(state_of(request.tenant), request, msg.offset, time.time())
            if isinstance(decision, (Admit, Reject)):
                if decision.state is not None and not getattr(decision, "replay", False):
                    tenants[request.tenant] = decision.state.model_dump()
                await apply_admission(sink, request, decision)

    @app.agent(raw_topic(app, USAGE), name="tokenweir.metering")
    async def metering(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            msg = event.message
            usage = await decode_or_dead_letter(
                sink, _USAGE, raw=msg.value, key=msg.key, topic=msg.topic,
                partition=msg.partition, offset=msg.offset, consumer="metering")
            if usage is None:
                continue
            decision = ctl.settle(state_of(usage.tenant), usage, msg.offset, time.time())
            if not isinstance(decision, Settle):
                continue
            tenants[usage.tenant] = decision.state.model_dump()
            if not decision.duplicate:
                key = f"{usage.tenant}/{usage.model}"
                minute[key] += usage.model_units
                recent[key] += usage.model_units
                seen.setdefault(usage.tenant, set()).add(usage.model)

    @app.task
    async def heartbeats() -> None:
        await follow_heartbeats(settings.bootstrap, ctl)

    @app.timer(interval=2.0)
    async def reload_config() -> None:
        config = watcher.poll()
        if config is not None:
            ctl.reconfigure(config)
            log.warning("control-plane config reloaded from %s", watcher.path)

    @app.timer(interval=2.0)
    async def publish_usage() -> None:
        for tenant, models in list(seen.items()):
            state, config = state_of(tenant), ctl.config.tenant(tenant)
            if state is None or config is None:
                continue
            await sink.send(METERING, TenantUsage(
                tenant=tenant, limit_mu_per_min=config.limit_mu_per_min,
                burst_mu=config.burst_mu, reservation_mu_per_min=config.reservation_mu_per_min,
                bucket_mu=state.tokens, charged_mu=state.charged_mu, actual_mu=state.actual_mu,
                pending=len(state.pending), admitted=state.admitted, rejected=state.rejected,
                mu_last_minute={m: minute[f"{tenant}/{m}"].now() for m in models},
                mu_last_10s={m: recent[f"{tenant}/{m}"].now() for m in models},
            ), key=tenant)

    return ctl


async def follow_heartbeats(bootstrap: str, ctl: AdmissionController,
                            lookback_s: float = 10.0) -> None:
    """Feed every worker's heartbeats to the router, starting a little in the past."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(HEARTBEATS, 0)
        consumer.assign([tp])
        found = await consumer.offsets_for_times({tp: int((time.time() - lookback_s) * 1000)})
        if found.get(tp) is not None:
            consumer.seek(tp, found[tp].offset)  # type: ignore[union-attr]
        else:
            await consumer.seek_to_end(tp)
        while True:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    try:
                        beat = decode(record.value, _BEAT)
                    except DecodeError as exc:
                        log.warning("undecodable heartbeat at offset %d: %s", record.offset,
                                    exc.reason)
                        continue
                    ctl.observe_heartbeat(beat, time.time())
    except asyncio.CancelledError:
        raise
    finally:
        await consumer.stop()
