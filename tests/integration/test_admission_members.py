"""Admission agents sharing the group: members joining and leaving mid-stream.

Two members run in this process against the session broker, in a consumer
group and on a model of their own (so the session's pipeline agent only
rejects these requests as for an unknown model, and no worker serves them).
The second member joins while the first is deciding; then the first leaves
and its partitions, with their tenants' ledger, move to the second.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from agents.admission import run_admission
from agents.ledger import Ledger
from infra.topics import provision
from schemas.config import Settings
from schemas.events import InferenceRequest, UsageEvent
from streams.copartition import BatchConfig, read_to_end
from streams.sink import KafkaEventSink, MemoryEventSink
from streams.topics import HEARTBEATS, LEDGER, REQUESTS, USAGE, shard_topic
from tests.builders import make_heartbeat

MODEL = "members-model"
TENANTS = [f"member-t{i}" for i in range(12)]
PER_TENANT = 150
CONTROL = ("auth_required = false\n[default_tenant]\nlimit_mu_per_min = 1e9\nburst_mu = 1e9\n")


async def _beat(sink: KafkaEventSink, stop: asyncio.Event) -> None:
    seq = 0
    while not stop.is_set():
        seq += 1
        await sink.send(HEARTBEATS, make_heartbeat(worker="members-w", model=MODEL, seq=seq,
                                                   shards=[0, 1], capacity_mu_per_min=1e9,
                                                   sent_at=time.time()), key="members-w")
        await sink.flush()
        await asyncio.sleep(0.3)


async def _routed_ids(settings: Settings, want: int, timeout_s: float = 90) -> list[str]:
    """Request ids of the records routed to the model's shard topic (duplicates kept)."""
    consumer = AIOKafkaConsumer(shard_topic(MODEL), bootstrap_servers=settings.bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    ids: list[str] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(set(ids)) < want and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                ids += [InferenceRequest.model_validate_json(r.value).request_id
                        for r in records]
        return ids
    finally:
        await consumer.stop()


async def _ledger(settings: Settings) -> Ledger:
    ledger = Ledger(MemoryEventSink(), LEDGER)
    ledger.restore(await read_to_end(settings.bootstrap, LEDGER,
                                     set(range(settings.tenant_partitions)),
                                     client_id="test-ledger"))
    return ledger


async def _stable_with(settings: Settings, members: int, timeout_s: float = 60) -> None:
    """Wait until the group has settled with ``members`` members."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                [response] = await admin.describe_consumer_groups([settings.app_id])
            except KafkaError:  # the coordinator is not there yet on a fresh broker
                await asyncio.sleep(0.2)
                continue
            _, _, state, _, _, found = response.groups[0][:6]
            if state == "Stable" and len(found) == members:
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"group {settings.app_id} not stable with {members} members")
    finally:
        await admin.close()


async def _member(settings: Settings) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(run_admission(settings, stop, BatchConfig(batch_within_s=0.05),
                                             fleet_wait_s=5.0))
    return stop, task


async def _leave(member: tuple[asyncio.Event, asyncio.Task[None]]) -> None:
    stop, task = member
    stop.set()
    await asyncio.wait_for(task, timeout=30)


async def test_members_joining_and_leaving_decide_each_request_once_with_exact_totals(
        settings: Settings, stack, tmp_path):
    (tmp_path / "control.toml").write_text(CONTROL)
    group = settings.model_copy(update={"app_id": "members-test", "models": [MODEL],
                                        "control_config": tmp_path / "control.toml"})
    await provision(group)
    sink = KafkaEventSink(settings.bootstrap, client_id="members-test")
    await sink.start()
    beating = asyncio.Event()
    beats = asyncio.create_task(_beat(sink, beating))
    requests = [InferenceRequest(request_id=f"member-{t}-{i}", tenant=t, model=MODEL,
                                 prompt="count these words " * 4, max_tokens=32)
                for i in range(PER_TENANT) for t in TENANTS]
    first = second = None
    try:
        first = await _member(group)
        for n, request in enumerate(requests):
            await sink.send(REQUESTS, request, key=request.tenant)
            if n % 100 == 99:
                await sink.flush()
                await asyncio.sleep(0.02)
            if n == len(requests) // 3:  # the second joins: the group rebalances
                await sink.flush()
                second = await _member(group)
                await _stable_with(group, 2)
            if n == 2 * len(requests) // 3:  # the first leaves: its tenants move
                await sink.flush()
                await _leave(first)
                first = None
                await _stable_with(group, 1)
        await sink.flush()
        routed = await _routed_ids(group, len(requests))
        assert set(routed) == {r.request_id for r in requests}
        # Usage for every request (one redelivered), settled by the remaining member.
        for i, request in enumerate(requests):
            usage = UsageEvent(request_id=request.request_id, tenant=request.tenant,
                               model=MODEL, input_tokens=16, output_tokens=8 + i % 20,
                               model_units=0.001 * (1 + i % 37), worker="members-w", shard=0)
            await sink.send(USAGE, usage, key=request.tenant)
            if i == 0:
                await sink.send(USAGE, usage, key=request.tenant)
        await sink.flush()
        actual = {t: sum(0.001 * (1 + i % 37) for i, r in enumerate(requests) if r.tenant == t)
                  for t in TENANTS}

        async def settled() -> Ledger | None:
            ledger = await _ledger(group)
            states = [ledger.state(t) for t in TENANTS]
            done = all(s is not None and s.pending == 0 and s.admitted == PER_TENANT
                       for s in states)
            return ledger if done else None

        ledger = None
        for _ in range(60):
            ledger = await settled()
            if ledger is not None:
                break
            await asyncio.sleep(1)
        assert ledger is not None, "not every tenant settled on tw.ledger"
        assert all(ledger.reservation(r.request_id) is None for r in requests)
        for tenant in TENANTS:
            state = ledger.state(tenant)
            assert state is not None
            assert state.charged_mu == state.actual_mu
            assert abs(state.actual_mu - actual[tenant]) < 1e-9
        assert sum(ledger.state(t).duplicates for t in TENANTS) == 1  # type: ignore[union-attr]
    finally:
        for member in (first, second):
            if member is not None:
                with contextlib.suppress(Exception):
                    await _leave(member)
        beating.set()
        await beats
        await sink.stop()
