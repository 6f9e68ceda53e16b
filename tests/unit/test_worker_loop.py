"""The shard worker's loop without Kafka: offset tracking, the capacity gate, continuous
admission, commits after flush, rebalances and the SIGTERM drain.

An in-memory consumer stands in for aiokafka (partitions, positions, pause,
seek, commits) and a hand-driven engine finishes requests when the test says.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from pydantic import TypeAdapter

from schemas.cost import CostModel
from schemas.events import InferenceRequest, InferenceResult, UsageEvent, WorkerHeartbeat
from streams.codec import decode, encode
from streams.sink import MemoryEventSink, ProduceError
from streams.topics import DLQ, HEARTBEATS, RESERVED_MU_HEADER, USAGE, shard_topic
from tests.fakes import FakeGroupConsumer
from workers import WorkersError
from workers.engines.base import EngineStats, Generation
from workers.worker import CapacityGate, OffsetTracker, ShardWorker

MODEL = "loop-model"
TOPIC = shard_topic(MODEL)
COST = CostModel(alpha=0.001, beta=0.01, gamma=0.5, delta=0.0, capacity_mu_per_min=600.0)
Record = ConsumerRecord[bytes, bytes]
RESULT: TypeAdapter[InferenceResult] = TypeAdapter(InferenceResult)
USAGE_EVENT: TypeAdapter[UsageEvent] = TypeAdapter(UsageEvent)
BEAT: TypeAdapter[WorkerHeartbeat] = TypeAdapter(WorkerHeartbeat)


def tp(partition: int) -> TopicPartition:
    return TopicPartition(TOPIC, partition)


# -- pure parts ----------------------------------------------------------------------


def test_offset_tracker_commits_only_contiguous_prefix() -> None:
    tracker = OffsetTracker()
    part = tracker.fetched(tp(0), 0)
    for offset in (1, 2, 3):
        tracker.fetched(tp(0), offset)
    assert tracker.committable({tp(0)}) == {}  # nothing finished: 0 is where we started
    part.finished(2)
    part.finished(3)
    assert tracker.committable({tp(0)}) == {}  # 0 still runs: 2 and 3 must wait
    part.finished(0)
    assert tracker.committable({tp(0)}) == {tp(0): 1}
    part.finished(1)
    assert tracker.committable({tp(0)}) == {tp(0): 4}
    tracker.committed({tp(0): 4})
    assert tracker.committable({tp(0)}) == {}


def test_offset_tracker_gaps_partitions_and_forgetting() -> None:
    tracker = OffsetTracker()
    a = tracker.fetched(tp(0), 10)
    tracker.fetched(tp(0), 15)  # offsets 11-14 are not records (compaction, markers)
    b = tracker.fetched(tp(1), 3)
    a.finished(10)
    a.finished(15)
    tracker.fetched(tp(1), 4)
    b.finished(3)
    assert tracker.committable({tp(0), tp(1)}) == {tp(0): 16, tp(1): 4}
    assert tracker.committable({tp(1)}) == {tp(1): 4}  # only partitions still owned
    with pytest.raises(WorkersError, match="fetched after"):
        tracker.fetched(tp(0), 12)
    tracker.retain({tp(0)})
    assert tracker.next_fetch(tp(1)) is None
    b.finished(4)  # a request of a partition that moved on: touches nothing tracked
    fresh = tracker.fetched(tp(1), 7)  # the partition came back, from another commit point
    assert fresh is not b and tracker.committable({tp(1)}) == {}
    fresh.finished(7)
    assert tracker.committable({tp(1)}) == {tp(1): 8}
    assert tracker.unfinished() == 0


def test_capacity_gate_bounds_requests_and_model_units() -> None:
    gate = CapacityGate(max_requests=3, max_mu=10.0)
    assert gate.room() == 3 and gate.admits(25.0)  # empty: even an oversized request runs
    gate.take(25.0)
    assert gate.room() == 0 and not gate.admits(0.1)
    gate.release(25.0)
    for _ in range(2):
        assert gate.admits(4.0)
        gate.take(4.0)
    assert gate.room() == 1 and not gate.admits(4.0) and gate.admits(2.0)
    gate.take(2.0)
    assert gate.room() == 0 and not gate.admits(0.0)  # three requests: full by count
    for mu in (4.0, 4.0, 2.0):
        gate.release(mu)
    assert (gate.in_flight, gate.in_flight_mu) == (0, 0.0)
    with pytest.raises(WorkersError):
        gate.release(1.0)
    with pytest.raises(WorkersError):
        CapacityGate(max_requests=0, max_mu=1.0)


# -- fakes -----------------------------------------------------------------------------


class FakeConsumer(FakeGroupConsumer):
    """The shard topic's consumer group, in memory; requests are encoded on the way in."""

    def __init__(self, partitions: int = 1) -> None:
        super().__init__({TOPIC: partitions})

    def produce(self, request: InferenceRequest | bytes, partition: int = 0,  # type: ignore[override]
                *, headers: list[tuple[str, bytes]] | None = None) -> int:
        value = request if isinstance(request, bytes) else encode(request)
        return super().produce(TOPIC, value, partition, headers=headers)


class HandEngine:
    """An engine whose requests finish when the test says so."""

    name = "hand"
    supports_images = False
    time_scale = 1.0

    def __init__(self) -> None:
        self.held: dict[str, asyncio.Future[Generation]] = {}
        self.calls: list[str] = []
        self.aborted: list[str] = []
        self.tokens = 0
        self.completed = 0

    async def generate(self, request: InferenceRequest, *, priority: int = 0) -> Generation:
        future: asyncio.Future[Generation] = asyncio.get_running_loop().create_future()
        self.held[request.request_id] = future
        self.calls.append(request.request_id)
        try:
            return await future
        finally:
            self.held.pop(request.request_id, None)

    def finish(self, request_id: str, tokens: int = 3) -> None:
        self.tokens += tokens
        self.completed += 1
        self.held[request_id].set_result(Generation(
            text="x " * tokens, token_ids=list(range(tokens)), finish_reason="length",
            input_tokens=5, ttft_s=0.25, tpot_s=0.05))

    async def abort(self, request_id: str) -> bool:
        future = self.held.get(request_id)
        if future is None or future.done():
            return False
        self.aborted.append(request_id)
        future.set_result(Generation(text="", token_ids=[], finish_reason="abort",
                                     input_tokens=5, ttft_s=0.0, tpot_s=0.0))
        return True

    async def health(self) -> bool:
        return True

    def stats(self) -> EngineStats:
        return EngineStats(state="ready", running=len(self.held), waiting=0,
                           tokens_generated=self.tokens, requests_completed=self.completed)

    async def close(self) -> None:
        pass


def request(rid: str, **overrides: Any) -> InferenceRequest:
    fields: dict[str, Any] = {"request_id": rid, "tenant": "acme", "model": MODEL,
                              "prompt": "hello there world", "max_tokens": 8}
    fields.update(overrides)
    return InferenceRequest(**fields)


async def until(check: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting: {what}")
        await asyncio.sleep(0.005)


class Rig:
    def __init__(self, *, partitions: int = 1, **options: Any) -> None:
        self.consumer = FakeConsumer(partitions)
        self.engine = HandEngine()
        self.sink = MemoryEventSink()
        options = {"max_batch": 2, "heartbeat_s": 0.05, "commit_interval_s": 0.0, **options}
        self.worker = ShardWorker(bootstrap="unused:9092", model=MODEL, engine=self.engine,
                                  sink=self.sink, cost=COST, worker_id="w-test",
                                  consumer=self.consumer, **options)
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.worker.run(self.stop))

    async def finish(self) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 10)

    def results(self) -> list[InferenceResult]:
        return [decode(r.value, RESULT) for r in self.sink.on("tw.responses")]

    def usage(self) -> list[UsageEvent]:
        return [decode(r.value, USAGE_EVENT) for r in self.sink.on(USAGE)]

    def beats(self) -> list[WorkerHeartbeat]:
        return [decode(r.value, BEAT) for r in self.sink.on(HEARTBEATS)]


# -- the loop ------------------------------------------------------------------------


async def test_new_requests_enter_as_others_finish_up_to_the_gate() -> None:
    rig = Rig(max_in_flight=3)
    for i in range(8):
        rig.consumer.produce(request(f"r{i}"))
    rig.start()
    await until(lambda: len(rig.engine.held) == 3, "three requests in the engine")
    await asyncio.sleep(0.05)
    assert rig.engine.calls == ["r0", "r1", "r2"] and rig.consumer.ever_paused
    rig.engine.finish("r1")  # out of order: r0 and r2 keep running
    await until(lambda: "r3" in rig.engine.held, "r3 takes the freed slot")
    assert set(rig.engine.held) == {"r0", "r2", "r3"}
    for i in (0, 2, 3, 4, 5, 6, 7):
        await until(lambda i=i: f"r{i}" in rig.engine.held, f"r{i} admitted")  # type: ignore[misc]
        assert len(rig.engine.held) <= 3
        rig.engine.finish(f"r{i}")
    await until(lambda: rig.consumer.committed.get(tp(0)) == 8, "everything committed")
    await rig.finish()
    assert sorted(r.request_id for r in rig.results()) == [f"r{i}" for i in range(8)]
    assert rig.worker.completed == 8 and rig.consumer.stopped


async def test_offsets_are_committed_only_after_result_and_usage_are_flushed() -> None:
    rig = Rig(max_in_flight=4)
    flushed_at_commit: list[tuple[dict[TopicPartition, int], set[str]]] = []

    def on_commit(offsets: dict[TopicPartition, int]) -> None:
        flushed = rig.sink.records[:rig.sink.flushed]
        answered = {decode(r.value, RESULT).request_id
                    for r in flushed if r.topic == "tw.responses"}
        metered = {decode(r.value, USAGE_EVENT).request_id for r in flushed if r.topic == USAGE}
        flushed_at_commit.append((dict(offsets), answered & metered))

    rig.consumer.on_commit = on_commit
    for i in range(4):
        rig.consumer.produce(request(f"r{i}"))
    rig.start()
    await until(lambda: len(rig.engine.held) == 4, "all four running")
    rig.engine.finish("r2")
    rig.engine.finish("r3")
    await until(lambda: len(rig.results()) == 2, "two results sent")
    await asyncio.sleep(0.05)
    assert rig.consumer.committed.get(tp(0), 0) == 0  # r0 and r1 still run
    rig.engine.finish("r0")
    await until(lambda: rig.consumer.committed.get(tp(0)) == 1, "r0 committed")
    rig.engine.finish("r1")
    await until(lambda: rig.consumer.committed.get(tp(0)) == 4, "all committed")
    await rig.finish()
    for offsets, durable in flushed_at_commit:
        done_below = {f"r{i}" for i in range(offsets[tp(0)])}
        assert done_below <= durable, (offsets, durable)


async def test_usage_event_and_heartbeat_carry_what_the_worker_did() -> None:
    rig = Rig(max_in_flight=4, heartbeat_s=0.02)
    rig.consumer.produce(request("r0", max_tokens=100), headers=[(RESERVED_MU_HEADER, b"2.5")])
    rig.consumer.produce(request("r1", prompt="x" * 400, max_tokens=100))
    rig.start()
    await until(lambda: len(rig.engine.held) == 2, "both running")
    # Reserved MU from the header; else the estimate: 100 input tokens, max_tokens outputs.
    expected_mu = 2.5 + COST.model_units(100, 100)
    await until(lambda: any(b.in_flight == 2 for b in rig.beats()), "a beat with both")
    beat = next(b for b in rig.beats() if b.in_flight == 2)
    assert beat.in_flight_mu == pytest.approx(expected_mu)
    assert beat.shards == [0] and beat.engine_state == "ready" and beat.engine == "hand"
    assert beat.capacity_mu_per_min == COST.capacity_mu_per_min
    rig.engine.finish("r0", tokens=7)
    rig.engine.finish("r1", tokens=4)
    await until(lambda: len(rig.usage()) == 2, "two usage events")
    await until(lambda: sum(b.tokens_since_last for b in rig.beats()) == 11, "tokens beaten")
    await rig.finish()
    usage = {u.request_id: u for u in rig.usage()}
    assert usage["r0"].output_tokens == 7 and usage["r0"].input_tokens == 5
    assert usage["r0"].model_units == pytest.approx(COST.model_units(5, 7))
    assert (usage["r0"].worker, usage["r0"].shard, usage["r0"].status) == ("w-test", 0, "ok")
    assert (usage["r0"].ttft_s, usage["r0"].tpot_s) == (0.25, 0.05)
    seqs = [b.seq for b in rig.beats()]
    assert seqs == list(range(1, len(seqs) + 1))
    assert rig.beats()[-1].engine_state == "draining"


async def test_model_unit_budget_gives_back_what_does_not_fit() -> None:
    # 600 MU/min over a 1 s horizon: a budget of 10 MU.
    rig = Rig(max_in_flight=10, mu_horizon_s=1.0)
    for i in range(4):
        rig.consumer.produce(request(f"r{i}"), headers=[(RESERVED_MU_HEADER, b"4")])
    rig.start()
    await until(lambda: len(rig.engine.held) == 2, "two of 4 MU fit in 10 MU")
    await asyncio.sleep(0.05)
    assert set(rig.engine.held) == {"r0", "r1"}
    assert rig.consumer.position[tp(0)] == 2  # r2 was given back to the partition
    rig.engine.finish("r0")
    await until(lambda: "r2" in rig.engine.held, "r2 fits again")
    for rid in ("r1", "r2"):
        rig.engine.finish(rid)
    await until(lambda: "r3" in rig.engine.held, "r3")
    rig.engine.finish("r3")
    await until(lambda: rig.consumer.committed.get(tp(0)) == 4, "all committed")
    await rig.finish()
    assert rig.engine.calls == ["r0", "r1", "r2", "r3"]


async def test_sigterm_drain_finishes_in_flight_commits_and_leaves() -> None:
    rig = Rig(max_in_flight=2, drain_timeout_s=5.0)
    for i in range(4):
        rig.consumer.produce(request(f"r{i}"))
    rig.start()
    await until(lambda: len(rig.engine.held) == 2, "two running")
    rig.stop.set()  # what SIGTERM does
    await asyncio.sleep(0.05)
    assert rig.engine.calls == ["r0", "r1"]  # no more fetching
    rig.engine.finish("r1")
    rig.engine.finish("r0")
    assert rig.task is not None
    await asyncio.wait_for(rig.task, 5)
    assert rig.consumer.committed[tp(0)] == 2 and rig.consumer.stopped
    assert sorted(r.request_id for r in rig.results()) == ["r0", "r1"]
    assert rig.worker.abandoned == 0


async def test_drain_deadline_abandons_unfinished_requests_uncommitted() -> None:
    rig = Rig(max_in_flight=3, drain_timeout_s=0.2)
    for i in range(3):
        rig.consumer.produce(request(f"r{i}"))
    rig.start()
    await until(lambda: len(rig.engine.held) == 3, "three running")
    rig.engine.finish("r0")
    rig.engine.finish("r2")
    await rig.finish()  # r1 never finishes
    assert rig.engine.aborted == ["r1"] and rig.worker.abandoned == 1
    assert rig.consumer.committed[tp(0)] == 1  # r2 is answered, but r1 before it is not
    assert sorted(r.request_id for r in rig.results()) == ["r0", "r2"]  # no abort answer
    assert "r1" not in {u.request_id for u in rig.usage()}


async def test_a_redelivered_request_id_runs_once_and_both_offsets_commit() -> None:
    rig = Rig(max_in_flight=4)
    rig.consumer.produce(request("same"))
    rig.consumer.produce(request("same"))
    rig.start()
    await until(lambda: "same" in rig.engine.held, "running")
    await asyncio.sleep(0.05)
    rig.engine.finish("same")
    await until(lambda: rig.consumer.committed.get(tp(0)) == 2, "both committed")
    await rig.finish()
    assert rig.engine.calls == ["same"] and len(rig.results()) == 1


async def test_engine_error_answers_with_an_error_and_zero_usage() -> None:
    class Broken(HandEngine):
        async def generate(self, request: InferenceRequest, *, priority: int = 0) -> Generation:
            from workers import EngineError

            raise EngineError("engine crashed")

    rig = Rig()
    rig.engine = Broken()
    rig.worker._engine = rig.engine
    rig.consumer.produce(request("r0"))
    rig.start()
    await until(lambda: rig.consumer.committed.get(tp(0)) == 1, "committed")
    await rig.finish()
    [result] = rig.results()
    assert result.status == "error" and result.error == "engine crashed"
    [usage] = rig.usage()
    assert (usage.status, usage.model_units, usage.output_tokens) == ("error", 0.0, 0)


async def test_undecodable_record_is_dead_lettered_and_committed() -> None:
    rig = Rig()
    rig.consumer.produce(b"{not json")
    rig.consumer.produce(request("r1"))
    rig.start()
    await until(lambda: "r1" in rig.engine.held, "r1 runs")
    rig.engine.finish("r1")
    await until(lambda: rig.consumer.committed.get(tp(0)) == 2, "both committed")
    await rig.finish()
    assert len(rig.sink.on(DLQ)) == 1


async def test_rebalance_keeps_in_flight_requests_of_a_partition_that_comes_back() -> None:
    rig = Rig(partitions=2, max_in_flight=8)
    for i in range(2):
        rig.consumer.produce(request(f"a{i}"), partition=0)
        rig.consumer.produce(request(f"b{i}"), partition=1)
    rig.start()
    await until(lambda: len(rig.engine.held) == 4, "four running")
    rig.engine.finish("a0")
    await until(lambda: rig.consumer.committed.get(tp(0)) == 1, "a0 committed")
    # Partition 0 comes back (from commit point 1, where a1 still runs); 1 goes elsewhere.
    await rig.consumer.rebalance({tp(0)})
    assert rig.consumer.position[tp(0)] == 2  # resumed after a1, not at the commit point
    rig.consumer.produce(request("a2"), partition=0)
    await until(lambda: "a2" in rig.engine.held, "a2 runs")
    for rid in ("a1", "a2", "b0", "b1"):
        rig.engine.finish(rid)
    await until(lambda: rig.consumer.committed.get(tp(0)) == 3, "partition 0 committed")
    await rig.finish()
    assert rig.engine.calls.count("a1") == 1
    # b0 and b1 still answered, but their partition is another worker's to commit now.
    assert rig.consumer.committed.get(tp(1), 0) == 0
    assert {"b0", "b1"} <= {r.request_id for r in rig.results()}


async def test_a_failed_produce_stops_the_worker_without_committing() -> None:
    class FailingSink(MemoryEventSink):
        async def flush(self) -> None:
            if any(r.topic == "tw.responses" for r in self.records):
                raise ProduceError("1 record(s) not acknowledged: broker gone")
            await super().flush()

    rig = Rig()
    rig.sink = FailingSink()
    rig.worker._sink = rig.sink
    rig.consumer.produce(request("r0"))
    rig.start()
    await until(lambda: "r0" in rig.engine.held, "r0 runs")
    rig.engine.finish("r0")
    assert rig.task is not None
    with pytest.raises(ProduceError):
        await asyncio.wait_for(rig.task, 5)
    assert rig.consumer.commits == [] and rig.consumer.stopped
