"""Per-tenant limits in model units: token bucket, 60 s window and reservation. Pure.

Three rules, all in MU:

* **Bucket.** Holds up to ``burst_mu`` and refills at ``limit_mu_per_min``;
  a request is admitted when its estimated MU is in the bucket.
* **Window.** MU charged in the last minute (1-second slots; the window spans
  60 to 61 s so that it covers every 60 s interval) stays within
  ``limit + burst``. The bucket alone would allow ``burst + limit`` per minute
  *plus* whatever refunds brought back, so the window is what bounds each
  minute for the tenant and for whoever bills it.
* **Reservation.** A provisioned tenant whose window, with the request, is
  within its reservation is admitted whatever the bucket says: a reservation
  is capacity the tenant holds, not a best-effort share. (It still charges
  the bucket, so the tenant's total stays bounded by the two rules above.)

Reconciliation: when the worker reports actual usage, the difference to the
reservation is charged or refunded, to the bucket and to the window slot the
request was admitted in. A charge may take the bucket below zero (debt), which holds back the
tenant's next admissions until it is repaid; a refund never fills the bucket
above its burst.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.tenancy import TenantConfig

WINDOW_S = 60
NEVER_S = 3600.0
UMU = 1_000_000  # µMU per MU  # retry-after for a request that can never fit the tenant's limits


class TenantState(BaseModel):
    """One tenant's durable state (a Faust table value keyed by tenant). Small: O(1) fields
    plus at most 61 window slots, so writing it on every event stays cheap."""

    model_config = ConfigDict(extra="forbid")

    tokens: float  # MU in the bucket; negative is debt
    updated_at: float  # epoch s of the last refill
    actual_mu: float = 0.0  # Σ actual MU reported by workers for settled requests
    pending: Annotated[int, Field(ge=0)] = 0  # requests admitted, usage not yet settled
    # Σ MU reserved by pending requests, in µMU: an integer, so that it returns to
    # exactly 0 when everything is settled and charged == actual holds to the bit.
    reserved_umu: int = 0
    window: dict[int, float] = {}  # epoch second -> MU charged in it (last 61 s only)
    metered: dict[str, dict[int, float]] = {}  # model -> 5 s bucket -> actual MU (agents.windows)
    admitted: Annotated[int, Field(ge=0)] = 0
    rejected: Annotated[int, Field(ge=0)] = 0
    duplicates: Annotated[int, Field(ge=0)] = 0  # redelivered usage events ignored
    # Highest offsets applied: a record replayed after a crash is not applied twice.
    request_offset: int = -1
    usage_offset: int = -1

    @property
    def charged_mu(self) -> float:
        """What the tenant is charged: actual MU once settled, the reservation until then."""
        return self.actual_mu + self.reserved_umu / UMU


def umu(mu: float) -> int:
    return round(mu * UMU)


class Reservation(BaseModel):
    """One admitted request's charge (a table value keyed by request id, written in the
    tenant's partition *before* the tenant's state, so that a crash leaves either both,
    or the reservation alone, which the replayed record then completes)."""

    model_config = ConfigDict(extra="forbid")

    tenant: str
    mu: float  # MU reserved at admission
    slot: int  # epoch second the reservation was charged in
    admit_offset: int  # offset of the admitting request record
    actual_mu: float | None = None  # MU the worker reported, once settled
    settle_offset: int | None = None  # offset of the settling usage record
    settled_at: float | None = None  # epoch s

    @property
    def settled(self) -> bool:
        return self.settle_offset is not None


class LimitDecision(BaseModel):
    model_config = ConfigDict(frozen=True)

    admitted: bool
    path: Literal["reservation", "limit", "rejected"]
    retry_after_s: float = 0.0  # s until the request would fit
    window_mu: float = 0.0  # MU charged in the last minute before this request


def _first_slot(now: float) -> int:
    return math.floor(now) - WINDOW_S


class TokenBucketLimiter:
    def fresh(self, config: TenantConfig, now: float) -> TenantState:
        return TenantState(tokens=config.burst_mu, updated_at=now)

    def refill(self, state: TenantState, config: TenantConfig, now: float) -> TenantState:
        elapsed = max(0.0, now - state.updated_at)
        tokens = min(config.burst_mu, state.tokens + elapsed * config.limit_mu_per_min / 60.0)
        first = _first_slot(now)
        window = {s: mu for s, mu in state.window.items() if s >= first}
        return state.model_copy(update={"tokens": tokens, "window": window,
                                        "updated_at": max(now, state.updated_at)})

    def window_mu(self, state: TenantState, now: float) -> float:
        first = _first_slot(now)
        return sum(mu for s, mu in state.window.items() if s >= first)

    def check(self, state: TenantState, config: TenantConfig, cost_mu: float, now: float
              ) -> LimitDecision:
        """Would ``cost_mu`` be admitted now? (``state`` already refilled.)"""
        used = self.window_mu(state, now)
        if used + cost_mu <= config.reservation_mu_per_min:
            return LimitDecision(admitted=True, path="reservation", window_mu=used)
        ceiling = config.limit_mu_per_min + config.burst_mu
        if cost_mu <= state.tokens and used + cost_mu <= ceiling:
            return LimitDecision(admitted=True, path="limit", window_mu=used)
        rate = config.limit_mu_per_min / 60.0
        if rate <= 0 or cost_mu > config.burst_mu:
            # Never fits: a rate of zero, or a request larger than the whole burst.
            return LimitDecision(admitted=False, path="rejected", retry_after_s=NEVER_S,
                                 window_mu=used)
        wait = max((cost_mu - state.tokens) / rate, self._window_wait(state, ceiling - cost_mu,
                                                                     now))
        return LimitDecision(admitted=False, path="rejected", retry_after_s=wait, window_mu=used)

    def _window_wait(self, state: TenantState, room: float, now: float) -> float:
        """Seconds until the window's charges drop to ``room`` as slots expire."""
        total = self.window_mu(state, now)
        for slot in sorted(state.window):
            if total <= room:
                break
            total -= state.window[slot]
            if total <= room:
                return max(0.0, slot + WINDOW_S + 1 - now)
        return 0.0

    def charge(self, state: TenantState, cost_mu: float, slot: int) -> TenantState:
        return state.model_copy(update={
            "tokens": state.tokens - cost_mu,
            "reserved_umu": state.reserved_umu + umu(cost_mu),
            "pending": state.pending + 1,
            "window": _add(state.window, slot, cost_mu),
            "admitted": state.admitted + 1,
        })

    def reconcile(self, state: TenantState, config: TenantConfig | None,
                  reservation: Reservation, actual_mu: float, now: float) -> TenantState:
        """Settle a reservation with the actual usage: refund or charge the difference."""
        settlement = Settlement(state, config, now)
        settlement.reconcile(reservation.mu, reservation.slot, actual_mu)
        return settlement.state()


class Settlement:
    """A tenant's state while a batch of reservations is settled at ``now``, one after
    another. Mutable, so that settling N usage records builds one :class:`TenantState`
    instead of N; the arithmetic is the same record by record, in the same order."""

    def __init__(self, state: TenantState, config: TenantConfig | None, now: float) -> None:
        self._state = state
        self._burst = config.burst_mu if config is not None else math.inf
        self._first_slot = _first_slot(now)
        self._second = math.floor(now)
        self.tokens = state.tokens
        self.reserved_umu = state.reserved_umu
        self.actual_mu = state.actual_mu
        self.pending = state.pending
        self.window = dict(state.window)

    def reconcile(self, reserved_mu: float, slot: int, actual_mu: float) -> None:
        self.reconcile_many(((reserved_mu, slot, actual_mu),))

    def reconcile_many(self, settled: Iterable[tuple[float, int, float]]) -> None:
        """Settle reservations (MU reserved, second charged in, actual MU), in order."""
        burst, first_slot, second = self._burst, self._first_slot, self._second
        tokens, reserved_umu, actual_total = self.tokens, self.reserved_umu, self.actual_mu
        pending, window = self.pending, self.window
        for reserved_mu, slot, actual_mu in settled:
            delta = actual_mu - reserved_mu
            tokens = min(burst, tokens - delta)
            # The difference belongs to the second the request was admitted in, so the
            # window counts actual MU by admission time. Once that second has left the
            # window, a refund has nothing left to lower and a charge lands now.
            if slot < first_slot:
                slot = second if delta > 0 else -1
            reserved_umu -= round(reserved_mu * UMU)
            actual_total += actual_mu
            if pending > 0:
                pending -= 1
            if slot >= 0:
                window[slot] = max(0.0, window.get(slot, 0.0) + delta)
        self.tokens, self.reserved_umu, self.actual_mu = tokens, reserved_umu, actual_total
        self.pending = pending

    def state(self, **update: object) -> TenantState:
        """The settled state, with ``update`` (other fields) applied as well."""
        return self._state.model_copy(update={
            "tokens": self.tokens, "reserved_umu": self.reserved_umu,
            "actual_mu": self.actual_mu, "pending": self.pending, "window": self.window,
            **update})


def _add(window: dict[int, float], slot: int, mu: float) -> dict[int, float]:
    return {**window, slot: max(0.0, window.get(slot, 0.0) + mu)}
