"""Worker failover on the real broker: ``tokenweir worker --engine sim`` processes.

- ``kill -9`` a worker holding in-flight requests: the other worker completes
  every request (0 lost) and a client sees each result once; duplicates on the
  reply topic are allowed and counted.
- SIGTERM: the worker stops fetching, finishes what it holds, commits and
  leaves the group; a worker started after it picks up exactly the rest
  (no duplicate at all).

Requests go straight to ``tw.shard.<model>`` (no admission agent) on a model and
reply topic of this module's own; tenant ``acme`` hashes to shard 0 and
``globex`` to shard 1, so each worker of two gets half. The sim engine runs
with ``--max-batch 4`` at ``--time-scale 50``: a wave of four 64-token
requests takes about 1.3 s, so a worker always holds requests in flight.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.partitioner import DefaultPartitioner
from pydantic import TypeAdapter

from infra import procs
from schemas.config import Settings
from schemas.events import (
    InferenceRequest,
    InferenceResult,
    Reply,
    SamplingParams,
    UsageEvent,
    WorkerHeartbeat,
)
from streams import DecodeError
from streams.client import TokenweirClient, reply_partitions
from streams.codec import decode
from streams.topics import HEARTBEATS, USAGE, shard_topic

SHARD_TENANTS = {0: "acme", 1: "globex"}  # the default partitioner's choice, checked below
_BEAT: TypeAdapter[WorkerHeartbeat] = TypeAdapter(WorkerHeartbeat)
_REPLY: TypeAdapter[Reply] = TypeAdapter(Reply)
_USAGE: TypeAdapter[UsageEvent] = TypeAdapter(UsageEvent)


async def create_topics(settings: Settings, topics: dict[str, int]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        for name, partitions in topics.items():
            try:
                await admin.create_topics([NewTopic(name=name, num_partitions=partitions,
                                                    replication_factor=1)])
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()


def spawn_worker(settings: Settings, model: str, name: str, *extra: str
                 ) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings.to_env(), "TOKENWEIR_MODELS": json.dumps([model]),
           "OMP_NUM_THREADS": "1"}
    return procs.spawn(settings.run_dir(), name,
                       [sys.executable, "-m", "infra.cli", "worker", "--model", model,
                        "--engine", "sim", "--max-batch", "4", "--time-scale", "50",
                        "--worker-id", name, *extra],
                       log_path=settings.state_dir / "logs" / f"{name}.log", env=env)


class Beats:
    """The latest heartbeat of each worker, read from ``tw.heartbeats`` in the background."""

    def __init__(self, settings: Settings) -> None:
        self.latest: dict[str, WorkerHeartbeat] = {}
        self._consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap,
                                          enable_auto_commit=False)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Beats:
        await self._consumer.start()
        tp = TopicPartition(HEARTBEATS, 0)
        self._consumer.assign([tp])
        await self._consumer.seek_to_end(tp)
        await self._consumer.position(tp)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()

    async def _read(self) -> None:
        while True:
            for records in (await self._consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    beat = decode(record.value, _BEAT)
                    self.latest[beat.worker] = beat

    async def until(self, check: Any, what: str, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not check(self.latest):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {self.latest}")
            await asyncio.sleep(0.1)


async def read_all(settings: Settings, topic: str, adapter: TypeAdapter[Any]) -> list[Any]:
    """Every valid record of ``topic`` now, decoded.

    Topics are shared by the session's tests, and some tests write bad records
    on purpose (dead-letter scenarios): those are not this test's records.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await reply_partitions(settings.bootstrap, topic)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[Any] = []
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    with contextlib.suppress(DecodeError):
                        out.append(decode(r.value, adapter))
        return out
    finally:
        await consumer.stop()


async def committed_vs_end(settings: Settings, group: str, topic: str
                           ) -> tuple[dict[int, int], dict[int, int]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap, request_timeout_ms=15000)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False)
    await admin.start()
    await consumer.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
        committed = {tp.partition: max(0, meta.offset) for tp, meta in offsets.items()
                     if tp.topic == topic}
        tps = [TopicPartition(topic, p) for p in sorted(committed)]
        ends = {tp.partition: end for tp, end in (await consumer.end_offsets(tps)).items()}
        return committed, ends
    finally:
        await consumer.stop()
        await admin.close()


def make_requests(model: str, reply_topic: str, per_shard: int, tag: str
                  ) -> list[InferenceRequest]:
    return [InferenceRequest(request_id=f"{tag}-{shard}-{i}", tenant=tenant, model=model,
                             prompt=f"failover request {i} of shard {shard}", max_tokens=64,
                             sampling=SamplingParams(temperature=0.0), reply_topic=reply_topic)
            for i in range(per_shard) for shard, tenant in SHARD_TENANTS.items()]


@pytest.fixture
async def workers(settings: Settings) -> AsyncIterator[list[str]]:
    """Names of the worker processes a test starts; whatever still runs is stopped after."""
    names: list[str] = []
    yield names
    for name in names:
        procs.stop(settings.run_dir(), name, timeout_s=10)


def test_tenants_hash_to_their_shards() -> None:
    partitioner = DefaultPartitioner()
    for shard, tenant in SHARD_TENANTS.items():
        assert partitioner(tenant.encode(), [0, 1], [0, 1]) == shard


async def test_kill_9_worker_loses_nothing_and_client_sees_each_result_once(
        settings: Settings, stack: Any, workers: list[str]) -> None:
    model, replies = "failover-sim", "tw.test.failover.replies"
    await create_topics(settings, {shard_topic(model): 2, replies: 1})
    async with Beats(settings) as beats:
        workers += ["failover-a", "failover-b"]
        procs_by_name = {name: spawn_worker(settings, model, name) for name in workers}
        # Both in the group, one shard each, before any request: no rebalance mid-test.
        await beats.until(lambda b: all(len(b[n].shards) == 1 for n in workers if n in b)
                          and set(workers) <= set(b), "two workers with a shard each")
        requests = make_requests(model, replies, per_shard=20, tag="kill")
        async with TokenweirClient(settings.bootstrap, reply_topic=replies,
                                   request_topic=shard_topic(model)) as client:
            futures = {r.request_id: await client.send(r) for r in requests}
            victim = "failover-a"
            victim_shard = beats.latest[victim].shards[0]
            survivor = "failover-b"

            def victim_answered() -> int:
                return sum(1 for f in futures.values() if f.done()
                           and isinstance(f.result(), InferenceResult)
                           and f.result().worker == victim)  # type: ignore[union-attr]

            deadline = time.monotonic() + 60
            while victim_answered() < 4 or beats.latest[victim].in_flight == 0:
                if time.monotonic() > deadline:
                    raise AssertionError("the victim never answered while holding requests")
                await asyncio.sleep(0.05)
            held_at_kill = beats.latest[victim].in_flight
            procs_by_name[victim].send_signal(signal.SIGKILL)
            await asyncio.to_thread(procs_by_name[victim].wait, 10)
            got = await asyncio.wait_for(asyncio.gather(*futures.values()), 120)
            duplicates_dropped = client.duplicates_dropped

    results = [r for r in got if isinstance(r, InferenceResult)]
    assert len(results) == len(requests)  # 0 lost, nothing rejected
    assert sorted(r.request_id for r in results) == sorted(futures)  # each once
    assert all(r.status == "ok" and r.usage.output_tokens == 64 for r in results)
    # What the client took first: the victim's answers up to its death, the survivor's after.
    answered_by_victim = sum(1 for r in results if r.worker == victim)
    taken_over = [r for r in results if r.shard == victim_shard and r.worker == survivor]
    assert held_at_kill > 0 and 4 <= answered_by_victim < 20
    assert len(taken_over) == 20 - answered_by_victim  # the rest of the victim's shard

    # On the topic: every request at least once; duplicates (redone after the kill) allowed.
    raw = collections.Counter(r.request_id for r in await read_all(settings, replies, _REPLY))
    assert set(raw) == set(futures)
    raw_duplicates = sum(raw.values()) - len(raw)
    print(f"kill -9: victim held {held_at_kill} in flight, answered {answered_by_victim} of 20;"
          f" survivor took over {len(taken_over)}; raw duplicates on the reply topic "
          f"{raw_duplicates} (client dropped {duplicates_dropped} by then)")
    usage = {u.request_id for u in await read_all(settings, USAGE, _USAGE) if u.model == model}
    assert usage == set(futures)  # every request metered (redone ones possibly twice)


async def test_sigterm_drains_commits_and_hands_over_the_rest(
        settings: Settings, stack: Any, workers: list[str]) -> None:
    model, replies = "drain-sim", "tw.test.drain.replies"
    await create_topics(settings, {shard_topic(model): 2, replies: 1})
    async with Beats(settings) as beats:
        workers.append("drain-a")
        first = spawn_worker(settings, model, "drain-a", "--drain-timeout", "30")
        await beats.until(lambda b: len(b.get("drain-a", _NO_BEAT).shards) == 2,
                          "drain-a owning both shards")
        requests = make_requests(model, replies, per_shard=8, tag="drain")
        async with TokenweirClient(settings.bootstrap, reply_topic=replies,
                                   request_topic=shard_topic(model)) as client:
            futures = {r.request_id: await client.send(r) for r in requests}
            await beats.until(lambda b: b["drain-a"].in_flight > 0, "requests in flight")
            held = beats.latest["drain-a"].in_flight
            first.send_signal(signal.SIGTERM)
            # Drained within the deadline and exited cleanly.
            assert await asyncio.to_thread(first.wait, 45) == 0
            answered_by_first = sum(1 for r in await read_all(settings, replies, _REPLY)
                                    if isinstance(r, InferenceResult) and r.worker == "drain-a")
            assert answered_by_first >= held  # what it held was finished, not abandoned
            committed, ends = await committed_vs_end(settings, f"tw.worker.{model}",
                                                     shard_topic(model))
            assert sum(committed.values()) == answered_by_first  # and committed, all of it
            workers.append("drain-b")
            spawn_worker(settings, model, "drain-b")
            got = await asyncio.wait_for(asyncio.gather(*futures.values()), 120)

    results = [r for r in got if isinstance(r, InferenceResult)]
    assert sorted(r.request_id for r in results) == sorted(futures)
    assert sum(1 for r in results if r.worker == "drain-b") == len(requests) - answered_by_first
    raw = collections.Counter(r.request_id for r in await read_all(settings, replies, _REPLY))
    assert set(raw) == set(futures) and max(raw.values()) == 1  # a drain redoes nothing
    committed, ends = await committed_vs_end(settings, f"tw.worker.{model}", shard_topic(model))
    # drain-b commits as it finishes; give its committer a moment to catch up.
    for _ in range(50):
        if committed == ends:
            break
        await asyncio.sleep(0.1)
        committed, ends = await committed_vs_end(settings, f"tw.worker.{model}",
                                                 shard_topic(model))
    assert committed == ends


_NO_BEAT = WorkerHeartbeat(worker="none", model="none", engine="none", seq=0,
                           engine_state="starting")
