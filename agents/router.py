"""Cost-aware shard routing with sticky sessions. Pure.

Load of a shard is the MU routed to it and not yet completed (in flight
plus routed-not-started). Requests with a session key use consistent
hashing with bounded loads: walk the ring from the key's point to the first
shard whose load, with this request, stays within ``balance × mean``;
requests without one go to the least-loaded shard. Only shards owned by a
worker whose heartbeat is fresh and whose engine is ready are candidates.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict

from schemas.events import WorkerHeartbeat


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class Route(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: str
    shard: int
    sticky: bool  # the session's ring owner was within the load bound


class _Owner(BaseModel):
    worker: str
    seen_at: float  # epoch s of the worker's last heartbeat
    ready: bool
    capacity_mu_per_min: float


class ShardRouter:
    def __init__(self, *, balance: float = 1.25, vnodes: int = 64,
                 heartbeat_timeout_s: float = 5.0) -> None:
        self.balance = balance
        self._vnodes = vnodes
        self._timeout = heartbeat_timeout_s
        self._owners: dict[tuple[str, int], _Owner] = {}  # (model, shard) -> owner
        self._workers: dict[str, tuple[str, list[int]]] = {}  # worker -> (model, shards)
        self._excluded: set[str] = set()  # workers the health agent took out
        self.load: dict[tuple[str, int], float] = {}  # (model, shard) -> MU outstanding
        self._outstanding: dict[str, tuple[str, int, float]] = {}  # request -> route, MU
        self._rings: dict[tuple[str, frozenset[int]], tuple[list[int], list[int]]] = {}

    # -- fleet view -----------------------------------------------------------
    def observe(self, beat: WorkerHeartbeat, now: float) -> None:
        previous = self._workers.get(beat.worker)
        if previous is not None:
            for shard in set(previous[1]) - set(beat.shards):
                owner = self._owners.get((previous[0], shard))
                if owner is not None and owner.worker == beat.worker:
                    del self._owners[(previous[0], shard)]
        self._workers[beat.worker] = (beat.model, list(beat.shards))
        for shard in beat.shards:
            self._owners[(beat.model, shard)] = _Owner(
                worker=beat.worker, seen_at=min(now, beat.sent_at) if beat.sent_at else now,
                ready=beat.engine_state == "ready",
                capacity_mu_per_min=beat.capacity_mu_per_min)

    def exclude(self, worker: str, excluded: bool = True) -> None:
        (self._excluded.add if excluded else self._excluded.discard)(worker)

    def healthy_shards(self, model: str, now: float) -> list[int]:
        return sorted(shard for (m, shard), o in self._owners.items()
                      if m == model and o.ready and now - o.seen_at <= self._timeout
                      and o.worker not in self._excluded)

    def live_capacity(self, now: float) -> float:
        """MU/min of every worker with at least one healthy shard."""
        workers: dict[str, float] = {}
        for o in self._owners.values():
            if o.ready and now - o.seen_at <= self._timeout and o.worker not in self._excluded:
                workers[o.worker] = o.capacity_mu_per_min
        return sum(workers.values())

    # -- routing --------------------------------------------------------------
    def route(self, model: str, session_key: str | None, now: float,
              cost_mu: float = 0.0) -> Route | None:
        shards = self.healthy_shards(model, now)
        if not shards:
            return None
        return self.choose(model, shards, session_key, cost_mu)

    def choose(self, model: str, shards: list[int], session_key: str | None,
               cost_mu: float) -> Route:
        loads = [self.load.get((model, s), 0.0) for s in shards]
        if session_key is None:
            best = min(range(len(shards)), key=lambda i: (loads[i], shards[i]))
            return Route(model=model, shard=shards[best], sticky=False)
        bound = self.balance * (sum(loads) + cost_mu) / len(shards)
        points, owners = self._ring(model, shards)
        start = bisect.bisect(points, _point(session_key)) % len(points)
        first = owners[start]
        for step in range(len(points)):
            shard = owners[(start + step) % len(points)]
            if self.load.get((model, shard), 0.0) + cost_mu <= bound:
                return Route(model=model, shard=shard, sticky=shard == first)
        return Route(model=model, shard=first, sticky=True)  # every shard at the bound

    def _ring(self, model: str, shards: Iterable[int]) -> tuple[list[int], list[int]]:
        key = (model, frozenset(shards))
        ring = self._rings.get(key)
        if ring is None:
            pairs = sorted((_point(f"{model}/{s}/{v}"), s) for s in key[1]
                           for v in range(self._vnodes))
            ring = self._rings[key] = ([p for p, _ in pairs], [s for _, s in pairs])
            if len(self._rings) > 256:  # membership churn: keep the cache bounded
                self._rings = {key: ring}
        return ring

    # -- load accounting ------------------------------------------------------
    def routed(self, request_id: str, route: Route, cost_mu: float) -> None:
        key = (route.model, route.shard)
        self.load[key] = self.load.get(key, 0.0) + cost_mu
        self._outstanding[request_id] = (route.model, route.shard, cost_mu)

    def completed(self, request_id: str) -> None:
        self.completed_many((request_id,))

    def completed_many(self, request_ids: Iterable[str]) -> None:
        pop, load = self._outstanding.pop, self.load
        for request_id in request_ids:
            found = pop(request_id, None)
            if found is not None:
                model, shard, cost_mu = found
                key = (model, shard)
                load[key] = max(0.0, load.get(key, 0.0) - cost_mu)
