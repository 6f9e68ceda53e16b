"""Replay a request stream through a shard-routing policy in simulated time. Pure, no I/O.

Fleet: ``shards`` shards of one model, each owned by one worker that
heartbeats every simulated second (``engine_state="ready"``), so the router
sees the fleet through the same events ``follow_heartbeats`` feeds it.

Service model (continuous batching as processor sharing with a per-stream
cap): every request resident on a shard is served at the same rate
``min(stream_mu_per_s, capacity_mu_per_s / n)``, n being the requests on the
shard. Below saturation each request runs at single-stream speed (an engine
decodes one sequence at a fixed token rate however empty the batch is);
above it the shard's capacity C is split evenly, as a batching engine does.
A request holds its MU on the shard from routing until it completes, which
is the router's notion of load (in flight + routed-not-started). The policy
is told ``Job.routed_mu`` (admission routes on its *estimate*), defaulting to
the true MU; the load figure below always counts true MU, so estimate error
shows up in it.

Load figure: every simulated second after ``warmup_s`` (while requests
still arrive), the outstanding MU of each shard is sampled and, if the mean
is positive, ``max / mean`` recorded. ``max_mean_load`` is the time average
of those samples (the headline figure), ``max_mean_load_p99`` their p99;
``max_mean_routed_load`` is the time average over the MU the policy was told
(what the router bounds: equal to the headline when it was told true MU).

Stickiness: per session, the share of its requests that went to its most
used shard, over sessions with at least ``min_session_requests`` requests.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from agents.router import ShardRouter
from schemas.events import WorkerHeartbeat

EPOCH = 1_790_000_000.0  # simulated t=0 as epoch seconds: the router ages heartbeats by it
MODEL = "sim-model"


@dataclass(frozen=True, slots=True)
class Job:
    at: float  # s from the start of the replay
    mu: float  # the work it really is
    session: str | None = None
    routed_mu: float | None = None  # what the policy is told (admission's estimate); None: mu


@dataclass(frozen=True, slots=True)
class FleetConfig:
    shards: int = 8
    capacity_mu_per_min: float = 6000.0  # one shard's worker
    stream_mu_per_s: float = 0.5  # one request alone: ≈50 output tok/s at β = 0.01 MU/token
    sample_s: float = 1.0  # every worker heartbeats, and shard loads are sampled, this often
    warmup_s: float = 0.0  # samples before this are dropped (the fleet filling up)
    min_session_requests: int = 5
    sticky_threshold: float = 0.8


class Policy(Protocol):
    name: str

    def observe(self, beat: WorkerHeartbeat, now: float) -> None: ...

    def route(self, request_id: str, session: str | None, mu: float, now: float
              ) -> int | None: ...

    def completed(self, request_id: str) -> None: ...


class TokenweirPolicy:
    """The admission agent's ShardRouter, called as AdmissionController calls it."""

    name = "tokenweir"

    def __init__(self, router: ShardRouter | None = None) -> None:
        self.router = router or ShardRouter()

    def observe(self, beat: WorkerHeartbeat, now: float) -> None:
        self.router.observe(beat, now)

    def route(self, request_id: str, session: str | None, mu: float, now: float) -> int | None:
        route = self.router.route(MODEL, session, now, mu)
        if route is None:
            return None
        self.router.routed(request_id, route, mu)
        return route.shard

    def completed(self, request_id: str) -> None:
        self.router.completed(request_id)


class _ShardSet:
    """Shards announced by heartbeats, for baselines that only need the membership."""

    def __init__(self) -> None:
        self.shards: list[int] = []

    def observe(self, beat: WorkerHeartbeat, now: float) -> None:
        if beat.engine_state == "ready" and not set(beat.shards) <= set(self.shards):
            self.shards = sorted(set(self.shards) | set(beat.shards))


class RoundRobinPolicy(_ShardSet):
    name = "round_robin"

    def __init__(self) -> None:
        super().__init__()
        self._next = 0

    def route(self, request_id: str, session: str | None, mu: float, now: float) -> int | None:
        if not self.shards:
            return None
        shard = self.shards[self._next % len(self.shards)]
        self._next += 1
        return shard

    def completed(self, request_id: str) -> None:
        pass


class LeastRequestsPolicy(_ShardSet):
    """Fewest outstanding requests, blind to their MU (the common proxy/LB default)."""

    name = "least_requests"

    def __init__(self) -> None:
        super().__init__()
        self._count: Counter[int] = Counter()
        self._where: dict[str, int] = {}
        self._tie = 0

    def route(self, request_id: str, session: str | None, mu: float, now: float) -> int | None:
        if not self.shards:
            return None
        # rotate ties so an idle fleet is not filled shard 0 first
        self._tie += 1
        n = len(self.shards)
        best = min(range(n), key=lambda i: (self._count[self.shards[i]], (i - self._tie) % n))
        shard = self.shards[best]
        self._count[shard] += 1
        self._where[request_id] = shard
        return shard

    def completed(self, request_id: str) -> None:
        shard = self._where.pop(request_id, None)
        if shard is not None:
            self._count[shard] -= 1


class ReplayResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    policy: str
    requests: int
    unrouted: int
    sessions: int  # with at least min_session_requests requests
    max_mean_load: float  # time average of max/mean shard MU load (the headline figure)
    max_mean_load_p99: float
    max_mean_routed_load: float  # the same time average over the MU the policy was told
    load_samples: int
    sticky_share: float  # share of sessions with ≥ sticky_threshold of requests on one shard
    mean_stickiness: float  # request-weighted mean of the sessions' top-shard share
    min_stickiness: float
    utilisation: float  # MU served / fleet capacity over the arrival window
    mean_stretch: float  # completion time / single-stream time, averaged over requests
    p99_stretch: float
    session_shares: dict[str, float]  # session -> top-shard share (qualifying sessions)


@dataclass(slots=True)
class _Shard:
    """Processor sharing via virtual time: v is the MU each resident request has received."""

    capacity_mu_per_s: float
    stream_mu_per_s: float
    v: float = 0.0
    t: float = 0.0
    version: int = 0
    outstanding_mu: float = 0.0
    outstanding_told_mu: float = 0.0
    resident: list[tuple[float, int]] = field(default_factory=list)  # heap of (finish v, job)

    def rate(self) -> float:
        n = len(self.resident)
        return min(self.stream_mu_per_s, self.capacity_mu_per_s / n) if n else 0.0

    def advance(self, now: float) -> None:
        self.v += self.rate() * (now - self.t)
        self.t = now

    def next_finish(self) -> float:
        return self.t + max(0.0, self.resident[0][0] - self.v) / self.rate()


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def replay(jobs: Sequence[Job], policy: Policy, fleet: FleetConfig = FleetConfig()
           ) -> ReplayResult:
    """Route ``jobs`` (sorted by ``at``) with ``policy`` and serve them on the simulated fleet."""
    shards = [_Shard(fleet.capacity_mu_per_min / 60.0, fleet.stream_mu_per_s)
              for _ in range(fleet.shards)]
    horizon = jobs[-1].at if jobs else 0.0
    events: list[tuple[float, int, int]] = []  # (completion time, shard, shard version)
    told_mu = [job.mu if job.routed_mu is None else job.routed_mu for job in jobs]
    placed: list[int] = [-1] * len(jobs)
    finished: list[float] = [math.nan] * len(jobs)
    ratios: list[float] = []
    told_ratios: list[float] = []
    seq = itertools.count()
    next_tick = 0.0
    i = 0

    def reschedule(s: int) -> None:
        shard = shards[s]
        shard.version += 1
        if shard.resident:
            heapq.heappush(events, (shard.next_finish(), s, shard.version))

    def tick(now: float) -> None:
        beat_seq = next(seq)
        for s in range(fleet.shards):
            policy.observe(WorkerHeartbeat(
                worker=f"w-{s}", model=MODEL, engine="sim", seq=beat_seq, shards=[s],
                engine_state="ready", capacity_mu_per_min=fleet.capacity_mu_per_min,
                sent_at=EPOCH + now), EPOCH + now)
        loads = [shard.outstanding_mu for shard in shards]
        mean = sum(loads) / len(loads)
        if now >= fleet.warmup_s and mean > 0:
            ratios.append(max(loads) / mean)
            told = [shard.outstanding_told_mu for shard in shards]
            if sum(told) > 0:
                told_ratios.append(max(told) * len(told) / sum(told))

    while True:
        while events and events[0][2] != shards[events[0][1]].version:
            heapq.heappop(events)  # superseded by a later arrival or completion
        t_done = events[0][0] if events else math.inf
        t_tick = next_tick if next_tick <= horizon else math.inf
        t_arrive = jobs[i].at if i < len(jobs) else math.inf
        now = min(t_done, t_tick, t_arrive)
        if now == math.inf:
            break
        if t_done == now:  # completions first: they free load the next decision may use
            _, s, _ = heapq.heappop(events)
            shard = shards[s]
            shard.advance(now)
            # ties and float error: everything within a nano-MU of its target is done
            while shard.resident and shard.resident[0][0] <= shard.v + 1e-9:
                _, j = heapq.heappop(shard.resident)
                shard.outstanding_mu -= jobs[j].mu
                shard.outstanding_told_mu -= told_mu[j]
                finished[j] = now
                policy.completed(str(j))
            if not shard.resident:
                shard.outstanding_mu = shard.outstanding_told_mu = 0.0  # no float drift
            reschedule(s)
        elif t_tick == now:  # heartbeats before arrivals: the router must know the fleet
            tick(now)
            next_tick += fleet.sample_s
        else:
            job = jobs[i]
            target = policy.route(str(i), job.session, told_mu[i], EPOCH + now)
            if target is not None:
                shard = shards[target]
                shard.advance(now)
                heapq.heappush(shard.resident, (shard.v + job.mu, i))
                shard.outstanding_mu += job.mu
                shard.outstanding_told_mu += told_mu[i]
                placed[i] = target
                reschedule(target)
            i += 1

    per_session: dict[str, Counter[int]] = defaultdict(Counter)
    for job, target in zip(jobs, placed, strict=True):
        if job.session is not None and target >= 0:
            per_session[job.session][target] += 1
    shares: dict[str, float] = {}
    weights: dict[str, int] = {}
    for session, counts in per_session.items():
        total = sum(counts.values())
        if total >= fleet.min_session_requests:
            shares[session] = max(counts.values()) / total
            weights[session] = total
    stretches = [(finished[j] - job.at) / (job.mu / fleet.stream_mu_per_s)
                 for j, job in enumerate(jobs) if job.mu > 0 and not math.isnan(finished[j])]
    window = max(horizon, fleet.sample_s)
    served = sum(job.mu for job, target in zip(jobs, placed, strict=True) if target >= 0)
    return ReplayResult(
        policy=policy.name,
        requests=len(jobs),
        unrouted=placed.count(-1),
        sessions=len(shares),
        max_mean_load=sum(ratios) / len(ratios) if ratios else 1.0,
        max_mean_load_p99=_quantile(ratios, 0.99) if ratios else 1.0,
        max_mean_routed_load=sum(told_ratios) / len(told_ratios) if told_ratios else 1.0,
        load_samples=len(ratios),
        sticky_share=(sum(1 for v in shares.values() if v >= fleet.sticky_threshold)
                      / len(shares)) if shares else 1.0,
        mean_stickiness=(sum(shares[s] * weights[s] for s in shares)
                         / sum(weights.values())) if shares else 1.0,
        min_stickiness=min(shares.values(), default=1.0),
        utilisation=served / (fleet.shards * fleet.capacity_mu_per_min / 60.0 * window),
        mean_stretch=sum(stretches) / len(stretches) if stretches else 1.0,
        p99_stretch=_quantile(stretches, 0.99) if stretches else 1.0,
        session_shares=shares,
    )


def capacity_for(jobs: Iterable[Job], shards: int, utilisation: float) -> float:
    """Per-shard MU/min that puts the fleet at ``utilisation`` over the jobs' time span."""
    listed = list(jobs)
    span = max(listed[-1].at - listed[0].at, 1.0) if listed else 1.0
    return sum(j.mu for j in listed) / span * 60.0 / (shards * utilisation)
