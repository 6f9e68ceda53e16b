"""Routing benchmark: shard load balance vs session stickiness on a real trace slice.

Acceptance: on a replay with session keys, tokenweir's router keeps the
time-averaged max/mean shard MU load ≤ 1.25 while ≥ 80% of the sessions
keep ≥ 80% of their requests on one shard; round-robin and least-requests
run on the same jobs and fleet for comparison. Service model and metrics
are described in ``bench.shardsim``. The headline runs route on each
request's true MU; ``tokenweir_estimated`` routes the same jobs on what
admission would reserve (CostEstimator), which is what production does.

    python -m bench.routing [--start 78000 --duration 1200 --sessions-per-tenant 50]

The last line of stdout is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import heapq
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from agents.estimator import CostEstimator
from bench.shardsim import (
    MODEL,
    FleetConfig,
    Job,
    LeastRequestsPolicy,
    Policy,
    ReplayResult,
    RoundRobinPolicy,
    TokenweirPolicy,
    capacity_for,
    replay,
)
from bench.traces import TraceRequest, servegen_requests
from schemas.cost import CostModel

LOAD_BOUND = 1.25
STICKY_TARGET = 0.8
MAX_TOKENS = 32768  # DeepSeek-R1's output limit in the trace: the longest outputs hit it

POLICIES: dict[str, Callable[[], Policy]] = {
    "tokenweir": TokenweirPolicy,
    "round_robin": RoundRobinPolicy,
    "least_requests": LeastRequestsPolicy,
}


def jobs_from_trace(requests: Sequence[TraceRequest], cost: CostModel) -> list[Job]:
    return [Job(at=r.at, mu=cost.model_units(r.input_tokens, r.output_tokens), session=r.session)
            for r in requests]


def with_estimates(jobs: Sequence[Job], requests: Sequence[TraceRequest], cost: CostModel,
                   stream_mu_per_s: float, max_tokens: int = MAX_TOKENS) -> list[Job]:
    """Jobs routed on admission's estimate (CostEstimator: tenant p90 of output tokens).

    The trace has no max_tokens, so every request gets the model's limit; a
    request's output is learned when it would finish running alone, a lower
    bound on when its usage event reaches admission.
    """
    estimator = CostEstimator()
    learned: list[tuple[float, str, int]] = []  # (known at, tenant, output tokens)
    out: list[Job] = []
    for job, r in zip(jobs, requests, strict=True):
        while learned and learned[0][0] <= r.at:
            _, tenant, tokens = heapq.heappop(learned)
            estimator.observe(tenant, MODEL, tokens)
        output = estimator.expected_output_tokens(r.tenant, MODEL, max_tokens)
        out.append(replace(job, routed_mu=cost.model_units(r.input_tokens, output)))
        heapq.heappush(learned, (r.at + job.mu / stream_mu_per_s, r.tenant, r.output_tokens))
    return out


def passes(r: ReplayResult) -> bool:
    return r.max_mean_load <= LOAD_BOUND and r.sticky_share >= STICKY_TARGET


def _table(results: Sequence[ReplayResult]) -> str:
    head = (f"{'policy':<20}{'max/mean avg':>13}{'p99':>8}{'routed avg':>11}{'sticky sess':>13}"
            f"{'mean stick':>12}{'min stick':>11}{'stretch':>9}{'p99 str':>9}")
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(f"{r.policy:<20}{r.max_mean_load:>13.3f}{r.max_mean_load_p99:>8.3f}"
                    f"{r.max_mean_routed_load:>11.3f}"
                    f"{r.sticky_share:>13.1%}{r.mean_stickiness:>12.1%}{r.min_stickiness:>11.1%}"
                    f"{r.mean_stretch:>9.2f}{r.p99_stretch:>9.2f}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", type=float, default=78000.0, help="trace second to start at")
    ap.add_argument("--duration", type=float, default=1200.0, help="seconds of trace")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--sessions-per-tenant", type=int, default=50)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--utilisation", type=float, default=0.7,
                    help="size shard capacity so the fleet runs at this mean utilisation")
    ap.add_argument("--stream-mu-per-s", type=float, default=0.5,
                    help="one request's service rate on an uncongested shard")
    ap.add_argument("--warmup", type=float, default=0.0,
                    help="seconds of load samples dropped while the fleet fills up")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--no-estimate", action="store_true",
                    help="skip the extra tokenweir run routed on admission's cost estimate")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    trace = servegen_requests(args.start, args.duration, seed=args.seed,
                              sessions_per_tenant=args.sessions_per_tenant)
    cost = CostModel()
    jobs = jobs_from_trace(trace, cost)
    fleet = FleetConfig(shards=args.shards,
                        capacity_mu_per_min=capacity_for(jobs, args.shards, args.utilisation),
                        stream_mu_per_s=args.stream_mu_per_s, warmup_s=args.warmup)
    tenants = len({r.tenant for r in trace})
    print(f"trace: ServeGen DeepSeek-R1 [{args.start:g}, {args.start + args.duration:g}) s, "
          f"seed {args.seed}: {len(jobs)} requests, {tenants} tenants, "
          f"{args.sessions_per_tenant} session keys per tenant, "
          f"{sum(j.mu for j in jobs) / args.duration * 60:.0f} MU/min offered")
    print(f"fleet: {fleet.shards} shards × 1 worker, {fleet.capacity_mu_per_min:.0f} MU/min "
          f"each (target utilisation {args.utilisation:.0%}), {fleet.stream_mu_per_s} MU/s per "
          f"stream, processor sharing; load sampled every {fleet.sample_s:g} s after "
          f"{fleet.warmup_s:g} s warm-up")
    print("costs: routed on the true MU; tokenweir_estimated routes on admission's estimate "
          "(tenant p90 output tokens), load figures always count true MU")
    print(f"sessions: stickiness over sessions with ≥ {fleet.min_session_requests} requests; "
          f"'sticky sess' = share of them with ≥ {fleet.sticky_threshold:.0%} on one shard")
    print()

    results = [replay(jobs, POLICIES[name](), fleet) for name in args.policies.split(",")]
    if not args.no_estimate:
        estimated = with_estimates(jobs, trace, cost, fleet.stream_mu_per_s)
        results.append(replay(estimated, TokenweirPolicy(), fleet).model_copy(
            update={"policy": "tokenweir_estimated"}))
    print(_table(results))
    print()
    by_name = {r.policy: r for r in results}
    verdicts: dict[str, bool] = {}
    for name in ("tokenweir", "tokenweir_estimated"):
        r = by_name.get(name)
        if r is None:
            continue
        verdicts[name] = ok = passes(r)
        print(f"{name}: max/mean true-MU load (time avg) {r.max_mean_load:.3f} "
              f"{'≤' if r.max_mean_load <= LOAD_BOUND else '>'} {LOAD_BOUND}, "
              f"sticky sessions {r.sticky_share:.1%} "
              f"{'≥' if r.sticky_share >= STICKY_TARGET else '<'} {STICKY_TARGET:.0%} "
              f"-> {'PASS' if ok else 'FAIL'}")
    print(f"elapsed {time.perf_counter() - started:.1f} s")

    summary: dict[str, object] = {"bench": "routing"}
    for r in results:
        summary[f"{r.policy}_max_mean_load"] = round(r.max_mean_load, 4)
        summary[f"{r.policy}_max_mean_load_p99"] = round(r.max_mean_load_p99, 4)
        if r.max_mean_routed_load != r.max_mean_load:
            summary[f"{r.policy}_max_mean_routed_load"] = round(r.max_mean_routed_load, 4)
        summary[f"{r.policy}_sticky_share"] = round(r.sticky_share, 4)
        summary[f"{r.policy}_mean_stickiness"] = round(r.mean_stickiness, 4)
        summary[f"{r.policy}_min_stickiness"] = round(r.min_stickiness, 4)
    for name, ok in verdicts.items():
        summary[f"{name}_pass"] = ok
    summary.update(requests=len(jobs), sessions=results[0].sessions if results else 0,
                   session_keys=len({j.session for j in jobs if j.session is not None}),
                   shards=fleet.shards, utilisation=round(results[0].utilisation, 4)
                   if results else 0.0)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
