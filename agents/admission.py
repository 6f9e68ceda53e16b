"""The admission and metering agents: thin Faust shells around AdmissionController.

Both run in one Faust app so that the tenant table, keyed by tenant, is
co-partitioned with ``tw.requests`` and ``tw.usage``: the instance that owns a
tenant's bucket also receives its usage. Heartbeats are read by every
instance (each router needs the whole fleet) outside the consumer group.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from pathlib import Path
from typing import TypeVar, cast

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import BaseModel, TypeAdapter

from agents import windows
from agents.control import AdmissionController, Admit, Reject, Settle
from agents.limiter import Reservation, TenantState
from schemas.config import Settings
from schemas.errors import ConfigError
from schemas.events import (
    HealthEvent,
    InferenceRequest,
    TenantUsage,
    UsageEvent,
    WorkerHeartbeat,
)
from schemas.tenancy import ControlPlaneConfig, TenantConfig, load_config
from streams import DecodeError
from streams.app import FaustEventSink, consume_in_batches, raw_topic
from streams.codec import decode
from streams.consumer import seek_to_time
from streams.deadletter import decode_or_dead_letter
from streams.sink import EventSink
from streams.topics import (
    HEALTH,
    HEARTBEATS,
    METERING,
    REQUESTS,
    RESERVED_MU_HEADER,
    TENANT_TABLE,
    USAGE,
)

log = logging.getLogger(__name__)
_M = TypeVar("_M", bound=BaseModel)
_T = TypeVar("_T")
_REQUEST: TypeAdapter[InferenceRequest] = TypeAdapter(InferenceRequest)
_USAGE: TypeAdapter[UsageEvent] = TypeAdapter(UsageEvent)
_BEAT: TypeAdapter[WorkerHeartbeat] = TypeAdapter(WorkerHeartbeat)
_HEALTH: TypeAdapter[HealthEvent] = TypeAdapter(HealthEvent)


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
                          decision: Admit | Reject, raw: bytes | None = None) -> None:
    """Route or reject; ``raw``: the request's record as received, forwarded unchanged
    (it was validated, and re-encoding it would only cost time)."""
    if isinstance(decision, Reject):
        await sink.send(request.reply_topic, decision.rejection, key=request.request_id)
    else:
        # The reservation rides along as a header: workers report in-flight MU in the
        # router's own units, and observers can audit admissions against limits.
        await sink.send(f"tw.shard.{decision.route.model}", raw or request,
                        key=request.session_key or request.request_id,
                        partition=decision.route.shard,
                        headers=[(RESERVED_MU_HEADER, f"{decision.reservation.mu:.6f}".encode())])


class Ledger:
    """The admission app's one table: tenant states (key ``t/<tenant>``) and reservations
    (key ``r/<request id>``), in one changelog so that, per tenant partition, what a crash
    keeps is a prefix of what was written.

    Agents work in batches: reservations are written as they are decided, each touched
    tenant's state once at the end of the batch (after its reservations, before the
    batch's offsets are acknowledged). Writes name their partition (the tenant's, that
    of the record being processed) instead of relying on Faust's current event.

    The in-memory store holds the models this instance wrote; a value recovered from
    the changelog (a dict) is parsed once and replaced by its model.
    """

    RETAIN_SETTLED_S = 600.0  # how long a settled reservation is kept to spot redeliveries

    def __init__(self, table: faust.Table, sink: FaustEventSink) -> None:
        self.table = table
        self._sink = sink
        self._changelog_name = table.changelog_topic.get_topic_name()
        self._dirty: dict[str, tuple[int, TenantState]] = {}  # tenant -> partition, state
        self._settled: dict[str, collections.deque[tuple[float, str]]] = {}  # tenant -> keys

    def _get(self, key: str, model: type[_M]) -> _M | None:
        stored = self.table.get(key)
        if stored is None or isinstance(stored, model):
            return stored  # written by this instance: the model itself
        value = model.model_validate(stored)  # a dict recovered from the changelog
        self.table.data[key] = value
        return value

    async def _put(self, partition: int, key: str, value: BaseModel | None) -> None:
        # The store keeps the model; the changelog gets the JSON that Faust's "json"
        # serializers read back on recovery. Sent through the sink, so the agent checks
        # the acknowledgements of each batch before acknowledging its events.
        if value is None:
            self.table.data.pop(key, None)
            value_bytes = None
        else:
            self.table.data[key] = value
            value_bytes = value.model_dump_json().encode()
        await self._sink.send(self._changelog_name, value_bytes,
                              key=json.dumps(key).encode(), partition=partition)

    def state(self, tenant: str) -> TenantState | None:
        dirty = self._dirty.get(tenant)
        return dirty[1] if dirty is not None else self._get(f"t/{tenant}", TenantState)

    def tenants(self) -> list[str]:
        """Tenants whose state this instance holds (its partitions, recovered or written)."""
        return [key[2:] for key in list(self.table.data.keys()) if key.startswith("t/")]

    def reservation(self, request_id: str) -> Reservation | None:
        return self._get(f"r/{request_id}", Reservation)

    async def stage(self, partition: int, tenant: str, state: TenantState | None,
                    request_id: str | None = None, reservation: Reservation | None = None
                    ) -> None:
        if reservation is not None and request_id is not None:
            await self._put(partition, f"r/{request_id}", reservation)
            if reservation.settled_at is not None:
                self._settled.setdefault(tenant, collections.deque()).append(
                    (reservation.settled_at, f"r/{request_id}"))
        if state is not None:
            self._dirty[tenant] = (partition, state)

    async def commit(self) -> None:
        """Write the batch's tenant states and purge a few long-settled reservations."""
        dirty, self._dirty = self._dirty, {}
        now = time.time()
        for tenant, (partition, state) in dirty.items():
            await self._put(partition, f"t/{tenant}", state)
            queue = self._settled.get(tenant)
            for _ in range(8):
                if not queue or queue[0][0] >= now - self.RETAIN_SETTLED_S:
                    break
                await self._put(partition, queue.popleft()[1], None)


def register(app: faust.App, settings: Settings) -> AdmissionController:
    watcher = ConfigWatcher(settings.control_config)
    ctl = AdmissionController(watcher.config, models=settings.models)
    sink = FaustEventSink(app)
    table = app.Table(TENANT_TABLE, default=None, partitions=settings.tenant_partitions)
    ledger = Ledger(cast(faust.Table, table), sink)
    seen: set[str] = set()  # tenants with usage, for snapshots
    rescan_at = 0.0  # when to look for tenants recovered from the changelog again

    async def decode_event(event: faust.EventT, adapter: TypeAdapter[_T], consumer: str
                           ) -> _T | None:
        msg = event.message
        return await decode_or_dead_letter(
            sink, adapter, raw=msg.value, key=msg.key, topic=msg.topic,
            partition=msg.partition, offset=msg.offset, consumer=consumer)

    async def admit(event: faust.EventT) -> None:
        request = await decode_event(event, _REQUEST, "admission")
        if request is None:
            return
        msg = event.message
        decision = ctl.admit(ledger.state(request.tenant), ledger.reservation(request.request_id),
                             request, msg.offset, time.time())
        if isinstance(decision, Admit):
            await ledger.stage(msg.partition, request.tenant, decision.state, request.request_id,
                               None if decision.replay else decision.reservation)
            await apply_admission(sink, request, decision, msg.value)
        elif isinstance(decision, Reject):
            await ledger.stage(msg.partition, request.tenant, decision.state)
            await apply_admission(sink, request, decision)

    async def settle(event: faust.EventT) -> None:
        usage = await decode_event(event, _USAGE, "metering")
        if usage is None:
            return
        msg = event.message
        decision = ctl.settle(ledger.state(usage.tenant), ledger.reservation(usage.request_id),
                              usage, msg.offset, time.time())
        if isinstance(decision, Settle):
            await ledger.stage(msg.partition, usage.tenant, decision.state, usage.request_id,
                               decision.reservation)
            seen.add(usage.tenant)

    @app.agent(raw_topic(app, REQUESTS), name="tokenweir.admission")
    async def admission(stream: faust.StreamT[bytes]) -> None:
        await consume_in_batches(stream, admit, ledger.commit, sink.flush)

    @app.agent(raw_topic(app, USAGE), name="tokenweir.metering")
    async def metering(stream: faust.StreamT[bytes]) -> None:
        await consume_in_batches(stream, settle, ledger.commit, sink.flush)

    @app.task
    async def heartbeats() -> None:
        await follow_heartbeats(settings.bootstrap, ctl)

    @app.task
    async def health() -> None:
        await follow_health(settings.bootstrap, ctl)

    @app.timer(interval=2.0)
    async def reload_config() -> None:
        config = watcher.poll()
        if config is not None:
            ctl.reconfigure(config)
            log.warning("control-plane config reloaded from %s", watcher.path)

    @app.timer(interval=2.0)
    async def publish_usage() -> None:
        now = time.time()
        nonlocal rescan_at
        if now >= rescan_at:  # tenants this instance owns from before a restart, too
            seen.update(ledger.tenants())
            rescan_at = now + 30.0
        for tenant in sorted(seen):
            state, config = ledger.state(tenant), ctl.config.tenant(tenant)
            if state is not None and config is not None:
                await sink.send(METERING, snapshot(tenant, state, config, now), key=tenant)
        await sink.flush()

    return ctl


def snapshot(tenant: str, state: TenantState, config: TenantConfig, now: float) -> TenantUsage:
    return TenantUsage(
        tenant=tenant, limit_mu_per_min=config.limit_mu_per_min, burst_mu=config.burst_mu,
        reservation_mu_per_min=config.reservation_mu_per_min, bucket_mu=state.tokens,
        charged_mu=state.charged_mu, actual_mu=state.actual_mu, pending=state.pending,
        admitted=state.admitted, rejected=state.rejected,
        mu_last_minute={m: windows.tumbling_minute(state.metered, m, now)
                        for m in state.metered},
        mu_last_10s={m: windows.hopping_10s(state.metered, m, now) for m in state.metered},
        at=now)


async def follow_health(bootstrap: str, ctl: AdmissionController) -> None:
    """Keep the router off the shards of workers the health agent judged unhealthy.

    Beats alone cannot tell: a worker beats from a thread of its own, so a hung
    one still beats on time. The verdict is the health agent's (one place, one
    set of thresholds); the whole topic is read, transitions being rare, so that
    a restarted router knows every worker's latest state.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(HEALTH, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        while True:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    try:
                        event = decode(record.value, _HEALTH)
                    except DecodeError as exc:
                        log.warning("undecodable health event at offset %d: %s",
                                    record.offset, exc.reason)
                        continue
                    ctl.router.exclude(event.worker, event.state == "unhealthy")
    finally:
        await consumer.stop()


async def follow_heartbeats(bootstrap: str, ctl: AdmissionController,
                            lookback_s: float = 10.0) -> None:
    """Feed every worker's heartbeats to the router, starting a little in the past."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(HEARTBEATS, 0)
        consumer.assign([tp])
        await seek_to_time(consumer, [tp], time.time() - lookback_s)
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
