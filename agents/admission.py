"""The admission and metering agent: a thin shell around AdmissionController.

One consumer group reads ``tw.requests`` and ``tw.usage`` together
(:mod:`streams.copartition`): the member that owns a tenant's partition holds
its state (:mod:`agents.ledger`) and receives both its requests and its usage.
Heartbeats and health verdicts are read by every member (each router needs
the whole fleet) outside the group.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import TypeAdapter

from agents import AgentsError, windows
from agents.control import AdmissionController, Admit, Reject, Skip, UsageItem
from agents.ledger import Ledger
from agents.limiter import TenantState
from agents.sink_rows import BatchDecoder
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
from streams.codec import decode
from streams.consumer import Record, behind, seek_to_time
from streams.copartition import (
    BatchConfig,
    CopartitionedLoop,
    Write,
    group_consumer,
    read_to_end,
)
from streams.deadletter import decode_or_dead_letter, send_dead_letter
from streams.sink import BulkEventSink, EventSink, KafkaEventSink
from streams.topics import (
    HEALTH,
    HEARTBEATS,
    LEDGER,
    METERING,
    REQUESTS,
    RESERVED_MU_HEADER,
    USAGE,
)

log = logging.getLogger(__name__)
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


class AdmissionAgent:
    """Decides on ``tw.requests`` and settles ``tw.usage`` for the tenants of its partitions.

    A :class:`~streams.copartition.PartitionedHandler`: each record goes through the
    controller and the decision's effects are staged in the ledger; ``seal`` hands the
    loop their writes.
    """

    def __init__(self, settings: Settings, ctl: AdmissionController, sink: BulkEventSink
                 ) -> None:
        self._settings = settings
        self.ctl = ctl
        self._sink = sink
        self.ledger = Ledger(sink, LEDGER)
        self._usage = BatchDecoder(UsageEvent)
        self.metered: set[str] = set()  # tenants with usage, for snapshots

    async def assigned(self, numbers: set[int]) -> None:
        started = time.monotonic()
        records = await read_to_end(self._settings.bootstrap, LEDGER, numbers,
                                    client_id="tokenweir-admission-restore")
        n = self.ledger.restore(records)
        del records
        self.metered.update(self.ledger.tenants())
        # What start-up and restoring left (modules, clients, tenant states) lives as long
        # as the process: out of the collector's sight, a full collection pauses decisions
        # for a fraction of the time (ran ~100 ms every few seconds at 1,000 requests/s).
        gc.collect()
        gc.freeze()
        log.info("partitions %s: %d ledger records restored in %.2fs", sorted(numbers), n,
                 time.monotonic() - started)

    def revoked(self, numbers: set[int]) -> None:
        self.ledger.drop(numbers)

    def seal(self) -> Write | None:
        writes = self.ledger.stage()
        return None if writes is None else writes.write

    async def handle(self, tp: TopicPartition, records: list[Record]) -> None:
        if tp.topic == REQUESTS:
            for record in records:
                await self._admit(record)
        else:
            await self._settle_all(tp, records)

    async def _decode(self, record: Record, adapter: TypeAdapter[_T], consumer: str
                      ) -> _T | None:
        return await decode_or_dead_letter(
            self._sink, adapter, raw=record.value, key=record.key, topic=record.topic,
            partition=record.partition, offset=record.offset, consumer=consumer)

    async def _admit(self, record: Record) -> None:
        request = await self._decode(record, _REQUEST, "admission")
        if request is None:
            return
        ledger = self.ledger
        existing = ledger.reservation(request.request_id)
        decision = self.ctl.admit(ledger.state(request.tenant), existing, request,
                                  record.offset, time.time())
        if isinstance(decision, Skip):
            return
        if decision.state is not None:
            ledger.update(record.partition, request.tenant, decision.state)
        if isinstance(decision, Admit):
            if not decision.replay and existing is None:
                ledger.open(record.partition, request.request_id, decision.reservation)
            await apply_admission(self._sink, request, decision, record.value)
        else:
            await apply_admission(self._sink, request, decision)

    async def _settle_all(self, tp: TopicPartition, records: list[Record]) -> None:
        """Settle a run of usage records: decoded together, one decision per tenant."""
        decoded = self._usage.decode([r.value for r in records])
        for i, reason in decoded.bad.items():
            record = records[i]
            await send_dead_letter(self._sink, raw=record.value, key=record.key, reason=reason,
                                   topic=record.topic, partition=record.partition,
                                   offset=record.offset, consumer="metering")
        ledger = self.ledger
        valid = [(usage, record.offset)
                 for usage, record in zip(decoded.rows, records, strict=True) if usage is not None]
        by_tenant: dict[str, list[UsageItem]] = {}
        for (usage, offset), held in zip(valid, ledger.held([u.request_id for u, _ in valid]),
                                         strict=True):
            items = by_tenant.get(usage.tenant)
            if items is None:
                items = by_tenant[usage.tenant] = []
            items.append((usage, offset, held))
        now, partition = time.time(), tp.partition
        for tenant, items in by_tenant.items():
            out = self.ctl.settle_batch(ledger.state(tenant), items, now)
            if out.state is not None:
                ledger.update(partition, tenant, out.state)
                self.metered.add(tenant)
            elif not out.closed_late:
                log.warning("metering: %d usage record(s) skipped: %s", len(items), out.why)
            ledger.close(partition, out.settled)
            ledger.close(partition, out.closed_late)

    async def publish_usage(self) -> None:
        now = time.time()
        for tenant in sorted(self.metered):
            state, config = self.ledger.state(tenant), self.ctl.config.tenant(tenant)
            if state is not None and config is not None:
                await self._sink.send(METERING, snapshot(tenant, state, config, now), key=tenant)
        await self._sink.flush()


async def run_admission(settings: Settings, stop: asyncio.Event,
                        batch: BatchConfig | None = None, fleet_wait_s: float = 15.0) -> None:
    """The admission and metering agent, until ``stop``."""
    watcher = ConfigWatcher(settings.control_config)
    ctl = AdmissionController(watcher.config, models=settings.models)
    # Large record batches: a batch's ledger writes go out as one or a few of them.
    sink = KafkaEventSink(settings.bootstrap, client_id="tokenweir-admission",
                          batch_bytes=512 * 1024)
    await sink.start()
    agent = AdmissionAgent(settings, ctl, sink)
    consumer = group_consumer(settings.bootstrap, settings.app_id,
                              client_id="tokenweir-admission")
    loop = CopartitionedLoop(consumer, [REQUESTS, USAGE], agent, sink, batch)
    try:
        await consumer.start()
        beats, health = asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(coro, name=name) for name, coro in [
            ("heartbeats", follow_heartbeats(settings.bootstrap, ctl, caught_up=beats)),
            ("health", follow_health(settings.bootstrap, ctl, caught_up=health)),
            ("config", every(2.0, lambda: reload(watcher, ctl))),
            ("metering", every(2.0, agent.publish_usage)),
        ]]
        try:
            await first_of(decide(loop, stop, beats, health, fleet_wait_s), tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await consumer.stop()
        await sink.stop()


async def decide(loop: CopartitionedLoop, stop: asyncio.Event, beats: asyncio.Event,
                 health: asyncio.Event, fleet_wait_s: float) -> None:
    """Join the group (and decide) only once the fleet is known."""
    await read_fleet(beats, health, fleet_wait_s)
    await loop.run(stop)


async def reload(watcher: ConfigWatcher, ctl: AdmissionController) -> None:
    config = watcher.poll()
    if config is not None:
        ctl.reconfigure(config)
        log.warning("control-plane config reloaded from %s", watcher.path)


async def every(interval_s: float, job: Callable[[], Awaitable[None]]) -> None:
    """Run ``job`` every ``interval_s`` until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        await job()


async def first_of(main: Awaitable[None], helpers: list[asyncio.Task[None]]) -> None:
    """Run ``main``; a helper that ends (it never should) ends it with its error."""
    main_task = asyncio.ensure_future(main)
    done, _ = await asyncio.wait([main_task, *helpers], return_when=asyncio.FIRST_COMPLETED)
    if main_task not in done:
        main_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await main_task
        failed = next(iter(done))
        raise AgentsError(f"{failed.get_name()} stopped: {failed.exception()!r}")
    main_task.result()


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


async def follow_health(bootstrap: str, ctl: AdmissionController,
                        caught_up: asyncio.Event | None = None) -> None:
    """Keep the router off the shards of workers the health agent judged unhealthy.

    Beats alone cannot tell: a worker beats from a thread of its own, so a hung
    one still beats on time. The verdict is the health agent's (one place, one
    set of thresholds); the whole topic is read, transitions being rare, so that
    a restarted router knows every worker's latest state. ``caught_up`` is set
    once the topic is read up to where it ended at start.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(HEALTH, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        ends = await consumer.end_offsets([tp])
        while True:
            if caught_up is not None and not caught_up.is_set() and \
                    not await behind(consumer, ends):
                caught_up.set()
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
                            lookback_s: float = 10.0,
                            caught_up: asyncio.Event | None = None) -> None:
    """Feed every worker's heartbeats to the router, starting a little in the past;
    ``caught_up`` is set once the topic is read up to where it ended at start."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(HEARTBEATS, 0)
        consumer.assign([tp])
        await seek_to_time(consumer, [tp], time.time() - lookback_s)
        ends = await consumer.end_offsets([tp])
        while True:
            if caught_up is not None and not caught_up.is_set() and \
                    not await behind(consumer, ends):
                caught_up.set()
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    try:
                        beat = decode(record.value, _BEAT)
                    except DecodeError as exc:
                        log.warning("undecodable heartbeat at offset %d: %s", record.offset,
                                    exc.reason)
                        continue
                    ctl.observe_heartbeat(beat, time.time())
    finally:
        await consumer.stop()


async def read_fleet(beats: asyncio.Event, health: asyncio.Event, wait_s: float) -> None:
    """Wait until the router has read the fleet, at most ``wait_s``.

    Without it, a (re)started agent would see no live capacity and reject its first
    pay-per-token requests as ``over_capacity``, or route to a worker already judged
    unhealthy. A follower that cannot read its topic must not keep admission down for
    good: after ``wait_s`` the agent decides on what it has, and says so.
    """
    try:
        async with asyncio.timeout(wait_s):
            await beats.wait()
            await health.wait()
    except TimeoutError:
        log.warning("admission: deciding before the fleet was read in full (heartbeats %s, "
                    "health %s after %.0fs)", "read" if beats.is_set() else "behind",
                    "read" if health.is_set() else "behind", wait_s)
