"""Demand per model from the streams, as :class:`agents.scaling.DemandWindow`. Pure, no I/O.

The autoscaler agent feeds a :class:`DemandAggregator` what it reads and asks it
for one window per model every tick:

- **admitted** MU: every record routed to ``tw.shard.<model>``, at the MU admission
  reserved for it (header ``tw-reserved-mu``), at the record's timestamp;
- **throttled** MU: every :class:`Rejection` with reason ``rate_limited`` or
  ``over_capacity`` (its ``model_units``, the admission estimate), at ``rejected_at``;
- **answered**: an :class:`InferenceResult` for an admitted request frees its MU
  (no longer outstanding) and counts it as served at ``completed_at``;
- **heartbeats**: per worker its engine state, MU held, requests queued and capacity.
  A worker without a beat for ``beat_timeout_s`` is gone. Only ``ready`` workers are
  capacity; ``starting`` ones and replicas asked for but not beating yet are
  ``starting`` (see :meth:`DemandAggregator.asked`).

Demand = admitted + throttled (what clients asked for, not only what got in), as a
rate over a stable window and a short panic window. ``in_flight_mu_per_min`` is the
MU/min answered over the panic window (what the fleet serves now, as in the trace
simulator); backlog is outstanding MU not yet running on an engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from agents.scaling import DemandWindow
from schemas.events import WorkerHeartbeat

THROTTLED_REASONS = frozenset({"rate_limited", "over_capacity"})
EARLY_TTL_S = 60.0  # s an answer waits for its admission record to be read


class RateSeries:
    """MU per whole second; sums over recent spans. Accepts slightly out-of-order events."""

    def __init__(self, keep_s: float) -> None:
        self._keep_s = keep_s  # s of history kept
        self._by_s: dict[int, float] = {}  # epoch second -> MU
        self._newest = -math.inf

    def add(self, at: float, mu: float) -> None:
        second = math.floor(at)
        if second < self._newest - self._keep_s:
            return  # older than anything a window still looks at
        self._by_s[second] = self._by_s.get(second, 0.0) + mu
        if second > self._newest:
            self._newest = second
            self._prune()

    def _prune(self) -> None:
        oldest = self._newest - self._keep_s
        for second in [s for s in self._by_s if s < oldest]:
            del self._by_s[second]

    def total(self, now: float, span_s: float) -> float:
        """MU in the seconds (now − span_s, now]."""
        lo, hi = math.floor(now - span_s), math.floor(now)
        return sum(mu for s, mu in self._by_s.items() if lo < s <= hi)

    def per_min(self, now: float, span_s: float) -> float:
        return self.total(now, span_s) * 60.0 / span_s  # MU/min


@dataclass
class WorkerView:
    model: str
    state: str  # engine_state of the last beat
    in_flight: int  # requests held (running or queued in the engine)
    in_flight_mu: float  # MU held
    queued: int  # requests held but waiting inside the engine
    last_beat_at: float  # s, sent_at of the last beat
    first_seen_at: float  # s, sent_at of the first beat seen

    def running_mu(self) -> float:
        """MU of the requests actually running (held MU prorated by requests)."""
        if self.in_flight <= 0:
            return 0.0
        return self.in_flight_mu * max(0, self.in_flight - self.queued) / self.in_flight


class _ModelDemand:
    def __init__(self, keep_s: float) -> None:
        self.demand = RateSeries(keep_s)  # admitted + throttled MU
        self.served = RateSeries(keep_s)  # MU answered
        self.outstanding_mu = 0.0  # admitted, not answered
        self.asked: int | None = None  # replicas, from the latest ScaleDecision
        self.asked_at = -math.inf  # s, its decided_at


class DemandAggregator:
    def __init__(self, models: list[str], *, stable_s: float = 60.0, panic_s: float = 6.0,
                 beat_timeout_s: float = 5.0, young_s: float = 600.0,
                 outstanding_ttl_s: float = 600.0) -> None:
        self.stable_s = stable_s  # s, long window
        self.panic_s = panic_s  # s, short window
        self.beat_timeout_s = beat_timeout_s  # s without a beat: the worker is gone
        self.young_s = young_s  # s, ready workers younger than this are reported
        self.outstanding_ttl_s = outstanding_ttl_s  # s, an unanswered request is forgotten
        keep = max(stable_s, panic_s) + 2.0
        self._models = {m: _ModelDemand(keep) for m in models}
        self._workers: dict[str, WorkerView] = {}
        # request id -> (model, MU, admitted at s); insertion order is admission order.
        self._outstanding: dict[str, tuple[str, float, float]] = {}
        # Answers read before their admission (different topics, no order between them):
        # request id -> answered at s, so that the admission read later is not outstanding.
        self._early: dict[str, float] = {}

    @property
    def models(self) -> list[str]:
        return list(self._models)

    def admitted(self, model: str, request_id: str, mu: float, at: float) -> None:
        md = self._models.get(model)
        if md is None or not math.isfinite(mu) or mu < 0:
            return
        if request_id in self._outstanding:
            return  # a redelivered route (admission replay): counted once
        md.demand.add(at, mu)
        answered_at = self._early.pop(request_id, None)
        if answered_at is not None:
            md.served.add(answered_at, mu)
            return
        md.outstanding_mu += mu
        self._outstanding[request_id] = (model, mu, at)

    def throttled(self, model: str, reason: str, mu: float | None, at: float) -> None:
        md = self._models.get(model)
        if md is None or reason not in THROTTLED_REASONS or mu is None:
            return
        md.demand.add(at, mu)

    def answered(self, request_id: str, at: float) -> None:
        entry = self._outstanding.pop(request_id, None)
        if entry is None:
            # Answered twice, admitted before we started reading, or its admission is
            # still to be read: remembered for a while in case it is the last.
            self._early[request_id] = at
            return
        model, mu, _ = entry
        md = self._models[model]
        md.outstanding_mu = max(0.0, md.outstanding_mu - mu)
        md.served.add(at, mu)

    def heartbeat(self, beat: WorkerHeartbeat) -> None:
        if beat.model not in self._models:
            return
        view = self._workers.get(beat.worker)
        if view is not None and beat.sent_at < view.last_beat_at:
            return  # an older beat read late
        first = view.first_seen_at if view is not None else beat.sent_at
        self._workers[beat.worker] = WorkerView(
            model=beat.model, state=beat.engine_state, in_flight=beat.in_flight,
            in_flight_mu=beat.in_flight_mu, queued=beat.queued, last_beat_at=beat.sent_at,
            first_seen_at=first)

    def asked(self, model: str, desired: int, decided_at: float) -> None:
        """The latest ScaleDecision: replicas asked for and not beating yet are ``starting``."""
        md = self._models.get(model)
        if md is not None and decided_at >= md.asked_at:
            md.asked, md.asked_at = desired, decided_at

    def _expire(self, now: float) -> None:
        for worker in [w for w, v in self._workers.items()
                       if v.last_beat_at < now - 10 * self.beat_timeout_s]:
            del self._workers[worker]
        for request_id in [r for r, at in self._early.items() if at < now - EARLY_TTL_S]:
            del self._early[request_id]
        while self._outstanding:
            request_id, (model, mu, at) = next(iter(self._outstanding.items()))
            if at >= now - self.outstanding_ttl_s:
                break
            del self._outstanding[request_id]  # lost: never answered
            md = self._models[model]
            md.outstanding_mu = max(0.0, md.outstanding_mu - mu)

    def live_workers(self, model: str, now: float) -> list[tuple[str, WorkerView]]:
        return [(w, v) for w, v in self._workers.items()
                if v.model == model and v.last_beat_at >= now - self.beat_timeout_s]

    def window(self, model: str, now: float) -> DemandWindow:
        self._expire(now)
        md = self._models[model]
        live = [v for _, v in self.live_workers(model, now)]
        ready = [v for v in live if v.state == "ready"]
        booting = sum(1 for v in live if v.state == "starting")
        starting = booting if md.asked is None else max(booting, md.asked - len(ready))
        running = sum(v.running_mu() for v in live)
        return DemandWindow(
            model=model, at=now,
            demand_stable_mu_per_min=md.demand.per_min(now, self.stable_s),
            demand_panic_mu_per_min=md.demand.per_min(now, self.panic_s),
            in_flight_mu_per_min=md.served.per_min(now, self.panic_s),
            backlog_mu=max(0.0, md.outstanding_mu - running),
            ready=len(ready), starting=max(0, starting),
            youngest_ready_at=tuple(sorted(v.first_seen_at for v in ready
                                           if v.first_seen_at > now - self.young_s)))
