"""Per-tenant token bucket in model units, with reconciliation. Pure.

The bucket holds up to ``burst_mu`` MU and refills at ``limit_mu_per_min``;
a request is admitted when its estimated MU is in the bucket. When the
worker reports actual usage, the difference to the reservation is refunded
or charged; a charge may take the bucket below zero (debt), which delays
the tenant's next admissions until it is repaid. In any window of length
T, what is admitted is at most ``burst_mu + limit·T`` plus outstanding debt.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from schemas.tenancy import TenantConfig


class TenantState(BaseModel):
    """One tenant's durable state (a Faust table value keyed by tenant)."""

    model_config = ConfigDict(extra="forbid")

    tokens: float  # MU in the bucket; negative is debt
    updated_at: float  # epoch s of the last refill
    charged_mu: float = 0.0  # Σ reservations + reconciliation deltas
    actual_mu: float = 0.0  # Σ actual MU reported by workers
    pending: dict[str, float] = {}  # request id -> MU reserved, awaiting its usage event
    admitted: Annotated[int, Field(ge=0)] = 0
    rejected: Annotated[int, Field(ge=0)] = 0
    duplicates: Annotated[int, Field(ge=0)] = 0  # redelivered usage events ignored
    # Highest offsets applied: a record replayed after a crash is not applied twice.
    request_offset: int = -1
    usage_offset: int = -1


class LimitDecision(BaseModel):
    model_config = ConfigDict(frozen=True)

    admitted: bool
    retry_after_s: float = 0.0  # when the bucket will hold the request's MU


class TokenBucketLimiter:
    def fresh(self, config: TenantConfig, now: float) -> TenantState:
        return TenantState(tokens=config.burst_mu, updated_at=now)

    def refill(self, state: TenantState, config: TenantConfig, now: float) -> TenantState:
        elapsed = max(0.0, now - state.updated_at)
        tokens = min(config.burst_mu, state.tokens + elapsed * config.limit_mu_per_min / 60.0)
        return state.model_copy(update={"tokens": tokens, "updated_at": max(now, state.updated_at)})

    def check(self, state: TenantState, config: TenantConfig, cost_mu: float) -> LimitDecision:
        """Would ``cost_mu`` fit now? (``state`` already refilled.)"""
        if cost_mu <= state.tokens:
            return LimitDecision(admitted=True)
        rate = config.limit_mu_per_min / 60.0
        if rate <= 0 or cost_mu > config.burst_mu:
            # Never fits: a rate of zero, or a request larger than the whole burst.
            return LimitDecision(admitted=False, retry_after_s=3600.0)
        return LimitDecision(admitted=False, retry_after_s=(cost_mu - state.tokens) / rate)

    def charge(self, state: TenantState, request_id: str, cost_mu: float) -> TenantState:
        return state.model_copy(update={
            "tokens": state.tokens - cost_mu,
            "charged_mu": state.charged_mu + cost_mu,
            "pending": {**state.pending, request_id: cost_mu},
            "admitted": state.admitted + 1,
        })

    def reconcile(self, state: TenantState, request_id: str, actual_mu: float
                  ) -> TenantState | None:
        """Settle a reservation with actual usage; None if already settled (a duplicate)."""
        reserved = state.pending.get(request_id)
        if reserved is None:
            return None
        pending = dict(state.pending)
        del pending[request_id]
        delta = actual_mu - reserved
        return state.model_copy(update={
            "tokens": state.tokens - delta,
            "charged_mu": state.charged_mu + delta,
            "actual_mu": state.actual_mu + actual_mu,
            "pending": pending,
        })
