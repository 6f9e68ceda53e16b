"""Demand aggregation, pure: admitted, throttled and answered MU plus heartbeats -> windows."""

import pytest

from agents.demand import DemandAggregator, RateSeries
from tests.builders import make_heartbeat

T0 = 1_000.0  # s


def agg(**kw) -> DemandAggregator:  # type: ignore[no-untyped-def]
    return DemandAggregator(["tiny-llama"], stable_s=60.0, panic_s=6.0, beat_timeout_s=5.0,
                            **kw)


def test_rate_series_sums_only_the_span_and_prunes_old_seconds() -> None:
    s = RateSeries(keep_s=10)
    s.add(101.2, 1.0)
    s.add(105.9, 2.0)
    s.add(104.0, 4.0)  # out of order by a second: still counted
    assert s.total(106.0, 6.0) == 7.0
    assert s.total(106.0, 2.0) == 2.0  # (104, 106]
    s.add(200.0, 1.0)  # moves the horizon: everything before 190 is gone
    assert s.total(200.0, 200.0) == 1.0


def test_window_admitted_plus_throttled_over_stable_and_panic_windows() -> None:
    a = agg()
    for i in range(60):  # 1 MU/s for a minute, admitted
        a.admitted("tiny-llama", f"r{i}", 1.0, T0 + i)
    for i in range(5):  # plus 5 MU/s throttled in the last 5 s
        a.throttled("tiny-llama", "over_capacity", 5.0, T0 + 55 + i)
    a.throttled("tiny-llama", "unauthenticated", 100.0, T0 + 59)  # not demand
    w = a.window("tiny-llama", T0 + 59.5)
    assert w.demand_stable_mu_per_min == pytest.approx(60 + 25)  # 85 MU in 60 s
    assert w.demand_panic_mu_per_min == pytest.approx((6 + 25) * 10)  # 31 MU in 6 s


def test_window_answers_free_outstanding_and_count_as_served() -> None:
    a = agg()
    for i in range(10):
        a.admitted("tiny-llama", f"r{i}", 2.0, T0)
    for i in range(4):
        a.answered(f"r{i}", T0 + 3)
    a.answered("never-admitted", T0 + 3)  # ignored
    a.heartbeat(make_heartbeat(worker="w-1", in_flight=4, queued=2, in_flight_mu=8.0,
                               sent_at=T0 + 3.5))
    w = a.window("tiny-llama", T0 + 4)
    assert w.in_flight_mu_per_min == pytest.approx(8.0 * 60 / 6)  # 8 MU served in 6 s
    # 12 MU outstanding, 4 of them running on the engine (2 of 4 held requests run).
    assert w.backlog_mu == pytest.approx(8.0)


def test_answer_read_before_its_admission_is_not_outstanding() -> None:
    a = agg()
    a.answered("r1", T0 + 1)
    a.admitted("tiny-llama", "r1", 3.0, T0)
    w = a.window("tiny-llama", T0 + 2)
    assert w.backlog_mu == 0.0 and w.demand_stable_mu_per_min == pytest.approx(3.0)
    assert w.in_flight_mu_per_min == pytest.approx(30.0)


def test_redelivered_admission_counts_once() -> None:
    a = agg()
    a.admitted("tiny-llama", "r1", 3.0, T0)
    a.admitted("tiny-llama", "r1", 3.0, T0 + 1)
    assert a.window("tiny-llama", T0 + 2).demand_stable_mu_per_min == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("beats", "asked", "ready", "starting"),
    [
        pytest.param([("w-1", "ready", 0.0), ("w-2", "ready", 0.0)], None, 2, 0, id="two-ready"),
        pytest.param([("w-1", "ready", 0.0), ("w-2", "starting", 0.0)], None, 1, 1,
                     id="starting-is-not-capacity"),
        pytest.param([("w-1", "ready", 0.0), ("w-2", "ready", -20.0)], None, 1, 0,
                     id="silent-worker-is-gone"),
        pytest.param([("w-1", "ready", 0.0), ("w-2", "draining", 0.0)], None, 1, 0,
                     id="draining-is-not-capacity"),
        pytest.param([("w-1", "ready", 0.0)], 3, 1, 2, id="asked-for-not-beating-yet-is-starting"),
        pytest.param([("w-1", "ready", 0.0), ("w-2", "ready", 0.0)], 1, 2, 0,
                     id="scaled-down-still-beating"),
    ],
)
def test_window_replicas_from_heartbeats(beats, asked, ready, starting) -> None:  # type: ignore[no-untyped-def]
    a = agg()
    for worker, state, dt in beats:
        a.heartbeat(make_heartbeat(worker=worker, engine_state=state, sent_at=T0 + dt))
    if asked is not None:
        a.asked("tiny-llama", asked, T0 - 1)
    w = a.window("tiny-llama", T0 + 1)
    assert (w.ready, w.starting) == (ready, starting)


def test_older_scale_decision_does_not_override_newer() -> None:
    a = agg()
    a.asked("tiny-llama", 3, T0)
    a.asked("tiny-llama", 1, T0 - 10)
    assert a.window("tiny-llama", T0).starting == 3


def test_youngest_ready_at_is_first_beat_of_each_ready_worker() -> None:
    a = agg()
    a.heartbeat(make_heartbeat(worker="w-1", sent_at=T0 - 1000))
    a.heartbeat(make_heartbeat(worker="w-1", sent_at=T0))
    a.heartbeat(make_heartbeat(worker="w-2", sent_at=T0 - 30))
    a.heartbeat(make_heartbeat(worker="w-2", sent_at=T0))
    # w-1 was first seen 1000 s ago (beyond young_s = 600 s); w-2 30 s ago.
    assert a.window("tiny-llama", T0 + 1).youngest_ready_at == (T0 - 30,)


def test_unknown_model_is_ignored() -> None:
    a = agg()
    a.admitted("other", "r1", 5.0, T0)
    a.heartbeat(make_heartbeat(model="other", sent_at=T0))
    w = a.window("tiny-llama", T0 + 1)
    assert w.demand_stable_mu_per_min == 0.0 and w.ready == 0


def test_reader_feeds_routed_rejected_answered_beats_and_decisions() -> None:
    from agents.autoscaler import DemandReader
    from schemas.events import Rejection, ScaleDecision
    from streams.codec import encode
    from tests.builders import make_request, make_result

    a = agg()
    reader = DemandReader(a)
    routed = encode(make_request(request_id="r1"))
    reader.feed("tw.shard.tiny-llama", routed, [("tw-reserved-mu", b"2.5")], int(T0 * 1000))
    reader.feed("tw.shard.tiny-llama", routed.replace(b"r1", b"r2"), [], int(T0 * 1000))
    reader.feed("tw.shard.tiny-llama", b"{not json", [("tw-reserved-mu", b"1")], int(T0 * 1000))
    reader.feed("tw.responses", encode(Rejection(
        request_id="r3", tenant="acme", model="tiny-llama", reason="over_capacity",
        model_units=1.5, rejected_at=T0)), [], 0)
    reader.feed("tw.responses", encode(make_result(request_id="r1", completed_at=T0 + 1)), [], 0)
    reader.feed("tw.heartbeats", encode(make_heartbeat(sent_at=T0 + 1)), [], 0)
    reader.feed("tw.scale", encode(ScaleDecision(model="tiny-llama", current=1, desired=3,
                                                 reason="t", decided_at=T0)), [], 0)
    w = a.window("tiny-llama", T0 + 2)
    # 2.5 admitted (r2 had no reservation header, the bad record is skipped) + 1.5 throttled.
    assert w.demand_stable_mu_per_min == pytest.approx(4.0)
    assert w.in_flight_mu_per_min == pytest.approx(2.5 * 10) and w.backlog_mu == 0.0
    assert (w.ready, w.starting) == (1, 2)
