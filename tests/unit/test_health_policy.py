"""The health state machine (agents/health.py): scenarios of beats over time, verdicts out."""

from __future__ import annotations

from typing import Any

import pytest

from agents.health import HealthConfig, HealthTracker
from schemas.events import HealthEvent, ProbeResult
from tests.builders import make_heartbeat

T0 = 1000.0


class Fleet:
    """One worker beating once a second from T0; collects the transitions."""

    def __init__(self, config: HealthConfig | None = None) -> None:
        self.tracker = HealthTracker(config)
        self.events: list[HealthEvent] = []
        self.seq = 0

    def beat(self, at: float, worker: str = "w-1", **fields: Any) -> None:
        self.seq += 1
        fields = {"seq": self.seq, **fields}
        self.events += self.tracker.observe(make_heartbeat(worker=worker, sent_at=at, **fields), at)

    def tick(self, at: float) -> None:
        self.events += self.tracker.tick(at)

    def run(self, start: float, end: float, **fields: Any) -> None:
        """Beat every second in [start, end) with ``fields``, ticking in between."""
        t = start
        while t < end:
            self.beat(t, **fields)
            self.tick(t + 0.5)
            t += 1.0

    def states(self) -> list[str]:
        return [e.state for e in self.events]


def probe(at: float, ok: bool = True, latency_s: float = 0.01) -> ProbeResult:
    return ProbeResult(ok=ok, latency_s=latency_s, at=at, error=None if ok else "timeout")


def test_health_first_beat_is_healthy_with_no_previous_state() -> None:
    fleet = Fleet()
    fleet.beat(T0, in_flight=3, tokens_since_last=40)
    assert [(e.previous, e.state, e.worker) for e in fleet.events] == [(None, "healthy", "w-1")]


def test_health_busy_worker_making_tokens_stays_healthy() -> None:
    fleet = Fleet()
    fleet.run(T0, T0 + 60, in_flight=64, tokens_since_last=500)
    assert fleet.states() == ["healthy"]


def test_health_silent_hang_goes_suspect_then_unhealthy_within_the_stall_thresholds() -> None:
    fleet = Fleet()
    fleet.run(T0, T0 + 10, in_flight=8, tokens_since_last=100)
    fleet.run(T0 + 10, T0 + 20, in_flight=8, tokens_since_last=0)  # hung at T0 + 9.x
    assert fleet.states() == ["healthy", "suspect", "unhealthy"]
    suspect, unhealthy = fleet.events[1], fleet.events[2]
    # The last beat with tokens was sent at T0 + 9: stall ≥ 3 s at T0 + 12, ≥ 5 s at T0 + 14.
    assert suspect.at == T0 + 12 and unhealthy.at == T0 + 14
    assert "silent hang" in unhealthy.reason and unhealthy.previous == "suspect"


def test_health_requests_held_upstream_of_a_working_engine_are_no_hang() -> None:
    # In flight, no token (the requests wait on image preprocessing), but the probes succeed.
    fleet = Fleet()
    for i in range(30):
        at = T0 + i
        fleet.beat(at, in_flight=4, tokens_since_last=0, probe=probe(at - 0.5) if i % 2 else None)
        fleet.tick(at + 0.5)
    assert "unhealthy" not in fleet.states()


@pytest.mark.parametrize("failures,expected", [
    pytest.param(1, ["healthy", "suspect"], id="one-failed-probe-suspect"),
    pytest.param(2, ["healthy", "suspect", "unhealthy"], id="two-failed-probes-unhealthy"),
])
def test_health_failed_probes_count_once_each(failures: int, expected: list[str]) -> None:
    fleet = Fleet()
    fleet.beat(T0)
    for i in range(failures):
        # Every beat repeats the latest probe: only a new ``at`` counts.
        for repeat in range(3):
            fleet.beat(T0 + 1 + 3 * i + repeat, probe=probe(T0 + 1 + 3 * i, ok=False))
    assert fleet.states() == expected


def test_health_slow_probes_count_as_failed() -> None:
    fleet = Fleet(HealthConfig(probe_slow_s=1.0))
    fleet.beat(T0)
    fleet.beat(T0 + 1, probe=probe(T0 + 0.9, latency_s=2.5))
    fleet.beat(T0 + 2, probe=probe(T0 + 1.9, latency_s=2.5))
    assert fleet.states() == ["healthy", "suspect", "unhealthy"]


def test_health_missed_heartbeats_suspect_then_unhealthy_on_ticks() -> None:
    fleet = Fleet()
    fleet.beat(T0)
    for t in range(1, 10):
        fleet.tick(T0 + t)
    assert [(e.state, e.at) for e in fleet.events[1:]] == [("suspect", T0 + 3),
                                                           ("unhealthy", T0 + 8)]


def test_health_engine_reporting_failed_is_unhealthy_at_once() -> None:
    fleet = Fleet()
    fleet.beat(T0)
    fleet.beat(T0 + 1, engine_state="failed")
    assert fleet.states() == ["healthy", "unhealthy"]


def test_health_unhealthy_sticks_until_work_is_done_after_the_verdict() -> None:
    fleet = Fleet()
    fleet.beat(T0)
    fleet.beat(T0 + 1, probe=probe(T0 + 0.5, ok=False))
    fleet.beat(T0 + 2, probe=probe(T0 + 1.5, ok=False))
    assert fleet.states()[-1] == "unhealthy"
    # Beats on time, in flight, but no token and no new probe: not back yet.
    fleet.run(T0 + 3, T0 + 6, in_flight=2, tokens_since_last=0, probe=probe(T0 + 1.5, ok=False))
    assert fleet.states()[-1] == "unhealthy"
    fleet.beat(T0 + 6, in_flight=2, tokens_since_last=0, probe=probe(T0 + 5.8))
    assert fleet.states()[-1] == "healthy"


def test_health_restarted_incarnation_starts_afresh_and_recovers() -> None:
    fleet = Fleet()
    fleet.run(T0, T0 + 3, in_flight=4, tokens_since_last=50)
    fleet.run(T0 + 3, T0 + 10, in_flight=4, tokens_since_last=0)
    assert fleet.states()[-1] == "unhealthy"
    fleet.seq = 0  # killed and respawned under the same worker id: seq starts again
    fleet.beat(T0 + 20, in_flight=0)
    assert fleet.states() == ["healthy", "suspect", "unhealthy", "healthy"]
    assert fleet.events[-1].previous == "unhealthy"


def test_health_replayed_beats_change_nothing() -> None:
    fleet = Fleet()
    fleet.beat(T0, seq=5)
    fleet.events += fleet.tracker.observe(make_heartbeat(seq=5, sent_at=T0), T0 + 1)
    fleet.events += fleet.tracker.observe(make_heartbeat(seq=4, sent_at=T0 - 1), T0 + 1)
    assert fleet.states() == ["healthy"]


def test_health_drained_worker_is_forgotten_without_a_verdict() -> None:
    fleet = Fleet()
    fleet.beat(T0)
    fleet.beat(T0 + 1, engine_state="draining")
    for t in range(2, 30):
        fleet.tick(T0 + t)
    assert fleet.states() == ["healthy"] and fleet.tracker.workers() == {}


def test_health_workers_are_judged_apart() -> None:
    fleet = Fleet()
    for t in range(12):
        fleet.beat(T0 + t, worker="busy", in_flight=4, tokens_since_last=10)
        fleet.beat(T0 + t, worker="hung", in_flight=4, tokens_since_last=0 if t > 2 else 10)
        fleet.tick(T0 + t + 0.5)
    assert fleet.tracker.workers() == {"busy": "healthy", "hung": "unhealthy"}


@pytest.mark.parametrize("fields", [
    pytest.param({"stall_suspect_s": 6.0, "stall_unhealthy_s": 5.0}, id="stall-inverted"),
    pytest.param({"probe_failures_suspect": 3}, id="probes-inverted"),
    pytest.param({"forget_after_s": 1.0}, id="forget-before-unhealthy"),
    pytest.param({"silence_unhealthy_s": 0.0}, id="zero-seconds"),
])
def test_health_config_rejects_inconsistent_thresholds(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        HealthConfig(**fields)
