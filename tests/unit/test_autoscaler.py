"""The autoscaler's pure parts: its [scaling] config and which decisions go out."""

import pytest

from agents.autoscaler import AutoscalerConfig, ScaleLoop, load_autoscaler_config
from agents.scaling import DemandWindow, ScalingConfig, ScalingPolicy, ScalingState
from schemas.errors import ConfigError
from tests.builders import make_config

C = 600.0  # MU/min per replica


def window(at: float, stable: float, *, ready: int = 1, starting: int = 0) -> DemandWindow:
    return DemandWindow(model="m", at=at, demand_stable_mu_per_min=stable,
                        demand_panic_mu_per_min=stable, in_flight_mu_per_min=0.0,
                        ready=ready, starting=starting)


def loop(resend_s: float = 30.0) -> ScaleLoop:
    cfg = AutoscalerConfig(policy={"stabilisation_s": 20, "startup_s": 5, "min_lifetime_s": 5,
                                   "panic_s": 2})
    return ScaleLoop(lambda m: cfg.scaling(m, C), resend_s=resend_s)


def test_config_per_model_overrides_policy_over_defaults() -> None:
    cfg = load_autoscaler_config(make_config(scaling={
        "tick_s": 1, "policy": {"stabilisation_s": 30, "max_replicas": 8},
        "models": {"tiny-llama": {"max_replicas": 3, "capacity_mu_per_min": 100}}}))
    s = cfg.scaling("tiny-llama", C)
    assert (cfg.tick_s, s.stabilisation_s, s.max_replicas, s.capacity_mu_per_min) == (
        1.0, 30.0, 3, 100.0)
    other = cfg.scaling("other", C)
    assert (other.max_replicas, other.capacity_mu_per_min, other.startup_s) == (8, C, 60.0)


@pytest.mark.parametrize("scaling", [
    pytest.param({"policy": {"stabilisation": 30}}, id="unknown-policy-field"),
    pytest.param({"models": {"m": {"max_replicas": 0}}}, id="bad-model-value"),
    pytest.param({"tick": 1}, id="unknown-section-field"),
])
def test_config_invalid_raises_config_error(scaling) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError):
        load_autoscaler_config(make_config(scaling=scaling))


def test_scale_loop_same_decisions_as_policy_and_publishes_changes() -> None:
    sl = loop(resend_s=0)
    cfg = AutoscalerConfig(policy={"stabilisation_s": 20, "startup_s": 5, "min_lifetime_s": 5,
                                   "panic_s": 2}).scaling("m", C)
    policy, state = ScalingPolicy(cfg), ScalingState()
    windows = [window(t, 300.0) for t in range(0, 10, 2)]  # steady at one replica
    windows += [window(10, 1500.0), window(12, 1500.0, ready=1, starting=3)]  # burst
    published = []
    for w in windows:
        state, expected = policy.decide(state, w)
        got = sl.step(w)
        if got is not None:
            assert got == expected
            published.append((w.at, got.desired))
    # The first window, and the one that asked for more; steady windows are not re-sent.
    assert published == [(0, 1), (10, 4)]


def test_scale_loop_resends_an_unchanged_decision_every_resend_s() -> None:
    sl = loop(resend_s=10)
    sent = [w.at for w in (window(t, 300.0) for t in range(0, 31, 2)) if sl.step(w)]
    assert sent == [0, 10, 20, 30]


def test_scale_loop_replayed_windows_rebuild_state_without_publishing() -> None:
    history = [window(t, 1500.0 if t < 20 else 100.0, ready=4 if t >= 10 else 1)
               for t in range(0, 40, 2)]
    straight, restarted = loop(), loop()
    policy_says = {}
    for w in history:
        straight.step(w)
        policy_says[w.at] = straight.states["m"]
    assert all(restarted.step(w, publish=False) is None for w in history[:12])
    assert restarted.states["m"] == policy_says[history[11].at]
    resumed = [d for d in (restarted.step(w) for w in history[12:]) if d is not None]
    # After a restart the first window goes out (the actuator may have missed it).
    assert resumed and resumed[0].decided_at == history[12].at
    assert restarted.states["m"] == straight.states["m"]


def test_scaling_config_defaults_match_policy_defaults() -> None:
    assert AutoscalerConfig().scaling("m", C) == ScalingConfig(capacity_mu_per_min=C)
