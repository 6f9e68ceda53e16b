"""Admission and reconciliation decisions: (tenant state, event) -> decision. Pure.

Order of checks: authentication, tenant and model known, per-tenant limit
(token bucket), shared capacity (reservations, priorities, fairness), then a
healthy shard. The decision carries the tenant's new state; the agent only
writes it to its table and produces the records it names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict

from agents import windows
from agents.auth import authenticate
from agents.capacity import CapacityPool
from agents.estimator import CostEstimator
from agents.limiter import Reservation, Settlement, TenantState, TokenBucketLimiter
from agents.router import Route, ShardRouter
from schemas.events import InferenceRequest, Rejection, UsageEvent, WorkerHeartbeat
from schemas.tenancy import ControlPlaneConfig

NO_SHARD_RETRY_S = 2.0


class Admit(BaseModel):
    model_config = ConfigDict(frozen=True)

    action: Literal["admit"] = "admit"
    route: Route
    reservation: Reservation  # write before the tenant's state
    state: TenantState | None  # None: nothing to store (a replay, charged before a restart)
    replay: bool = False


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
    reservation: Reservation | None  # the settled reservation, None for a duplicate
    delta_mu: float  # charged (+) or refunded (−) on top of the reservation
    duplicate: bool = False


class UsageLike(Protocol):
    """What settling reads of a usage record: a UsageEvent, or the sink's fast Struct of it."""

    @property
    def request_id(self) -> str: ...
    @property
    def tenant(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def model_units(self) -> float: ...
    @property
    def output_tokens(self) -> int: ...


# An open reservation: MU reserved and the epoch second charged in come first (the
# ledger's tuples carry more after them, unread here).
Held = tuple[Any, ...]
UsageItem = tuple[UsageLike, int, Held | None]  # usage, its offset, its open reservation


class SettleBatch(BaseModel):
    """One tenant's usage records of a batch, settled."""

    model_config = ConfigDict(frozen=True)

    action: Literal["settle_batch"] = "settle_batch"
    state: TenantState | None  # None: nothing to store (no admission state, or all replays)
    settled: tuple[str, ...] = ()  # request ids whose reservations are now settled
    # Applied before a restart that lost their reservations' deletion: delete them now.
    closed_late: tuple[str, ...] = ()
    duplicates: int = 0  # redeliveries (or usage of requests never admitted), charged nothing
    why: str = ""  # when state is None


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

    def admit(self, state: TenantState | None, existing: Reservation | None,
              request: InferenceRequest, offset: int, now: float) -> Admit | Reject | Skip:
        """Decide on ``request`` (record ``offset``); ``existing``: its reservation, if any."""
        denied = authenticate(request, self.config)
        if denied is not None:
            return self._reject(request, "unauthenticated", denied, None)
        tenant = self.config.tenant(request.tenant)
        if tenant is None:
            return self._reject(request, "unauthenticated", "unknown tenant", None)
        if state is not None and offset <= state.request_offset:
            return self._replayed(existing, request, now)
        state = self.limiter.refill(state or self.limiter.fresh(tenant, now), tenant, now)
        state = state.model_copy(update={"request_offset": offset})
        if existing is not None:
            if existing.admit_offset != offset:
                return self._reject(request, "invalid", "request id already admitted", state)
            # Admitted before a crash that kept the reservation but not the tenant's state.
            return self._route(state, existing, request, now, recharge=True)
        if request.model not in self.models:
            return self._reject(request, "unknown_model",
                                f"model {request.model!r} is not served", state)
        estimate = self.estimator.estimate(request, self.config.cost(request.model))
        mu = estimate.model_units
        limit = self.limiter.check(state, tenant, mu, now)
        if not limit.admitted:
            return self._reject(request, "rate_limited",
                                f"tenant limit {tenant.limit_mu_per_min:g} MU/min (burst "
                                f"{tenant.burst_mu:g}); {limit.window_mu:.2f} MU in the last "
                                f"minute; request ~{mu:.2f} MU", state, limit.retry_after_s, mu)
        shared = limit.path != "reservation"  # reserved capacity is never the pool's
        if shared:
            self.pool.set_capacity(self.router.live_capacity(now),
                                   self.config.reserved_mu_per_min())
            share = self.pool.decide(request.tenant, request.priority, mu, now)
            if not share.admitted:
                return self._reject(request, "over_capacity", share.reason, state,
                                    share.retry_after_s, mu)
        reservation = Reservation(tenant=request.tenant, mu=mu, slot=math.floor(now),
                                  admit_offset=offset)
        decision = self._route(state, reservation, request, now, recharge=True)
        if isinstance(decision, Admit) and shared:
            self.pool.record(request.tenant, mu, now)
        return decision

    def _route(self, state: TenantState, reservation: Reservation, request: InferenceRequest,
               now: float, *, recharge: bool) -> Admit | Reject:
        route = self.router.route(request.model, request.session_key, now, reservation.mu)
        if route is None:
            return self._reject(request, "over_capacity",
                                f"no healthy worker serves {request.model}", state,
                                NO_SHARD_RETRY_S, reservation.mu)
        self.router.routed(request.request_id, route, reservation.mu)
        if recharge:
            state = self.limiter.charge(state, reservation.mu, reservation.slot)
        return Admit(route=route, reservation=reservation, state=state)

    def _replayed(self, existing: Reservation | None, request: InferenceRequest, now: float
                  ) -> Admit | Skip:
        """A request decided before a restart: charged already; resend its route if pending."""
        if existing is None or existing.settled:
            return Skip(why="request already settled or rejected before a restart")
        route = self.router.route(request.model, request.session_key, now, existing.mu)
        if route is None:
            return Skip(why="replayed request has no healthy shard yet; it stays pending")
        self.router.routed(request.request_id, route, existing.mu)
        return Admit(route=route, reservation=existing, state=None, replay=True)

    def settle(self, state: TenantState | None, existing: Reservation | None, usage: UsageEvent,
               offset: int, now: float) -> Settle | Skip:
        """Reconcile ``usage`` (record ``offset``) with its reservation ``existing``."""
        held = None
        # A reservation settled by this very record (a crash lost the tenant's state) is
        # applied again; settled by another record, it makes this one a redelivery.
        if existing is not None and (not existing.settled or existing.settle_offset == offset):
            held = (existing.mu, existing.slot)
        out = self.settle_batch(state, [(usage, offset, held)], now)
        if out.state is None:
            return Skip(why=out.why)
        if existing is None or not out.settled:
            return Settle(state=out.state, reservation=None, delta_mu=0.0, duplicate=True)
        reservation = existing.model_copy(update={
            "actual_mu": usage.model_units, "settle_offset": offset, "settled_at": now})
        return Settle(state=out.state, reservation=reservation,
                      delta_mu=usage.model_units - existing.mu)

    def settle_batch(self, state: TenantState | None, items: Sequence[UsageItem], now: float
                     ) -> SettleBatch:
        """Reconcile one tenant's usage records, in offset order, with their open
        reservations (None: none is open, the record is a redelivery)."""
        self.router.completed_many([usage.request_id for usage, _, _ in items])
        if state is None:
            return SettleBatch(state=None, why=f"usage for tenant {items[0][0].tenant} with no "
                                               f"admission state")
        applied = state.usage_offset
        tenant = items[0][0].tenant
        metered = windows.pruned(state.metered, now)
        start = windows.bucket(now)
        reconciled: list[tuple[float, int, float]] = []
        outputs: dict[str, list[int]] = {}
        settled: list[str] = []
        settled_here: set[str] = set()
        closed_late: list[str] = []
        duplicates, last = 0, applied
        for usage, offset, held in items:
            request_id = usage.request_id
            if offset <= applied:  # applied before a restart
                if held is not None:
                    closed_late.append(request_id)
                continue
            last = offset
            if held is None or request_id in settled_here:
                duplicates += 1  # settled by an earlier record (a redelivery), or never admitted
                continue
            actual = usage.model_units
            reconciled.append((held[0], held[1], actual))
            series = metered.get(usage.model)
            if series is None:
                series = metered[usage.model] = {}
            series[start] = series.get(start, 0.0) + actual
            tokens = outputs.get(usage.model)
            if tokens is None:
                tokens = outputs[usage.model] = []
            tokens.append(usage.output_tokens)
            settled.append(request_id)
            settled_here.add(request_id)
        settlement = Settlement(state, self.config.tenant(tenant), now)
        settlement.reconcile_many(reconciled)
        for model, lengths in outputs.items():
            self.estimator.sketch(tenant, model).add_many(lengths)
        if last == applied:
            return SettleBatch(state=None, closed_late=tuple(closed_late),
                               why="usage already applied before a restart")
        return SettleBatch(
            state=settlement.state(usage_offset=last, metered=metered,
                                   duplicates=state.duplicates + duplicates),
            settled=tuple(settled), closed_late=tuple(closed_late), duplicates=duplicates)
