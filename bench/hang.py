"""Silent hang: detected, the worker replaced, its in-flight requests completed elsewhere, 0 lost.

A stack of its own (Kafka on ``--port``, default 24092): the admission agent
(process), the health agent and the local actuator (this process), which runs
``--workers`` sim workers (``worker-<model>-<n>``) from one ScaleDecision.
Signed requests flow at ``--rate`` per second through ``tw.requests``. Once
both workers are healthy and hold requests, ``worker-<model>-0`` gets SIGUSR1:
its sim engine hangs silently (requests stay in flight, no token is produced,
probes never complete; heartbeats go on, from their own thread). Then:

- ``detect_s``: hang -> the health agent's ``unhealthy`` HealthEvent for it;
- ``replaced_s``: hang -> the first heartbeat of its new incarnation (the
  actuator kill -9s and respawns it under the same name);
- ``completed_s``: hang -> the last of the requests it held at the hang
  (unanswered then, on its shards) answered by another worker;
- ``replaced_and_completed_s``: the later of the two;
- ``lost``: requests with no result at the end (rejections counted apart).

Targets (issue 6): detection ≤ 10 s, replaced and completed ≤ 60 s, 0 lost.
Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import TypeAdapter

from agents.health_agent import run_health_agent
from bench.harness import bench_stack, log, start_agent, stop_agent
from infra import procs
from infra.actuators.local import LocalActuatorConfig, run_local, worker_name
from schemas.config import Settings
from schemas.events import (
    HealthEvent,
    InferenceRequest,
    InferenceResult,
    ProbeResult,
    Reply,
    SamplingParams,
    ScaleDecision,
    WorkerHeartbeat,
)
from schemas.signing import Signer
from streams.client import TokenweirClient
from streams.codec import decode
from streams.sink import KafkaEventSink
from streams.topics import HEALTH, HEARTBEATS, SCALE

_BEAT: TypeAdapter[WorkerHeartbeat] = TypeAdapter(WorkerHeartbeat)
_HEALTH: TypeAdapter[HealthEvent] = TypeAdapter(HealthEvent)
PORT = int(os.environ.get("TOKENWEIR_TEST_PORT_BASE", "24000")) + 92

TENANT = "hang-tenant"
KEYS = {TENANT: ("key-hang", secrets.token_hex(32))}
CONTROL = ("auth_required = true\n[default_tenant]\nlimit_mu_per_min = 1e9\nburst_mu = 1e9\n"
           + "".join(f'[keys.{k}]\ntenant = "{t}"\nsecret = "{s}"\n'
                     for t, (k, s) in KEYS.items()))


@dataclass(frozen=True)
class Scenario:
    model: str = "hang-sim"
    workers: int = 2
    rate: float = 4.0  # requests/s: 80 MU/s, what one worker of two (100 MU/s) can carry
    max_tokens: int = 2048  # 20 MU, 2-3 s each at time scale 1 and a few running
    time_scale: float = 1.0  # sim: wall s per simulated s
    max_batch: int = 16
    warmup_s: float = 10.0  # traffic before the hang
    after_s: float = 30.0  # traffic after the hang
    settle_timeout_s: float = 120.0  # for the last replies


@dataclass
class Fleet:
    """What the bench sees on tw.heartbeats and tw.health."""

    beats: dict[str, WorkerHeartbeat] = field(default_factory=dict)
    incarnations: dict[str, list[float]] = field(default_factory=dict)  # first beat sent_at
    health: list[HealthEvent] = field(default_factory=list)
    probes: list[tuple[str, ProbeResult]] = field(default_factory=list)  # as beats carry them
    max_gap: dict[str, float] = field(default_factory=dict)  # s between two beats, longest

    def take_beat(self, beat: WorkerHeartbeat) -> None:
        previous = self.beats.get(beat.worker)
        if previous is None or beat.seq < previous.seq:
            self.incarnations.setdefault(beat.worker, []).append(beat.sent_at)
        else:
            gap = beat.sent_at - previous.sent_at
            self.max_gap[beat.worker] = max(self.max_gap.get(beat.worker, 0.0), gap)
        if beat.probe is not None and (previous is None or previous.probe != beat.probe):
            self.probes.append((beat.worker, beat.probe))
        self.beats[beat.worker] = beat

    def state(self, worker: str) -> str | None:
        states = [e.state for e in self.health if e.worker == worker]
        return states[-1] if states else None


async def watch(bootstrap: str, fleet: Fleet) -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(HEARTBEATS, 0), TopicPartition(HEALTH, 0)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)
        while True:
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                for record in records:
                    if tp.topic == HEARTBEATS:
                        fleet.take_beat(decode(record.value, _BEAT))
                    else:
                        fleet.health.append(decode(record.value, _HEALTH))
    finally:
        await consumer.stop()


async def until(check: Any, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def background(*coros: Any) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def make_request(i: int, model: str, tenant: str, max_tokens: int) -> InferenceRequest:
    return InferenceRequest(request_id=f"hang-{i}", tenant=tenant, model=model,
                            prompt=f"request {i}: tell a long story about tokens",
                            max_tokens=max_tokens, sampling=SamplingParams(temperature=0.0),
                            session_key=f"s{i % 50}")


async def run_scenario(settings: Settings, scenario: Scenario, signer: Signer,
                       tenant: str) -> dict[str, Any]:
    """Run the hang scenario on a stack that is up (topics for ``scenario.model`` included)."""
    stop = asyncio.Event()
    fleet = Fleet()
    start_agent(settings, "admission")
    actuator = LocalActuatorConfig(engine="sim", time_scale=scenario.time_scale,
                                   max_batch=scenario.max_batch, drain_timeout_s=5.0)
    try:
        async with background(watch(settings.bootstrap, fleet),
                              run_health_agent(settings.bootstrap, stop=stop),
                              run_local(settings, actuator, stop, models=[scenario.model],
                                        stop_workers=True)):
            return await _drive(settings, scenario, signer, tenant, fleet)
    finally:
        stop.set()
        stop_agent(settings, "admission")
        for i in range(scenario.workers):
            procs.stop(settings.run_dir(), worker_name(scenario.model, i), timeout_s=10)


async def _drive(settings: Settings, scenario: Scenario, signer: Signer, tenant: str,
                 fleet: Fleet) -> dict[str, Any]:
    model = scenario.model
    names = [worker_name(model, i) for i in range(scenario.workers)]
    victim = names[0]
    await asyncio.sleep(1.0)  # the actuator's consumer is at the end of tw.scale
    sink = KafkaEventSink(settings.bootstrap, client_id="bench-hang")
    await sink.start()
    await sink.send(SCALE, ScaleDecision(model=model, current=0, desired=scenario.workers,
                                         reason="bench.hang"), key=model)
    await sink.flush()
    await sink.stop()
    log(f"hang: waiting for {scenario.workers} workers to own shards and be healthy")
    await until(lambda: all(n in fleet.beats and fleet.beats[n].shards
                            and fleet.state(n) == "healthy" for n in names)
                and sum(len(fleet.beats[n].shards) for n in names) == settings.shard_partitions,
                "healthy workers owning every shard", 120)
    futures: dict[str, asyncio.Future[Reply]] = {}
    sent_at: dict[str, float] = {}
    async with TokenweirClient(settings.bootstrap, signer=signer) as client:
        async def traffic(until_t: float, start: int) -> int:
            i = start
            next_t = time.monotonic()
            while time.monotonic() < until_t:
                request = make_request(i, model, tenant, scenario.max_tokens)
                sent_at[request.request_id] = time.time()
                futures[request.request_id] = await client.send(request)
                i += 1
                next_t += 1.0 / scenario.rate
                await asyncio.sleep(max(0.0, next_t - time.monotonic()))
            return i

        log(f"hang: {scenario.warmup_s:.0f}s of traffic at {scenario.rate:g}/s")
        n = await traffic(time.monotonic() + scenario.warmup_s, 0)
        await until(lambda: fleet.beats[victim].in_flight > 0, "the victim holding requests", 30)
        held_beat = fleet.beats[victim]
        pid = procs.running(settings.run_dir(), victim)
        if pid is None:
            raise RuntimeError(f"{victim} is not running")
        os.kill(pid, signal.SIGUSR1)
        hung_at = time.time()
        unanswered = {rid for rid, f in futures.items() if not f.done()}
        log(f"hang: {victim} (pid {pid}) hung holding {held_beat.in_flight} requests "
            f"on shards {held_beat.shards}")
        await traffic(time.monotonic() + scenario.after_s, n)
        log("hang: traffic stopped; waiting for the last replies")
        done, pending = await asyncio.wait(list(futures.values()),
                                           timeout=scenario.settle_timeout_s)
        replies = {rid: f.result() for rid, f in futures.items() if f in done}
        duplicates = client.duplicates_dropped

    results = {rid: r for rid, r in replies.items() if isinstance(r, InferenceResult)}
    verdict = next((e for e in fleet.health if e.worker == victim and e.state == "unhealthy"
                    and e.at >= hung_at), None)
    incarnations = [t for t in fleet.incarnations.get(victim, []) if t > hung_at]
    held = [results[rid] for rid in unanswered
            if rid in results and results[rid].shard in held_beat.shards]
    completed_s = max((r.completed_at - hung_at for r in held), default=None)
    replaced_s = incarnations[0] - hung_at if incarnations else None
    detect_s = verdict.at - hung_at if verdict else None
    both = (max(replaced_s, completed_s)
            if replaced_s is not None and completed_s is not None else None)
    latencies = sorted(r.completed_at - sent_at[rid] for rid, r in results.items())
    lost = len(futures) - len(replies)
    report: dict[str, Any] = {
        "bench": "hang",
        "detect_s": round(detect_s, 2) if detect_s is not None else None,
        "replaced_and_completed_s": round(both, 2) if both is not None else None,
        "lost": lost,
        "replaced_s": round(replaced_s, 2) if replaced_s is not None else None,
        "completed_s": round(completed_s, 2) if completed_s is not None else None,
        "held_at_hang": held_beat.in_flight,
        # Unanswered at the hang and answered on its shards: by the survivor or the new
        # incarnation (same name, new process); the hung process answers nothing.
        "held_unanswered_at_hang_on_its_shards": len(held),
        "held_completed_by": dict(collections.Counter(r.worker or "?" for r in held)),
        "requests": len(futures),
        "results_ok": sum(1 for r in results.values() if r.status == "ok"),
        "rejected": len(replies) - len(results),
        "duplicates_dropped": duplicates,
        "latency_p50_s": round(latencies[len(latencies) // 2], 2) if latencies else None,
        "latency_max_s": round(latencies[-1], 2) if latencies else None,
        "verdict_reason": verdict.reason if verdict else None,
        "health_events": [f"{e.worker}:{e.previous}->{e.state}@{e.at - hung_at:+.1f}s"
                          for e in fleet.health],
        "targets": {"detect_s": 10, "replaced_and_completed_s": 60, "lost": 0},
    }
    report["ok"] = (detect_s is not None and detect_s <= 10 and both is not None
                    and both <= 60 and lost == 0 and not pending)
    return report


async def main(args: argparse.Namespace) -> dict[str, Any]:
    scenario = Scenario(rate=args.rate, warmup_s=args.warmup, after_s=args.after,
                        max_tokens=args.max_tokens, time_scale=args.time_scale)
    async with bench_stack("hang", CONTROL, port=args.port, tenant_partitions=4) as base:
        settings = base.model_copy(update={"models": [scenario.model]})
        from infra.topics import provision

        await provision(settings)  # the shard topic of the scenario's model
        return await run_scenario(settings, scenario, Signer(KEYS), TENANT)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=PORT, help="Kafka port (and port + 1)")
    parser.add_argument("--rate", type=float, default=4.0, help="requests/s")
    parser.add_argument("--warmup", type=float, default=10.0, help="s of traffic before")
    parser.add_argument("--after", type=float, default=30.0, help="s of traffic after")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--time-scale", type=float, default=1.0)
    args = parser.parse_args()
    report = asyncio.run(main(args))
    print(json.dumps(report))


if __name__ == "__main__":
    cli()
