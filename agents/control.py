"""Admission and reconciliation decisions: (tenant state, event) -> decision. Pure.

Order of checks: authentication, tenant and model known, per-tenant limit
(token bucket), shared capacity (reservations, priorities, fairness), then a
healthy shard. The decision carries the tenant's new state; the agent only
writes it to its table and produces the records it names.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from agents.auth import authenticate
from agents.capacity import CapacityPool, PoolDecision
from agents.estimator import CostEstimator, Estimate
from agents.limiter import TenantState, TokenBucketLimiter
from agents.router import Route, ShardRouter
from schemas.events import InferenceRequest, Rejection, UsageEvent, WorkerHeartbeat
from schemas.tenancy import ControlPlaneConfig

NO_SHARD_RETRY_S = 2.0


class Admit(BaseModel):
    model_config = ConfigDict(frozen=True)

    action: Literal["admit"] = "admit"
    route: Route
    estimate: Estimate
    state: TenantState
    replay: bool = False  # already charged before a restart: only re-send the route


class Reject(BaseModel):
    model_config = ConfigDict(frozen=True)

    action: Literal["reject"] = "reject"
    rejection: Rejection
    state: TenantState | None  # None: nothing to store (unknown or unauthenticated tenant)


class Skip(BaseModel):
    model_config = ConfigDict(frozen=True)

    action: Literal["skip"] = "skip"
    why: str


class Settle(BaseModel):
    model_config = ConfigDict(frozen=True)

    action: Literal["settle"] = "settle"
    state: TenantState
    delta_mu: float  # charged (+) or refunded (−) on top of the reservation
    duplicate: bool = False


class AdmissionController:
    def __init__(self, config: ControlPlaneConfig, *, models: list[str],
                 estimator: CostEstimator | None = None, router: ShardRouter | None = None,
                 pool: CapacityPool | None = None) -> None:
        self.config = config
        self.models = frozenset(models)
        self.estimator = estimator or CostEstimator()
        self.router = router or ShardRouter()
        self.pool = pool or CapacityPool()
        self.limiter = TokenBucketLimiter()

    def reconfigure(self, config: ControlPlaneConfig) -> None:
        self.config = config

    def observe_heartbeat(self, beat: WorkerHeartbeat, now: float) -> None:
        self.router.observe(beat, now)

    def _reject(self, request: InferenceRequest, reason: str, detail: str,
                state: TenantState | None, retry_after_s: float | None = None,
                model_units: float | None = None) -> Reject:
        if state is not None:
            state = state.model_copy(update={"rejected": state.rejected + 1})
        return Reject(rejection=Rejection(
            request_id=request.request_id, tenant=request.tenant, model=request.model,
            reason=reason, detail=detail[:1024],  # type: ignore[arg-type]
            retry_after_s=None if retry_after_s is None else round(retry_after_s, 3),
            model_units=model_units),
            state=state)

    def admit(self, state: TenantState | None, request: InferenceRequest, offset: int,
              now: float) -> Admit | Reject | Skip:
        denied = authenticate(request, self.config)
        if denied is not None:
            return self._reject(request, "unauthenticated", denied, None)
        tenant = self.config.tenant(request.tenant)
        if tenant is None:
            return self._reject(request, "unauthenticated", "unknown tenant", None)
        if state is not None and offset <= state.request_offset:
            return self._replayed(state, request, now)
        if request.model not in self.models:
            return self._reject(request, "unknown_model",
                                f"model {request.model!r} is not served", state)
        state = self.limiter.refill(state or self.limiter.fresh(tenant, now), tenant, now)
        state = state.model_copy(update={"request_offset": offset})
        estimate = self.estimator.estimate(request, self.config.cost(request.model))
        mu = estimate.model_units
        limit = self.limiter.check(state, tenant, mu, now)
        if not limit.admitted:
            return self._reject(request, "rate_limited",
                                f"tenant limit {tenant.limit_mu_per_min:g} MU/min (burst "
                                f"{tenant.burst_mu:g}); {limit.window_mu:.2f} MU in the last "
                                f"minute; request ~{mu:.2f} MU", state, limit.retry_after_s, mu)
        if limit.path == "reservation":
            share = PoolDecision(admitted=True, reason="reservation")
        else:
            self.pool.set_capacity(self.router.live_capacity(now),
                                   self.config.reserved_mu_per_min())
            share = self.pool.decide(request.tenant, 0.0, request.priority, mu, now)
        if not share.admitted:
            return self._reject(request, "over_capacity", share.reason, state,
                                share.retry_after_s, mu)
        route = self.router.route(request.model, request.session_key, now, mu)
        if route is None:
            return self._reject(request, "over_capacity",
                                f"no healthy worker serves {request.model}", state,
                                NO_SHARD_RETRY_S, mu)
        self.pool.record(request.tenant, share, mu, now)
        self.router.routed(request.request_id, route, mu)
        state = self.limiter.charge(state, request.request_id, mu, now)
        return Admit(route=route, estimate=estimate, state=state)

    def _replayed(self, state: TenantState, request: InferenceRequest, now: float
                  ) -> Admit | Skip:
        """A request seen before a restart: charged already; resend its route if pending."""
        found = state.pending.get(request.request_id)
        if found is None:
            return Skip(why="request already settled or rejected before a restart")
        reserved = found[0]
        route = self.router.route(request.model, request.session_key, now, reserved)
        if route is None:
            return Skip(why="replayed request has no healthy shard yet; it stays pending")
        estimate = Estimate(input_tokens=0, output_tokens=0, images=0, model_units=reserved)
        return Admit(route=route, estimate=estimate, state=state, replay=True)

    def settle(self, state: TenantState | None, usage: UsageEvent, offset: int, now: float
               ) -> Settle | Skip:
        self.router.completed(usage.request_id)
        if state is None:
            return Skip(why=f"usage for tenant {usage.tenant} with no admission state")
        if offset <= state.usage_offset:
            return Skip(why="usage already applied before a restart")
        state = state.model_copy(update={"usage_offset": offset})
        settled = self.limiter.reconcile(state, self.config.tenant(usage.tenant),
                                         usage.request_id, usage.model_units, now)
        if settled is None:
            return Settle(state=state.model_copy(update={"duplicates": state.duplicates + 1}),
                          delta_mu=0.0, duplicate=True)
        self.estimator.observe(usage.tenant, usage.model, usage.output_tokens)
        return Settle(state=settled, delta_mu=settled.charged_mu - state.charged_mu)
