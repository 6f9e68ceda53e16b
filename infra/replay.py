"""Replay the ServeGen multi-tenant trace through the real admission agent.

Each ServeGen client is a tenant; its limit is 50% of its peak MU per
(compressed) minute, its burst a quarter of that; the three largest tenants
are provisioned with a reservation of half their limit. Requests are signed
and produced at their (compressed) trace times; a :class:`TraceFleet` serves
the shards; the agent runs as its own process and may be ``kill -9``-ed and
restarted mid-replay. The report checks the limits, the reservations and
that Σ charged = Σ actual.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from aiokafka import AIOKafkaConsumer
from pydantic import BaseModel, TypeAdapter

from bench.traces import TraceRequest, servegen_requests
from infra import procs
from infra.fleet import TraceFleet
from schemas.config import Settings
from schemas.cost import CostModel
from schemas.events import InferenceRequest, Rejection, Reply, TenantUsage
from schemas.signing import Signer
from streams.client import follow_replies
from streams.codec import decode
from streams.sink import KafkaEventSink
from streams.topics import METERING, REQUESTS

Say = Callable[[str], None]
_USAGE_SNAPSHOT: TypeAdapter[TenantUsage] = TypeAdapter(TenantUsage)
MODEL = "deepseek-r1"
AGENT = "agent-admission"


class PlannedRequest(BaseModel):
    request: InferenceRequest
    wall_s: float  # seconds after the replay starts
    mu: float  # MU the fleet will report (actual)
    output_tokens: int


class TenantPlan(BaseModel):
    limit_mu_per_min: float
    burst_mu: float
    reservation_mu_per_min: float = 0.0


class ReplayReport(BaseModel):
    requests: int
    admitted: int
    rejected: dict[str, int]
    lost: int  # admitted or sent, never answered
    duplicate_replies: int
    charged_mu: float  # Σ charged, from the agent's tenant states
    actual_mu_agent: float  # Σ actual, as the agent accounted it
    actual_mu_workers: float  # Σ actual, from what the fleet reported (each request once)
    pending_after: int
    window_max_ratio: float  # max over tenants and minutes of admitted MU / (limit + burst)
    window_violations: int
    provisioned_rejected_within_reservation: int
    agent_killed_at_s: float | None


def plan(trace: list[TraceRequest], speedup: float, cost: CostModel
         ) -> tuple[list[PlannedRequest], dict[str, TenantPlan]]:
    planned = []
    per_minute: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for i, t in enumerate(trace):
        wall = t.at / speedup
        mu = cost.model_units(t.input_tokens, t.output_tokens)
        request = InferenceRequest(request_id=f"sg-{i}", tenant=t.tenant, model=MODEL,
                                   prompt="x" * (4 * t.input_tokens),
                                   max_tokens=max(t.output_tokens, 16384),
                                   session_key=t.session)
        planned.append(PlannedRequest(request=request, wall_s=wall, mu=mu,
                                      output_tokens=t.output_tokens))
        per_minute[t.tenant][int(wall // 60)] += mu
    peaks = {tenant: max(minutes.values()) for tenant, minutes in per_minute.items()}
    largest = sorted(peaks, key=lambda t: -sum(per_minute[t].values()))[:3]
    tenants = {}
    for tenant, peak in peaks.items():
        limit = 0.5 * peak
        tenants[tenant] = TenantPlan(limit_mu_per_min=limit, burst_mu=limit / 4,
                                     reservation_mu_per_min=limit / 2 if tenant in largest else 0)
    return planned, tenants


def control_toml(tenants: dict[str, TenantPlan], keys: dict[str, tuple[str, str]],
                 cost: CostModel) -> str:
    lines = ["auth_required = true", ""]
    lines += [f"[models.{MODEL}]"] + [f"{k} = {v}" for k, v in cost.model_dump().items()] + [""]
    for tenant, p in tenants.items():
        lines += [f'[tenants."{tenant}"]',
                  f'plan = "{"provisioned" if p.reservation_mu_per_min else "pay_per_token"}"',
                  f"limit_mu_per_min = {p.limit_mu_per_min}", f"burst_mu = {p.burst_mu}",
                  f"reservation_mu_per_min = {p.reservation_mu_per_min}", ""]
    for tenant, (key_id, secret) in keys.items():
        lines += [f'[keys."{key_id}"]', f'tenant = "{tenant}"', f'secret = "{secret}"', ""]
    return "\n".join(lines)


class Replay:
    def __init__(self, settings: Settings, say: Say, *, start_s: float, duration_s: float,
                 speedup: float, kill_at_s: float | None, seed: int = 7) -> None:
        self.settings = settings
        self.say = say
        self.cost = CostModel()
        trace = servegen_requests(start_s, duration_s, seed=seed)
        self.planned, self.tenants = plan(trace, speedup, self.cost)
        self.keys = {t: (f"key-{t}", secrets.token_hex(32)) for t in self.tenants}
        self.kill_at_s = kill_at_s
        self.replies: dict[str, Reply] = {}
        self.duplicate_replies = 0

    def agent_settings(self) -> Settings:
        path = (self.settings.state_dir / "replay-control.toml").resolve()
        path.write_text(control_toml(self.tenants, self.keys, self.cost))
        return self.settings.model_copy(update={"control_config": path})

    def start_agent(self, settings: Settings) -> None:
        env = {**os.environ, **settings.to_env()}
        procs.spawn(settings.run_dir(), AGENT, [sys.executable, "-m", "infra.cli", "agent",
                                                "admission"],
                    log_path=settings.state_dir / "logs" / "agent-admission.log", env=env)

    async def run(self) -> ReplayReport:
        settings = self.agent_settings()
        self.start_agent(settings)
        stop = asyncio.Event()
        total_mu_per_min = sum(p.mu for p in self.planned) / max(1.0, self.planned[-1].wall_s) * 60
        fleet = TraceFleet(settings.bootstrap, MODEL, settings.shard_partitions, cost=self.cost,
                           outputs={p.request.request_id: p.output_tokens for p in self.planned},
                           replicas=min(4, settings.shard_partitions),
                           capacity_mu_per_min=10 * total_mu_per_min)
        tasks = [asyncio.create_task(fleet.run(stop)),
                 asyncio.create_task(self._collect(settings, stop))]
        killed_at = None
        try:
            await asyncio.sleep(3)  # heartbeats reach the agent before the first request
            killed_at = await self._drive(settings)
            await self._await_replies(timeout_s=180)
            snapshots = await self._settled_snapshots(settings, timeout_s=120)
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            procs.stop(settings.run_dir(), AGENT)
        return self._report(fleet, snapshots, killed_at)

    async def _drive(self, settings: Settings) -> float | None:
        sink = KafkaEventSink(settings.bootstrap, linger_ms=5, client_id="replay")
        await sink.start()
        signer = Signer(self.keys)
        started = time.monotonic()
        killed_at = None
        last_progress = started
        try:
            for i, p in enumerate(self.planned):
                delay = p.wall_s - (time.monotonic() - started)
                if delay > 0.005:
                    await sink.flush()
                    await asyncio.sleep(delay)
                request = signer(p.request.model_copy(update={"submitted_at": time.time()}))
                await sink.send(REQUESTS, request, key=request.tenant)
                elapsed = time.monotonic() - started
                if self.kill_at_s is not None and killed_at is None and elapsed >= self.kill_at_s:
                    killed_at = elapsed
                    await self._kill_and_restart(settings)
                if elapsed - (last_progress - started) > 15:
                    last_progress = time.monotonic()
                    self.say(f"  replay {elapsed:5.0f}s  sent {i + 1}/{len(self.planned)}  "
                             f"answered {len(self.replies)}")
            await sink.flush()
        finally:
            await sink.stop()
        return killed_at

    async def _kill_and_restart(self, settings: Settings) -> None:
        pid = procs.running(settings.run_dir(), AGENT)
        if pid is None:
            return
        self.say(f"  kill -9 agent (pid {pid})")
        os.kill(pid, signal.SIGKILL)
        await asyncio.to_thread(procs.stop, settings.run_dir(), AGENT, timeout_s=5)
        await asyncio.sleep(1.0)
        self.start_agent(settings)
        self.say("  agent restarted")

    async def _collect(self, settings: Settings, stop: asyncio.Event) -> None:
        def take(reply: Reply) -> None:
            if not reply.request_id.startswith("sg-"):
                return
            if reply.request_id in self.replies:
                self.duplicate_replies += 1
            else:
                self.replies[reply.request_id] = reply

        await follow_replies(settings.bootstrap, stop, take)

    async def _await_replies(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.replies) < len(self.planned) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.5)

    async def _settled_snapshots(self, settings: Settings, timeout_s: float
                                 ) -> dict[str, TenantUsage]:
        """Latest metering snapshot per tenant, once nothing is pending."""
        deadline = time.monotonic() + timeout_s
        latest: dict[str, TenantUsage] = {}
        consumer = AIOKafkaConsumer(METERING, bootstrap_servers=settings.bootstrap,
                                    auto_offset_reset="earliest", enable_auto_commit=False)
        await consumer.start()
        mark = time.time()
        try:
            while time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        snap = decode(record.value, _USAGE_SNAPSHOT)
                        latest[snap.tenant] = snap
                fresh = [s for s in latest.values() if s.at > mark + 2]
                if fresh and len(fresh) == len(latest) and all(s.pending == 0 for s in fresh):
                    break
        finally:
            await consumer.stop()
        return latest

    def _report(self, fleet: TraceFleet, snapshots: dict[str, TenantUsage],
                killed_at: float | None) -> ReplayReport:
        by_id = {p.request.request_id: p for p in self.planned}
        rejected: dict[str, int] = defaultdict(int)
        for reply in self.replies.values():
            if isinstance(reply, Rejection):
                rejected[reply.reason] += 1
        window: dict[tuple[str, int], float] = defaultdict(float)
        admitted_times: dict[str, list[tuple[float, float]]] = defaultdict(list)
        t0 = min(fleet.admitted_at.values(), default=0.0)
        for rid, at in fleet.admitted_at.items():
            p = by_id[rid]
            window[(p.request.tenant, int((at - t0) // 60))] += p.mu
            # Upper bound of what the agent can have counted for it: its reservation
            # while in flight, its actual MU once settled.
            admitted_times[p.request.tenant].append((at, max(p.mu, fleet.reserved_mu.get(rid,
                                                                                        p.mu))))
        ratios = [mu / (self.tenants[t].limit_mu_per_min + self.tenants[t].burst_mu)
                  for (t, _), mu in window.items()]
        return ReplayReport(
            requests=len(self.planned), admitted=len(fleet.admitted_at), rejected=dict(rejected),
            lost=len(self.planned) - len(self.replies),
            duplicate_replies=self.duplicate_replies,
            charged_mu=round(sum(s.charged_mu for s in snapshots.values()), 6),
            actual_mu_agent=round(sum(s.actual_mu for s in snapshots.values()), 6),
            actual_mu_workers=round(sum(by_id[r].mu for r in fleet.admitted_at), 6),
            pending_after=sum(s.pending for s in snapshots.values()),
            window_max_ratio=round(max(ratios, default=0.0), 4),
            window_violations=sum(r > 1.0 + 1e-9 for r in ratios),
            provisioned_rejected_within_reservation=self._reservation_breaches(admitted_times),
            agent_killed_at_s=None if killed_at is None else round(killed_at, 1))

    def _reservation_breaches(self, admitted: dict[str, list[tuple[float, float]]]) -> int:
        """Rejections of provisioned tenants whose window, with the request, fit the reservation.

        The window is the agent's: MU admitted from the start of the second 60 s
        before the rejection, each admitted request at the most the agent can have
        counted for it (``admitted`` holds max(reserved, actual)), the rejected one at
        the MU it was estimated at. So a breach found here is a breach whatever the
        agent knew of settlements at the time.
        """
        by_id = {p.request.request_id: p for p in self.planned}
        breaches = 0
        for rid, reply in self.replies.items():
            p = by_id[rid]
            plan_ = self.tenants[p.request.tenant]
            if not isinstance(reply, Rejection) or not plan_.reservation_mu_per_min:
                continue
            at = reply.rejected_at
            first = math.floor(at) - 60
            used = sum(mu for t, mu in admitted[p.request.tenant] if first <= t <= at)
            if used + (reply.model_units or p.mu) <= plan_.reservation_mu_per_min:
                breaches += 1
                if breaches <= 3:
                    self.say(f"  reservation breach {rid} {p.request.tenant}: window {used:.1f}"
                             f" + {reply.model_units} <= {plan_.reservation_mu_per_min:.1f}: "
                             f"{reply.detail}")
        return breaches


def replay_settings(state_dir: Path, base: Settings) -> Settings:
    return base.model_copy(update={"models": [MODEL], "state_dir": state_dir})
