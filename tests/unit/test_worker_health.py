"""Worker health (workers/health.py): probes, beats from their own thread, /livez and /readyz."""

from __future__ import annotations

import asyncio
import os
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from schemas.events import InferenceRequest, SamplingParams, WorkerHeartbeat
from streams.codec import decode
from streams.sink import MemoryEventSink
from streams.topics import HEARTBEATS
from tests.unit.test_worker_loop import BEAT, COST, MODEL, FakeConsumer, request, until
from workers.engines.base import PROBE_PRIORITY, REQUEST_PRIORITY, Generation
from workers.engines.sim import SimEngine
from workers.health import WorkerHealthConfig
from workers.worker import ShardWorker

PORT = int(os.environ.get("TOKENWEIR_TEST_PORT_BASE", "19000")) + 811


class SpyEngine(SimEngine):
    """The sim engine, noting the priority of every request it gets."""

    def __init__(self, time_scale: float) -> None:
        super().__init__(COST, time_scale=time_scale, max_batch=4)
        self.priorities: dict[str, int] = {}

    async def generate(self, request: InferenceRequest, *, priority: int = 0) -> Generation:
        self.priorities[request.request_id] = priority
        return await super().generate(request, priority=priority)


class Rig:
    def __init__(self, time_scale: float = 0.001, **health: Any) -> None:
        self.consumer = FakeConsumer()
        self.engine = SpyEngine(time_scale)
        self.sink = MemoryEventSink()
        config = {"probe_interval_s": 0.2, "probe_timeout_s": 0.3, **health}
        self.worker = ShardWorker(bootstrap="unused:9092", model=MODEL, engine=self.engine,
                                  sink=self.sink, cost=COST, worker_id="w-health",
                                  consumer=self.consumer, heartbeat_s=0.05,
                                  commit_interval_s=0.0, health=WorkerHealthConfig(**config))
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Rig:
        self.task = asyncio.create_task(self.worker.run(self.stop))
        await until(lambda: len(self.beats()) > 0, "a first beat")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.engine.inject(self.engine._core.faults.model_copy(
            update={"hang_after_requests": None}))  # let the drain finish
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 10)
        await self.engine.close()

    def beats(self) -> list[WorkerHeartbeat]:
        return [decode(r.value, BEAT) for r in list(self.sink.on(HEARTBEATS))]


async def test_health_idle_worker_probes_at_probe_priority_and_beats_carry_the_result() -> None:
    async with Rig() as rig:
        await until(lambda: any(b.probe is not None for b in rig.beats()), "a probe result")
    probed = next(b.probe for b in rig.beats() if b.probe is not None)
    assert probed is not None and probed.ok and probed.latency_s < 0.3
    probes = {rid: p for rid, p in rig.engine.priorities.items() if rid.startswith("probe-")}
    assert probes and set(probes.values()) == {PROBE_PRIORITY}
    assert rig.worker.completed == 0  # a probe is no request: no result, no usage


async def test_health_busy_worker_sends_no_probe() -> None:
    async with Rig(probe_interval_s=0.5) as rig:
        for i in range(60):
            rig.consumer.produce(request(f"r{i}", max_tokens=20))
            await asyncio.sleep(0.02)  # a request finishes every few tens of ms
        await until(lambda: rig.worker.completed == 60, "all answered")
    assert not any(rid.startswith("probe-") for rid in list(rig.engine.priorities)[:60])


async def test_health_silent_hang_shows_as_probe_timeouts_while_beats_go_on() -> None:
    async with Rig(time_scale=1.0, live_stall_s=0.6, live_probe_failures=2) as rig:
        for i in range(3):
            rig.consumer.produce(request(f"r{i}", max_tokens=2000))
        await until(lambda: rig.beats()[-1].in_flight == 3, "three in flight")
        rig.engine.hang_now()
        hung_at = time.time()
        await until(lambda: any(b.probe is not None and not b.probe.ok for b in rig.beats()),
                    "a failed probe", timeout_s=5)
        await until(lambda: not rig.worker.health.liveness().ok, "liveness failing")
        after = [b for b in rig.beats() if b.sent_at > hung_at + 0.2]
    failed = next(b.probe for b in after if b.probe is not None and not b.probe.ok)
    assert failed is not None and "timeout" in (failed.error or "")
    assert len(after) >= 5 and all(b.tokens_since_last == 0 for b in after)
    assert all(b.in_flight == 3 for b in after[:-1])  # the last one is the drain's


async def test_health_beats_and_probe_timeouts_go_on_while_the_main_loop_is_blocked() -> None:
    async with Rig(probe_interval_s=0.1, probe_timeout_s=0.3) as rig:
        await until(lambda: any(b.probe is not None for b in rig.beats()), "a probe")
        blocked_from = time.time()
        time.sleep(1.0)  # noqa: ASYNC251 - CPU work holding the main loop (and the engine)
        blocked_to = time.time()
        await asyncio.sleep(0.1)
        during = [b for b in rig.beats() if blocked_from < b.sent_at < blocked_to]
    assert len(during) >= 10  # every 50 ms, as if nothing happened
    timed_out = [b.probe for b in during if b.probe is not None and not b.probe.ok
                 and b.probe.at > blocked_from]
    assert timed_out and "timeout" in (timed_out[0].error or "")


def http_get(path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{PORT}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


async def test_health_endpoint_ready_and_live_then_both_fail_on_a_hang() -> None:
    async with Rig(time_scale=1.0, port=PORT, host="127.0.0.1", live_stall_s=0.5) as rig:
        await until(lambda: any(b.probe is not None for b in rig.beats()), "a probe")
        assert (await asyncio.to_thread(http_get, "/readyz"))[0] == 200
        assert (await asyncio.to_thread(http_get, "/livez"))[0] == 200
        rig.consumer.produce(request("r0", max_tokens=2000))
        await until(lambda: rig.beats()[-1].in_flight == 1, "one in flight")
        rig.engine.hang_now()
        await asyncio.sleep(1.2)
        live = await asyncio.to_thread(http_get, "/livez")
        ready = await asyncio.to_thread(http_get, "/readyz")
    assert live[0] == 503 and "no token" in live[1]
    assert ready[0] == 503


@pytest.mark.parametrize("priority,fast", [
    pytest.param(PROBE_PRIORITY, True, id="probe-priority-answers-at-once"),
    pytest.param(REQUEST_PRIORITY["normal"], False, id="normal-priority-waits-its-turn"),
])
async def test_health_probe_on_a_saturated_engine(priority: int, fast: bool) -> None:
    engine = SimEngine(COST, time_scale=1.0, max_batch=2)
    long = [asyncio.create_task(engine.generate(request(f"long{i}", max_tokens=1000)))
            for i in range(4)]  # two running, two queued: about 2 s a pair at 10 MU/s
    await asyncio.sleep(0.05)
    probe = InferenceRequest(request_id="probe-1", tenant="t", model=MODEL, prompt="ping",
                             max_tokens=1, sampling=SamplingParams(temperature=0.0))
    started = time.monotonic()
    try:
        async with asyncio.timeout(1.0):
            await engine.generate(probe, priority=priority)
        answered = True
    except TimeoutError:
        answered = False
    assert answered is fast and (not fast or time.monotonic() - started < 0.5)
    for task in long:
        task.cancel()
    await engine.close()
