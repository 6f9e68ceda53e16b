"""Live autoscaling: a request burst scales sim workers up through the local actuator and
back down after it.

    python -m bench.scale_live [--burst-s 25] [--rate 10]

Brings up its own broker (ports from ``TOKENWEIR_TEST_PORT_BASE``, default 29000),
runs the admission agent, the autoscaler and the local actuator (sim-engine workers,
capacity 300 MU/min each), replays a burst of ~1 MU requests at ``--rate`` per
second, then waits for the fleet to shrink back. Prints the replica timeline and,
as the last line, a JSON summary: peak and final replicas, the decisions, and
whether any up-down-up happened within the stabilisation window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import BaseModel, TypeAdapter

from bench.harness import bench_stack, log
from infra import procs
from schemas.config import Settings
from schemas.events import InferenceRequest, InferenceResult, ScaleDecision
from streams.client import TokenweirClient
from streams.topics import SCALE

MODEL = "tiny-llama"
STABILISATION_S = 20.0
CONTROL = f"""\
auth_required = false

[models.{MODEL}]
alpha = 0.001
beta = 0.01
capacity_mu_per_min = 300

[default_tenant]
limit_mu_per_min = 100000
burst_mu = 10000

[scaling]
tick_s = 1
stable_window_s = 10
panic_window_s = 4
beat_timeout_s = 4
resend_s = 10

[scaling.policy]
stabilisation_s = {STABILISATION_S:g}
startup_s = 5
min_lifetime_s = 10
panic_s = 2
drain_s = 30
max_replicas = 3
"""
_DECISION: TypeAdapter[ScaleDecision] = TypeAdapter(ScaleDecision)
Say = Callable[[str], None]


class ScaleLiveReport(BaseModel):
    requests: int
    answered: int
    rejected: int
    peak_workers: int
    final_workers: int
    decisions: list[tuple[float, int, int, str]]  # (s since start, current, desired, reason)
    timeline: list[tuple[float, int, int]]  # (s since start, desired, worker processes)
    flapped: bool  # an up-down-up within the stabilisation window
    stabilisation_s: float


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "infra.cli", *args]


def start_scaling_stack(settings: Settings, *, time_scale: float = 1.0) -> list[str]:
    """Admission agent, autoscaler and local actuator as processes; their names."""
    env = {**os.environ, **settings.to_env()}
    logs = settings.state_dir / "logs"
    jobs = {"agent-admission": _cli("agent", "admission"),
            "autoscaler": _cli("autoscaler"),
            "actuator-local": _cli("actuator", "--kind", "local", "--engine", "sim",
                                   "--time-scale", str(time_scale), "--drain-timeout", "10")}
    for name, argv in jobs.items():
        procs.spawn(settings.run_dir(), name, argv, log_path=logs / f"{name}.log", env=env)
    return list(jobs)


def worker_count(settings: Settings) -> int:
    return sum(1 for n in procs.tracked(settings.run_dir()) if n.startswith("worker-"))


async def read_decisions(settings: Settings) -> list[ScaleDecision]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(SCALE, 0)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        consumer.seek(tp, 0)
        out: list[ScaleDecision] = []
        next_offset, deadline = 0, time.monotonic() + 30.0
        while next_offset < end and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                out += [_DECISION.validate_json(r.value) for r in records if r.value]
                if records:
                    next_offset = records[-1].offset + 1
        return out
    finally:
        await consumer.stop()


def flapped(decisions: list[ScaleDecision], window_s: float) -> bool:
    """An up, a down, then an up again of the desired count, all within ``window_s``."""
    changes: list[tuple[float, int]] = []  # (at, +1 up / -1 down)
    last: int | None = None
    for d in decisions:
        if last is not None and d.desired != last:
            changes.append((d.decided_at, 1 if d.desired > last else -1))
        last = d.desired
    for i, (t1, s1) in enumerate(changes):
        for j in range(i + 1, len(changes)):
            if s1 == 1 and changes[j][1] == -1:
                if any(s3 == 1 and t3 - t1 <= window_s for t3, s3 in changes[j + 1:]):
                    return True
    return False


class Sampler:
    def __init__(self, settings: Settings, t0: float) -> None:
        self.settings, self.t0 = settings, t0
        self.timeline: list[tuple[float, int, int]] = []
        self.desired = 0

    async def run(self, stop: asyncio.Event) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.bootstrap,
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            tp = TopicPartition(SCALE, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            while not stop.is_set():
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for r in records:
                        if r.value:
                            self.desired = _DECISION.validate_json(r.value).desired
                point = (round(time.time() - self.t0, 1), self.desired,
                         worker_count(self.settings))
                if not self.timeline or self.timeline[-1][1:] != point[1:]:
                    self.timeline.append(point)
        finally:
            await consumer.stop()


async def _burst(settings: Settings, say: Say, *, rate: float, burst_s: float
                 ) -> tuple[int, int, int]:
    async with TokenweirClient(settings.bootstrap) as client:
        tasks = []
        n = int(rate * burst_s)
        start = time.monotonic()
        for i in range(n):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            request = InferenceRequest(request_id=uuid.uuid4().hex, tenant=f"t{i % 4}",
                                       model=MODEL, prompt="burst " * 8, max_tokens=100,
                                       session_key=f"s{i}")
            tasks.append(asyncio.create_task(client.submit(request, timeout_s=120)))
        replies = await asyncio.gather(*tasks, return_exceptions=True)
    answered = sum(1 for r in replies if isinstance(r, InferenceResult))
    rejected = sum(1 for r in replies if not isinstance(r, InferenceResult | BaseException))
    say(f"burst: {n} requests, {answered} answered, {rejected} rejected")
    return n, answered, rejected


async def _until(check: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.5)
    return True


async def run_scale_live(settings: Settings, say: Say, *, rate: float = 10.0,
                         burst_s: float = 25.0, settle_s: float = 90.0) -> ScaleLiveReport:
    t0 = time.time()
    start_scaling_stack(settings)
    sampler = Sampler(settings, t0)
    stop = asyncio.Event()
    sampling = asyncio.create_task(sampler.run(stop))
    try:
        if not await _until(lambda: worker_count(settings) >= 1, 60):
            _dump_logs(settings, say)
            raise RuntimeError("the actuator never started a first worker")
        # The first request waits for the agent's group join and the worker's beats.
        async with TokenweirClient(settings.bootstrap) as client:
            for _ in range(60):
                warm = await client.submit(InferenceRequest(tenant="warm", model=MODEL,
                                                            prompt="warm up", max_tokens=4),
                                           timeout_s=60)
                if isinstance(warm, InferenceResult):
                    break
                await asyncio.sleep(1)
        say(f"warm after {time.time() - t0:.0f}s; burst of {rate:g}/s for {burst_s:g}s")
        n, answered, rejected = await _burst(settings, say, rate=rate, burst_s=burst_s)
        peak = max(w for _, _, w in sampler.timeline)
        await _until(lambda: worker_count(settings) <= 1 and sampler.desired <= 1, settle_s)
    finally:
        stop.set()
        await sampling
    decisions = await read_decisions(settings)
    return ScaleLiveReport(
        requests=n, answered=answered, rejected=rejected,
        peak_workers=max(peak, max(w for _, _, w in sampler.timeline)),
        final_workers=worker_count(settings),
        decisions=[(round(d.decided_at - t0, 1), d.current, d.desired, d.reason)
                   for d in decisions],
        timeline=sampler.timeline, flapped=flapped(decisions, STABILISATION_S),
        stabilisation_s=STABILISATION_S)


def _dump_logs(settings: Settings, say: Say) -> None:
    for path in sorted((settings.state_dir / "logs").glob("*.log")):
        tail = path.read_text(errors="replace").splitlines()[-15:]
        say(f"--- last lines of {path.name}:\n" + "\n".join(tail))


def render(report: ScaleLiveReport) -> str:
    lines = ["replica timeline (s since start: desired, worker processes)"]
    lines += [f"  {t:7.1f}s  desired {d}  workers {w}" for t, d, w in report.timeline]
    lines.append("scale decisions that changed the desired count")
    last = None
    for t, cur, des, why in report.decisions:
        if des != last:
            lines.append(f"  {t:7.1f}s  current {cur} -> desired {des}  ({why})")
        last = des
    return "\n".join(lines)


async def _main(rate: float, burst_s: float) -> ScaleLiveReport:
    base = int(os.environ.get("TOKENWEIR_TEST_PORT_BASE", "29000"))
    async with bench_stack("scale", CONTROL, port=base + 392, tenant_partitions=4) as settings:
        report = await run_scale_live(settings, log, rate=rate, burst_s=burst_s)
        log(render(report))
        return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=10.0, help="requests per second")
    parser.add_argument("--burst-s", type=float, default=25.0)
    args = parser.parse_args()
    report = asyncio.run(_main(args.rate, args.burst_s))
    print(json.dumps({"peak_workers": report.peak_workers,
                      "final_workers": report.final_workers,
                      "decisions": len(report.decisions),
                      "flapped": report.flapped, "requests": report.requests,
                      "answered": report.answered, "rejected": report.rejected,
                      "stabilisation_s": report.stabilisation_s}))


if __name__ == "__main__":
    main()
