"""Sharing live capacity between tenants. Pure.

Live capacity is the MU/min of healthy replicas. Reservations are held out
of it (admission within a reservation is the limiter's decision and never
asks the pool); the rest is shared by all other traffic. Each priority class may fill
only part of it (headroom is kept for higher classes). While the pool is
uncontended, requests are admitted; once contended, only tenants below
their fair share (shared capacity ÷ active tenants) are admitted, so no
tenant runs above its share while another waits.
"""

from __future__ import annotations

from collections import deque

from pydantic import BaseModel, ConfigDict

from schemas.events import Priority

# Share of the pool each class may fill; the rest is headroom for higher classes.
PRIORITY_HEADROOM: dict[str, float] = {"high": 1.0, "normal": 0.9, "low": 0.75}
# Below this share of its class's room the pool is uncontended and admits anyone;
# above it, only tenants under their fair share get in.
UNCONTENDED = 0.8


class SlidingSum:
    """Sum of values over the last ``window_s`` seconds, in ``step_s`` buckets."""

    def __init__(self, window_s: float = 60.0, step_s: float = 1.0) -> None:
        self.window_s = window_s
        self._step = step_s
        self._buckets: deque[tuple[int, float]] = deque()
        self._total = 0.0

    def _expire(self, now: float) -> None:
        oldest = int((now - self.window_s) // self._step)
        while self._buckets and self._buckets[0][0] <= oldest:
            self._total -= self._buckets.popleft()[1]

    def add(self, value: float, now: float) -> None:
        self._expire(now)
        slot = int(now // self._step)
        if self._buckets and self._buckets[-1][0] == slot:
            self._buckets[-1] = (slot, self._buckets[-1][1] + value)
        else:
            self._buckets.append((slot, value))
        self._total += value

    def total(self, now: float) -> float:
        self._expire(now)
        return self._total

    def seconds_until_below(self, limit: float, now: float) -> float:
        """How long until the sum drops to ``limit`` as buckets expire."""
        self._expire(now)
        total = self._total
        for slot, value in self._buckets:
            if total <= limit:
                break
            total -= value
            wait = (slot + 1) * self._step + self.window_s - now
            if total <= limit:
                return max(self._step, wait)
        return self._step if total <= limit else self.window_s


class PoolDecision(BaseModel):
    model_config = ConfigDict(frozen=True)

    admitted: bool
    reason: str = ""
    retry_after_s: float = 0.0


class CapacityPool:
    def __init__(self, window_s: float = 60.0) -> None:
        self._window_s = window_s
        self.capacity_mu_per_min = 0.0  # live: healthy replicas × C
        self.reserved_mu_per_min = 0.0
        self._shared = SlidingSum(window_s)
        self._by_tenant: dict[str, SlidingSum] = {}  # shared-pool use per tenant

    def set_capacity(self, capacity_mu_per_min: float, reserved_mu_per_min: float) -> None:
        self.capacity_mu_per_min = capacity_mu_per_min
        self.reserved_mu_per_min = reserved_mu_per_min

    def _window(self, per_min: float) -> float:
        return per_min * self._window_s / 60.0

    def _sum(self, table: dict[str, SlidingSum], tenant: str) -> SlidingSum:
        found = table.get(tenant)
        if found is None:
            found = table[tenant] = SlidingSum(self._window_s)
        return found

    def decide(self, tenant: str, priority: Priority, cost_mu: float, now: float
               ) -> PoolDecision:
        """Shared-pool admission; reservations are the limiter's and never reach here."""
        shared_cap = self._window(max(0.0, self.capacity_mu_per_min - self.reserved_mu_per_min))
        used = self._shared.total(now)
        class_cap = shared_cap * PRIORITY_HEADROOM[priority]
        if used + cost_mu <= class_cap * UNCONTENDED:
            return PoolDecision(admitted=True, reason="shared")
        active = [t for t, s in self._by_tenant.items() if s.total(now) > 0]
        if tenant not in active:
            active.append(tenant)
        fair = shared_cap / len(active)
        mine = self._sum(self._by_tenant, tenant)
        if mine.total(now) + cost_mu <= fair and used + cost_mu <= class_cap:
            return PoolDecision(admitted=True, reason="fair share")
        wait = mine.seconds_until_below(max(0.0, fair - cost_mu), now)
        return PoolDecision(admitted=False, retry_after_s=wait,
                            reason=f"shared capacity full ({used:.0f}/{shared_cap:.0f} MU "
                                   f"per {self._window_s:.0f}s; fair share {fair:.0f})")

    def record(self, tenant: str, cost_mu: float, now: float) -> None:
        self._shared.add(cost_mu, now)
        self._sum(self._by_tenant, tenant).add(cost_mu, now)
