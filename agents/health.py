"""Worker health verdicts from heartbeats: healthy -> suspect -> unhealthy. Pure, no I/O.

A worker's heartbeats come from a thread of their own (:mod:`workers.health`),
so a beat arriving says the process lives, not that it serves. Three signals,
each with a suspect and an unhealthy threshold (:class:`HealthConfig`):

- silence: no beat for a while (process dead, host or network gone);
- probes: consecutive failed or too slow end-to-end probes (a new result is
  told by its ``at``; every beat repeats the latest);
- stall: requests held (``in_flight > 0``) and no output token for a while,
  the silent hang, which needs no probe to wait for. A successful probe ends a
  stall: the engine works, and the held requests are upstream of it (image
  preprocessing).

An engine that reports itself failed is unhealthy at once. A verdict of
unhealthy sticks until the worker shows progress made after it (a token or a
successful probe): a flapping signal does not put a hung worker back into
routing. A new incarnation (its ``seq`` starts again: the process was
restarted under the same worker id) starts its signals afresh.

A worker whose last beat said ``draining`` left on purpose: once silent it is
forgotten without a verdict. Any worker silent for ``forget_after_s`` is
forgotten too.

:meth:`HealthTracker.observe` and :meth:`HealthTracker.tick` return the
transitions as :class:`schemas.events.HealthEvent` (the first verdict on a
worker has ``previous=None``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.events import HealthEvent, HealthState, WorkerHeartbeat

Seconds = Annotated[float, Field(gt=0)]


class HealthConfig(BaseModel):
    """Thresholds of the verdicts. Invalid values raise :class:`pydantic.ValidationError`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    silence_suspect_s: Seconds = 3.0  # s since the last beat was sent
    silence_unhealthy_s: Seconds = 8.0  # s
    probe_slow_s: Seconds = 2.0  # s; a successful probe slower than this counts as failed
    probe_failures_suspect: Annotated[int, Field(ge=1)] = 1  # consecutive probes
    probe_failures_unhealthy: Annotated[int, Field(ge=1)] = 2  # consecutive probes
    stall_suspect_s: Seconds = 3.0  # s with requests held and no token produced
    stall_unhealthy_s: Seconds = 5.0  # s
    forget_after_s: Seconds = 300.0  # s of silence before a worker is dropped

    @model_validator(mode="after")
    def _ordered(self) -> HealthConfig:
        for suspect, unhealthy in (("silence_suspect_s", "silence_unhealthy_s"),
                                   ("probe_failures_suspect", "probe_failures_unhealthy"),
                                   ("stall_suspect_s", "stall_unhealthy_s")):
            if getattr(self, suspect) > getattr(self, unhealthy):
                raise ValueError(f"{suspect} must not exceed {unhealthy}")
        if self.forget_after_s < self.silence_unhealthy_s:
            raise ValueError("forget_after_s must not be below silence_unhealthy_s")
        return self


@dataclass
class _Worker:
    model: str
    seq: int  # of the last beat
    beat_at: float  # epoch s the last beat was sent
    in_flight: int  # requests held at the last beat
    draining: bool
    progress_at: float  # epoch s of the last evidence of work: tokens, nothing held, probe ok
    probe_at: float | None = None  # ``at`` of the last probe result counted
    probe_failures: int = 0  # consecutive
    failed: bool = False  # the engine said so
    state: HealthState | None = None
    verdict_at: float = 0.0  # epoch s of the last transition to unhealthy


@dataclass(frozen=True)
class _Verdict:
    state: HealthState
    reason: str


class HealthTracker:
    """Per worker health from heartbeats and time (see the module doc)."""

    def __init__(self, config: HealthConfig | None = None) -> None:
        self.config = config or HealthConfig()
        self._workers: dict[str, _Worker] = {}

    def state(self, worker: str) -> HealthState | None:
        tracked = self._workers.get(worker)
        return None if tracked is None else tracked.state

    def workers(self) -> dict[str, HealthState | None]:
        return {name: w.state for name, w in self._workers.items()}

    # -- inputs ---------------------------------------------------------------------------
    def observe(self, beat: WorkerHeartbeat, now: float) -> list[HealthEvent]:
        """Take one beat (``now``: epoch s); the transition it causes, if any."""
        sent = min(now, beat.sent_at)  # a clock ahead of ours must not make beats fresher
        tracked = self._workers.get(beat.worker)
        if tracked is not None and beat.seq <= tracked.seq and sent <= tracked.beat_at:
            return []  # replayed or out of order
        if tracked is None or beat.seq < tracked.seq:
            # First sight, or a new incarnation: signals start afresh, the verdict stays.
            previous = tracked.state if tracked is not None else None
            verdict_at = tracked.verdict_at if tracked is not None else 0.0
            tracked = self._workers[beat.worker] = _Worker(
                model=beat.model, seq=beat.seq, beat_at=sent, in_flight=beat.in_flight,
                draining=False, progress_at=sent, state=previous, verdict_at=verdict_at)
        self._take(tracked, beat, sent)
        return self._judge(beat.worker, tracked, now)

    def tick(self, now: float) -> list[HealthEvent]:
        """Judge every worker at ``now`` (epoch s): silence shows only with time."""
        events: list[HealthEvent] = []
        for name, tracked in list(self._workers.items()):
            silent = now - tracked.beat_at
            if silent >= self.config.forget_after_s or (
                    tracked.draining and silent >= self.config.silence_suspect_s):
                del self._workers[name]
                continue
            events += self._judge(name, tracked, now)
        return events

    # -- internals ------------------------------------------------------------------------
    def _take(self, tracked: _Worker, beat: WorkerHeartbeat, sent: float) -> None:
        tracked.seq, tracked.beat_at, tracked.in_flight = beat.seq, sent, beat.in_flight
        tracked.model = beat.model
        tracked.draining = beat.engine_state == "draining"
        tracked.failed = beat.engine_state == "failed"
        if beat.tokens_since_last > 0 or beat.in_flight == 0:
            tracked.progress_at = sent
        probe = beat.probe
        if probe is None or (tracked.probe_at is not None and probe.at <= tracked.probe_at):
            return
        tracked.probe_at = probe.at
        if probe.ok and probe.latency_s <= self.config.probe_slow_s:
            tracked.probe_failures = 0
            tracked.progress_at = max(tracked.progress_at, min(probe.at, sent))
        else:
            tracked.probe_failures += 1

    def _verdict(self, tracked: _Worker, now: float) -> _Verdict:
        cfg = self.config
        silent = now - tracked.beat_at
        stalled = tracked.beat_at - tracked.progress_at if tracked.in_flight > 0 else 0.0
        if tracked.failed:
            return _Verdict("unhealthy", "engine reported failed")
        for level, silence_s, failures, stall_s in (
                ("unhealthy", cfg.silence_unhealthy_s, cfg.probe_failures_unhealthy,
                 cfg.stall_unhealthy_s),
                ("suspect", cfg.silence_suspect_s, cfg.probe_failures_suspect,
                 cfg.stall_suspect_s)):
            state: HealthState = "unhealthy" if level == "unhealthy" else "suspect"
            if silent >= silence_s:
                return _Verdict(state, f"no heartbeat for {silent:.1f}s")
            if tracked.probe_failures >= failures:
                return _Verdict(state, f"{tracked.probe_failures} probes in a row failed "
                                       f"or slower than {cfg.probe_slow_s:g}s")
            if stalled >= stall_s:
                return _Verdict(state, f"{tracked.in_flight} requests in flight and no token "
                                       f"for {stalled:.1f}s (silent hang)")
        return _Verdict("healthy", "heartbeats, probes and tokens on time")

    def _judge(self, name: str, tracked: _Worker, now: float) -> list[HealthEvent]:
        verdict = self._verdict(tracked, now)
        if (tracked.state == "unhealthy" and verdict.state != "unhealthy"
                and tracked.progress_at <= tracked.verdict_at):
            return []  # no work done since the verdict: still unhealthy
        if verdict.state == tracked.state:
            return []
        if verdict.state == "unhealthy":
            tracked.verdict_at = now
        event = HealthEvent(worker=name, model=tracked.model, previous=tracked.state,
                            state=verdict.state, reason=verdict.reason, at=now)
        tracked.state = verdict.state
        return [event]
