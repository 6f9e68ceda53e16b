"""What the demo replays: a slice of a real trace, its tenants, their limits and the fleet size.

Pure planning, no I/O beyond reading the trace files. The demo compresses
trace time by ``speedup`` and may thin the trace to a ``sample`` of its
requests so that a day fits a few minutes on a laptop; a replica's capacity
is sized from the (thinned, compressed) peak demand so that the autoscaler
has something to do: ``peak_replicas`` replicas at the policy's target
utilisation carry the busiest minute.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from bench.traces import TraceRequest, azure_requests, servegen_requests
from schemas.cost import CostModel
from schemas.events import InferenceRequest

TraceName = Literal["servegen", "azure"]


class DemoTrace(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    trace: TraceName = "servegen"
    start_s: Annotated[float, Field(ge=0)] = 0.0  # trace second the slice starts at
    duration_s: Annotated[float, Field(gt=0)] = 86_400.0  # trace seconds replayed
    speedup: Annotated[float, Field(gt=0)] = 720.0  # trace seconds per wall second
    sample: Annotated[float, Field(gt=0, le=1)] = 0.002  # share of the trace's requests kept
    tenants: Annotated[int, Field(ge=1, le=64)] = 6  # the busiest tenants of the slice
    peak_replicas: Annotated[int, Field(ge=1, le=64)] = 4  # replicas the busiest minute needs
    target_utilisation: Annotated[float, Field(gt=0, le=1)] = 0.65
    seed: int = 7


class PlannedRequest(BaseModel):
    model_config = ConfigDict(frozen=True)

    request: InferenceRequest
    wall_s: float  # s after the replay starts


class TenantLimits(BaseModel):
    limit_mu_per_min: float  # MU/min
    burst_mu: float  # MU
    reservation_mu_per_min: float = 0.0  # MU/min


class DemoPlan(BaseModel):
    requests: list[PlannedRequest]
    tenants: dict[str, TenantLimits]
    cost: CostModel
    wall_s: float  # s, the replay's length

    @property
    def peak_mu_per_min(self) -> float:
        return _peak(self.requests, self.cost)


def _trace(spec: DemoTrace) -> list[TraceRequest]:
    if spec.trace == "servegen":
        return servegen_requests(spec.start_s, spec.duration_s, seed=spec.seed,
                                 sessions_per_tenant=4)
    rows = azure_requests()
    return [r for r in rows if spec.start_s <= r.at < spec.start_s + spec.duration_s]


def _mu(request: InferenceRequest, cost: CostModel) -> float:
    # The worker prices what it served; the demo prompt is 4 characters a token.
    return cost.model_units(len(request.prompt or "") // 4, request.max_tokens)


def _peak(requests: list[PlannedRequest], cost: CostModel) -> float:
    per_minute: Counter[int] = Counter()
    for p in requests:
        per_minute[int(p.wall_s // 60)] += _mu(p.request, cost)  # type: ignore[assignment]
    # A replay shorter than a minute: its MU, scaled to a minute.
    if len(per_minute) == 1 and requests:
        span = max(requests[-1].wall_s, 1.0)
        return sum(per_minute.values()) * 60.0 / span
    return max(per_minute.values(), default=0.0)


def plan(spec: DemoTrace, *, model: str, run_id: str, base_cost: CostModel | None = None
         ) -> DemoPlan:
    base_cost = base_cost or CostModel()
    rng = random.Random(spec.seed)
    rows = [r for r in _trace(spec) if rng.random() < spec.sample]
    busiest = {t for t, _ in Counter(r.tenant for r in rows).most_common(spec.tenants)}
    rows = [r for r in rows if r.tenant in busiest]
    t0 = rows[0].at if rows else 0.0
    requests = [
        PlannedRequest(
            request=InferenceRequest(
                request_id=f"demo-{run_id}-{i}", tenant=r.tenant, model=model,
                # Four characters a token for the admission estimator, a word a token
                # for the sim engine: both count the trace's input tokens.
                prompt="tok " * max(1, r.input_tokens),
                max_tokens=max(1, min(r.output_tokens, 65_536)),
                session_key=r.session),
            wall_s=(r.at - t0) / spec.speedup)
        for i, r in enumerate(rows)
    ]
    peak = _peak(requests, base_cost)
    capacity = max(1.0, peak / (spec.peak_replicas * spec.target_utilisation))
    cost = base_cost.model_copy(update={"capacity_mu_per_min": round(capacity, 3)})
    return DemoPlan(requests=requests, tenants=_limits(requests, cost), cost=cost,
                    wall_s=requests[-1].wall_s if requests else 0.0)


def _limits(requests: list[PlannedRequest], cost: CostModel) -> dict[str, TenantLimits]:
    """Each tenant may use 90% of its own peak minute; the largest is provisioned.

    Compressed, a trace's bursts land within seconds, so the busiest moments
    of most tenants are throttled (the report shows rejections) while the
    provisioned tenant keeps its reservation.
    """
    per_minute: dict[str, Counter[int]] = defaultdict(Counter)
    for p in requests:
        per_minute[p.request.tenant][int(p.wall_s // 60)] += _mu(p.request, cost)  # type: ignore[assignment]
    totals = {t: sum(m.values()) for t, m in per_minute.items()}
    largest = max(totals, key=lambda t: totals[t], default=None)
    limits = {}
    for tenant, minutes in per_minute.items():
        limit = max(1.0, 0.9 * max(minutes.values()))
        limits[tenant] = TenantLimits(
            limit_mu_per_min=round(limit, 3), burst_mu=round(limit / 2, 3),
            reservation_mu_per_min=round(limit / 2, 3) if tenant == largest else 0.0)
    return limits


# The replay lasts minutes, not hours: windows, start-up and stabilisation are
# shortened in proportion so that scaling up and back down shows within it.
SCALING_TOML = """\
[scaling]
tick_s = 1
stable_window_s = 20
panic_window_s = 4
beat_timeout_s = 5
resend_s = 10

[scaling.policy]
min_replicas = {min_replicas}
max_replicas = {max_replicas}
target_utilisation = {target}
stabilisation_s = 30
startup_s = 5
min_lifetime_s = 10
panic_s = 2
drain_s = 20
"""


def control_toml(plan_: DemoPlan, model: str, spec: DemoTrace) -> str:
    """The control-plane file: the model's cost, the tenants' limits, no auth (local demo)."""
    lines = ["# Written by `tokenweir demo`: requests are unsigned here, so",
             "# authentication is off; production configs list keys.",
             "auth_required = false", "", f'[models."{model}"]']
    lines += [f"{k} = {v}" for k, v in plan_.cost.model_dump().items()] + [""]
    # Reservations are held out of live capacity: the floor of the fleet carries
    # them with a replica to spare for everyone else.
    reserved = sum(t.reservation_mu_per_min for t in plan_.tenants.values())
    floor = math.ceil(reserved / plan_.cost.capacity_mu_per_min) + 1
    lines += [SCALING_TOML.format(min_replicas=floor,
                                  max_replicas=max(floor, 2 * spec.peak_replicas),
                                  target=spec.target_utilisation)]
    for tenant, lim in sorted(plan_.tenants.items()):
        plan_name = "provisioned" if lim.reservation_mu_per_min else "pay_per_token"
        lines += [f'[tenants."{tenant}"]', f'plan = "{plan_name}"',
                  f"limit_mu_per_min = {lim.limit_mu_per_min}", f"burst_mu = {lim.burst_mu}",
                  f"reservation_mu_per_min = {lim.reservation_mu_per_min}", ""]
    return "\n".join(lines)
