"""The scaling policy, pure: windows in, ScaleDecisions out."""

import pytest

from agents.scaling import DemandWindow, ScalingConfig, ScalingPolicy, ScalingState, agent_decide

C = 240.0  # MU/min per replica
CFG = ScalingConfig(capacity_mu_per_min=C, target_utilisation=0.5, stabilisation_s=300,
                    min_lifetime_s=60, startup_s=60, panic_s=6, panic_threshold=1.5,
                    min_replicas=1, max_replicas=20)


def window(at: float, stable: float, panic: float | None = None, *, ready: int = 2,
           starting: int = 0, backlog: float = 0.0, young: tuple[float, ...] = ()
           ) -> DemandWindow:
    return DemandWindow(model="m", at=at, demand_stable_mu_per_min=stable,
                        demand_panic_mu_per_min=stable if panic is None else panic,
                        in_flight_mu_per_min=min(stable, ready * C), backlog_mu=backlog,
                        ready=ready, starting=starting, youngest_ready_at=young)


def run(windows: list[DemandWindow], cfg: ScalingConfig = CFG) -> list[int]:
    policy, state, out = ScalingPolicy(cfg), ScalingState(), []
    for w in windows:
        state, d = policy.decide(state, w)
        out.append(d.desired)
    return out


@pytest.mark.parametrize(
    ("stable", "ready", "expected"),
    [
        pytest.param(240.0, 2, 2, id="at-target-holds"),
        pytest.param(1200.0, 2, 10, id="demand-jump-several-at-once"),
        pytest.param(5000.0, 2, 20, id="capped-at-max-replicas"),
    ],
)
def test_scale_up_is_immediate(stable: float, ready: int, expected: int) -> None:
    assert run([window(0, stable, ready=ready)])[-1] == expected


def test_scale_down_waits_for_stabilisation_window() -> None:
    ws = [window(t, 1200.0, ready=10) for t in range(0, 400, 2)]
    ws += [window(t, 120.0, ready=10) for t in range(400, 1000, 2)]
    desired = run(ws)
    drop = next(i for i, d in enumerate(desired) if d < 10)
    assert ws[drop].at >= 400 + CFG.stabilisation_s - 2
    assert desired[-1] == 1


def test_no_flapping_on_oscillating_demand() -> None:
    ws = [window(t, 1200.0 if (t // 60) % 2 == 0 else 240.0, ready=10)
          for t in range(0, 1200, 2)]
    assert set(run(ws)[len(ws) // 2:]) == {10}


def test_one_second_burst_does_not_panic() -> None:
    ws = [window(t, 240.0, ready=2) for t in range(0, 20, 2)]
    ws.append(window(20, 240.0, panic=5000.0, ready=2))
    ws.append(window(22, 240.0, ready=2))
    assert run(ws)[-2] == 2


def test_sustained_jump_panics_within_panic_window() -> None:
    ws = [window(t, 240.0, panic=2400.0, ready=2) for t in range(0, 10, 2)]
    policy, state = ScalingPolicy(CFG), ScalingState()
    for w in ws:
        state, d = policy.decide(state, w)
    assert d.desired == 20 and d.reason.startswith("panic")


def test_starting_replicas_are_not_asked_for_twice() -> None:
    d = run([window(0, 1200.0, ready=2, starting=8)])
    assert d == [10]


def test_just_started_replica_is_not_scaled_away() -> None:
    ws = [window(t, 1200.0, ready=10) for t in range(0, 400, 2)]
    ws += [window(t, 0.0, ready=10, young=(t - 10.0,) * 5) for t in range(400, 1000, 2)]
    assert min(run(ws)) >= 5


def test_backlog_that_live_capacity_drains_asks_for_nothing() -> None:
    # 2 replicas serve 480 MU/min; demand 240 ⇒ 4 MU/s spare ⇒ 200 MU gone in 50 s < start-up.
    assert run([window(0, 240.0, ready=2, backlog=200.0)]) == [2]
    assert run([window(0, 240.0, ready=2, backlog=2000.0)])[0] > 2


def test_trend_term_anticipates_rising_demand() -> None:
    ws = [window(t, 100.0 + 10.0 * t, ready=10) for t in range(0, 60, 2)]
    with_trend = run(ws, CFG.model_copy(update={"trend_weight": 1.0}))
    assert with_trend[-1] > run(ws)[-1]


def test_decision_is_idempotent_and_carries_figures() -> None:
    policy = ScalingPolicy(CFG)
    w = window(10.0, 1200.0, panic=1300.0, ready=2)
    _, a = policy.decide(ScalingState(), w)
    _, b = policy.decide(ScalingState(), w)
    assert a == b
    assert (a.model, a.current, a.demand_stable_mu_per_min, a.demand_panic_mu_per_min,
            a.decided_at) == ("m", 2, 1200.0, 1300.0, 10.0)
    assert a.utilisation == pytest.approx(480.0 / 480.0)


def test_agent_wrapper_matches_policy() -> None:
    ws = [window(t, 240.0 + 40.0 * (t % 50), ready=3) for t in range(0, 200, 2)]
    policy = ScalingPolicy(CFG)
    s1 = s2 = ScalingState()
    for w in ws:
        s1, d1 = policy.decide(s1, w)
        s2, d2 = agent_decide(policy, s2, w)
        assert d1 == d2
