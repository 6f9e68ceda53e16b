"""Alert rules: each kind fires on a scenario that should trigger it and stays silent otherwise."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord

from agents.alerting import (
    DEFAULT_RULES_PATH,
    SCALING_MAX_REPLICAS,
    AlertEvaluator,
    AlertRulesError,
    AlertState,
    ConsumerLag,
    Observation,
    load_rules,
    parse_rules,
    with_scaling_maxima,
)
from agents.alerts_agent import AlertAgent, scaling_maxima
from agents.scaling import ScalingConfig
from schemas.config import Settings
from schemas.events import Alert, DeadLetter, HealthEvent, Rejection, ScaleDecision, Timings
from streams.sink import MemoryEventSink
from streams.topics import ALERTS, DLQ, HEALTH, RESPONSES
from tests.builders import make_result

T0 = 1_790_000_000.0

THROTTLED = """
[[rules]]
name = "throttled"
kind = "tenant_throttled"
max_fraction = 0.2
window_s = 60
min_replies = 20
"""
TTFT = """
[[rules]]
name = "ttft"
kind = "ttft_slo"
target_s = 2.0
window_s = 300
min_samples = 20
"""
LAG = """
[[rules]]
name = "lag"
kind = "consumer_lag"
max_lag = 1000
"""
UNHEALTHY = """
[[rules]]
name = "unhealthy"
kind = "worker_unhealthy"
cooldown_s = 60
"""
AT_MAX = """
[[rules]]
name = "at-max"
kind = "model_at_max_replicas"
max_replicas = 8
[rules.models]
big-model = 2
"""


def make_rejection(**overrides: Any) -> Rejection:
    fields: dict[str, Any] = {"request_id": "r-1", "tenant": "acme", "model": "tiny-llama",
                              "reason": "rate_limited"}
    fields.update(overrides)
    return Rejection(**fields)


def make_health(**overrides: Any) -> HealthEvent:
    fields: dict[str, Any] = {"worker": "w-1", "model": "tiny-llama", "previous": "suspect",
                              "state": "unhealthy", "reason": "no tokens for 10 s", "at": T0}
    fields.update(overrides)
    return HealthEvent(**fields)


def make_scale(**overrides: Any) -> ScaleDecision:
    fields: dict[str, Any] = {"model": "tiny-llama", "current": 4, "desired": 8,
                              "reason": "scale up", "decided_at": T0}
    fields.update(overrides)
    return ScaleDecision(**fields)


def replies(n: int, throttled: int, *, tenant: str = "acme") -> list[Observation]:
    """``n`` replies of one tenant, ``throttled`` of them throttling rejections, interleaved."""
    out: list[Observation] = []
    for i in range(n):
        if i * throttled // n != (i + 1) * throttled // n:
            out.append(make_rejection(request_id=f"r-{i}", tenant=tenant,
                                      reason="over_capacity" if i % 2 else "rate_limited"))
        else:
            out.append(make_result(request_id=f"r-{i}", tenant=tenant))
    return out


def results_with_ttft(values: list[float], **overrides: Any) -> list[Observation]:
    return [make_result(request_id=f"r-{i}", timings=Timings(queue_s=v / 2, ttft_s=v / 2),
                        **overrides) for i, v in enumerate(values)]


def run(rules: str, observations: list[Observation], *, spacing_s: float = 0.5,
        state: AlertState | None = None, start: float = T0) -> list[Alert]:
    evaluator = AlertEvaluator(parse_rules(rules))
    state = state or AlertState()
    fired: list[Alert] = []
    for i, obs in enumerate(observations):
        fired += evaluator.observe(state, obs, start + i * spacing_s)
    return fired


# --- tenant throttled -------------------------------------------------------------------

@pytest.mark.parametrize(("observations", "fires"), [
    pytest.param(replies(100, 30), True, id="30pct-of-100-over-50s-fires"),
    pytest.param(replies(100, 5), False, id="5pct-silent"),
    pytest.param(replies(100, 20), False, id="exactly-threshold-silent"),
    pytest.param(replies(10, 5), False, id="50pct-but-too-few-replies-silent"),
    pytest.param([make_rejection(request_id=f"r-{i}", reason="unauthenticated")
                  for i in range(50)] + replies(50, 0), False,
                 id="other-rejections-are-not-throttling-silent"),
])
def test_tenant_throttled_scenarios(observations: list[Observation], fires: bool) -> None:
    fired = run(THROTTLED, observations)
    assert [(a.rule, a.subject) for a in fired] == ([("throttled", "acme")] if fires else [])
    if fires:
        assert fired[0].value is not None and fired[0].value > 0.2
        assert fired[0].threshold == 0.2 and fired[0].severity == "warning"


def test_tenant_throttled_old_rejections_leave_the_window_silent() -> None:
    # 40 throttles, then 70 s later 40 results: the throttles are out of the 60 s window.
    evaluator = AlertEvaluator(parse_rules(THROTTLED.replace("min_replies = 20",
                                                             "min_replies = 60")))
    state = AlertState()
    fired = [a for i, r in enumerate(replies(40, 40)) for a in evaluator.observe(state, r, T0 + i)]
    fired += [a for i, r in enumerate(replies(40, 0))
              for a in evaluator.observe(state, r, T0 + 110 + i * 0.1)]
    assert fired == []


def test_tenant_throttled_per_tenant_only_the_throttled_one_fires() -> None:
    mixed = [obs for pair in zip(replies(60, 30, tenant="acme"), replies(60, 1, tenant="globex"),
                                 strict=True) for obs in pair]
    assert [a.subject for a in run(THROTTLED, mixed, spacing_s=0.2)] == ["acme"]


# --- TTFT SLO burn ----------------------------------------------------------------------

@pytest.mark.parametrize(("values", "fires"), [
    pytest.param([3.0] * 40, True, id="p95-3s-vs-target-2s-fires"),
    pytest.param([1.0] * 40, False, id="p95-1s-silent"),
    pytest.param([0.5] * 36 + [9.0] * 4, True, id="tail-10pct-slow-fires"),
    pytest.param([0.5] * 39 + [9.0] * 1, False, id="tail-2.5pct-slow-silent"),
    pytest.param([5.0] * 10, False, id="too-few-samples-silent"),
])
def test_ttft_slo_scenarios(values: list[float], fires: bool) -> None:
    fired = run(TTFT, results_with_ttft(values))
    assert [(a.rule, a.subject) for a in fired] == ([("ttft", "tiny-llama")] if fires else [])
    if fires:
        assert fired[0].value is not None and fired[0].value > 2.0 and fired[0].threshold == 2.0


def test_ttft_slo_error_results_are_not_samples_silent() -> None:
    assert run(TTFT, results_with_ttft([5.0] * 40, status="error")) == []


def test_ttft_slo_per_tenant_subject_is_the_tenant() -> None:
    fired = run(TTFT.replace("min_samples = 20", 'min_samples = 20\nper = "tenant"'),
                results_with_ttft([3.0] * 30, tenant="globex"))
    assert [a.subject for a in fired] == ["globex"]


# --- consumer lag -----------------------------------------------------------------------

@pytest.mark.parametrize(("lag", "groups", "fires"), [
    pytest.param(10_000, '["*"]', True, id="lag-10k-fires"),
    pytest.param(10, '["*"]', False, id="lag-10-silent"),
    pytest.param(1000, '["*"]', False, id="exactly-threshold-silent"),
    pytest.param(10_000, '["tw.worker.*"]', False, id="group-not-matched-silent"),
])
def test_consumer_lag_scenarios(lag: int, groups: str, fires: bool) -> None:
    fired = run(LAG + f"groups = {groups}\n", [ConsumerLag(group="tokenweir", lag=lag)])
    assert [(a.subject, a.value) for a in fired] == ([("tokenweir", float(lag))] if fires else [])


# --- worker unhealthy -------------------------------------------------------------------

@pytest.mark.parametrize(("state", "fires"), [
    pytest.param("unhealthy", True, id="unhealthy-fires"),
    pytest.param("suspect", False, id="suspect-silent"),
    pytest.param("healthy", False, id="healthy-silent"),
])
def test_worker_unhealthy_scenarios(state: str, fires: bool) -> None:
    fired = run(UNHEALTHY, [make_health(state=state)])
    assert [(a.subject, a.severity) for a in fired] == ([("w-1", "critical")] if fires else [])


def test_worker_unhealthy_suspect_fires_when_listed() -> None:
    rules = UNHEALTHY + 'states = ["suspect", "unhealthy"]\n'
    assert [a.subject for a in run(rules, [make_health(state="suspect")])] == ["w-1"]


# --- model at max replicas --------------------------------------------------------------

@pytest.mark.parametrize(("decision", "fires"), [
    pytest.param(make_scale(desired=8), True, id="desired-equals-max-fires"),
    pytest.param(make_scale(desired=7), False, id="below-max-silent"),
    pytest.param(make_scale(model="big-model", desired=2, current=1), True,
                 id="per-model-max-fires"),
    pytest.param(make_scale(model="big-model", desired=1, current=1, reason="steady"), False,
                 id="per-model-below-silent"),
    pytest.param(make_scale(desired=6, reason="capped at max replicas"), True,
                 id="reason-says-max-fires"),
])
def test_model_at_max_scenarios(decision: ScaleDecision, fires: bool) -> None:
    fired = run(AT_MAX, [decision])
    assert [a.subject for a in fired] == ([decision.model] if fires else [])


def test_model_at_max_default_is_the_autoscalers_max() -> None:
    assert SCALING_MAX_REPLICAS == ScalingConfig(capacity_mu_per_min=1).max_replicas
    rules = '[[rules]]\nname = "m"\nkind = "model_at_max_replicas"\n'
    assert run(rules, [make_scale(desired=SCALING_MAX_REPLICAS - 1)]) == []
    assert len(run(rules, [make_scale(desired=SCALING_MAX_REPLICAS)])) == 1


def test_model_at_max_autoscaler_max_applies_unless_the_rules_file_names_the_model() -> None:
    rules = with_scaling_maxima(parse_rules(AT_MAX), {"tiny-llama": 3, "big-model": 9})
    evaluator = AlertEvaluator(rules)
    fired = [a for d in (make_scale(desired=3), make_scale(model="big-model", desired=2))
             for a in evaluator.observe(AlertState(), d, T0)]
    assert [(a.subject, a.threshold) for a in fired] == [("tiny-llama", 3.0), ("big-model", 2.0)]


def test_scaling_maxima_read_from_the_control_config(tmp_path: Any) -> None:
    control = tmp_path / "control.toml"
    control.write_text("[scaling.models.tiny-llama]\nmax_replicas = 4\n")
    settings = Settings(control_config=control, models=["tiny-llama", "other"])
    assert scaling_maxima(settings) == {"tiny-llama": 4, "other": SCALING_MAX_REPLICAS}
    assert scaling_maxima(Settings(control_config=None)) == {}


# --- dedupe and cooldown ----------------------------------------------------------------

def test_cooldown_same_rule_and_subject_fires_once_within_then_again_after() -> None:
    evaluator = AlertEvaluator(parse_rules(UNHEALTHY))  # cooldown_s = 60
    state = AlertState()
    times = [T0, T0 + 1, T0 + 30, T0 + 59.9, T0 + 60, T0 + 61, T0 + 125]
    fired = [a.fired_at for t in times for a in evaluator.observe(state, make_health(), t)]
    assert fired == [T0, T0 + 60, T0 + 125]
    assert state.suppressed == 4


def test_cooldown_is_per_subject_other_worker_fires() -> None:
    fired = run(UNHEALTHY, [make_health(worker="w-1"), make_health(worker="w-2"),
                            make_health(worker="w-1")], spacing_s=1)
    assert [a.subject for a in fired] == ["w-1", "w-2"]


def test_cooldown_sustained_throttling_fires_once_per_cooldown() -> None:
    fired = run(THROTTLED, replies(2000, 1000), spacing_s=0.5)  # 1000 s of 50 % throttling
    assert [round(a.fired_at - fired[0].fired_at) for a in fired] == [0, 300, 600, 900]


def test_alert_id_is_deterministic_for_replays() -> None:
    first = run(UNHEALTHY, [make_health()])
    again = run(UNHEALTHY, [make_health()])
    assert first[0].alert_id == again[0].alert_id


def test_sweep_forgets_expired_windows_and_cooldowns() -> None:
    evaluator = AlertEvaluator(parse_rules(THROTTLED + UNHEALTHY))
    state = AlertState()
    for i, obs in enumerate([*replies(30, 15), make_health()]):
        evaluator.observe(state, obs, T0 + i)
    assert state.throttle and state.last_fired
    evaluator.sweep(state, T0 + 1000)
    assert not state.throttle and not state.last_fired


def test_restored_alert_holds_its_cooldown_after_a_restart() -> None:
    evaluator = AlertEvaluator(parse_rules(UNHEALTHY))  # cooldown_s = 60
    before_restart = run(UNHEALTHY, [make_health()], start=T0 - 30)
    state = AlertState()
    evaluator.restore(state, before_restart[0])
    assert evaluator.observe(state, make_health(), T0) == []  # 30 s into its cooldown
    assert [a.fired_at for a in evaluator.observe(state, make_health(), T0 + 31)] == [T0 + 31]


def test_restore_keeps_the_latest_of_several_alerts_of_one_subject() -> None:
    evaluator = AlertEvaluator(parse_rules(UNHEALTHY))
    state = AlertState()
    latest, earlier = (run(UNHEALTHY, [make_health()], start=t)[0] for t in (T0 - 10, T0 - 100))
    evaluator.restore(state, latest)
    evaluator.restore(state, earlier)  # read later (another partition): still the latest
    assert state.last_fired == {("unhealthy", "w-1"): T0 - 10}


def test_lookback_is_the_longest_window_and_cooldown_the_longest_cooldown() -> None:
    evaluator = AlertEvaluator(parse_rules(THROTTLED + TTFT + UNHEALTHY + LAG))
    assert evaluator.lookback_s == 300  # TTFT's window; lag and health have none
    assert evaluator.longest_cooldown_s == 300  # the default, above UNHEALTHY's 60
    assert AlertEvaluator(parse_rules(UNHEALTHY)).lookback_s == 0


# --- the rules file ---------------------------------------------------------------------

def test_default_rules_file_loads_every_kind() -> None:
    rules = load_rules(DEFAULT_RULES_PATH)
    assert {r.kind for r in rules.rules} == {"tenant_throttled", "ttft_slo", "consumer_lag",
                                            "worker_unhealthy", "model_at_max_replicas"}


@pytest.mark.parametrize(("text", "problem"), [
    pytest.param('[[rules]]\nname = "x"\nkind = "cpu_hot"\n', "expected tags",
                 id="unknown-kind"),
    pytest.param('[[rules]]\nname = "x"\nkind = "tenant_throttled"\nmax_fraction = 1.5\n',
                 "less than 1", id="fraction-above-one"),
    pytest.param('[[rules]]\nname = "x"\nkind = "tenant_throttled"\n', "max_fraction: Field "
                 "required", id="threshold-missing"),
    pytest.param('[[rules]]\nname = "x"\nkind = "ttft_slo"\ntarget_s = -1\n', "greater than 0",
                 id="negative-target"),
    pytest.param('[[rules]]\nname = "x"\nkind = "consumer_lag"\nmax_lag = "lots"\n',
                 "valid integer", id="lag-not-a-number"),
    pytest.param('[[rules]]\nname = "x"\nkind = "worker_unhealthy"\nstates = ["dead"]\n',
                 "'healthy', 'suspect' or 'unhealthy'", id="unknown-health-state"),
    pytest.param('[[rules]]\nname = "x"\nkind = "consumer_lag"\nmax_lag = 1\ncooldown_s = -5\n',
                 "greater than or equal to 0", id="negative-cooldown"),
    pytest.param('[[rules]]\nname = "x"\nkind = "consumer_lag"\nmax_lag = 1\nmax_lagg = 2\n',
                 "Extra inputs are not permitted", id="misspelt-field"),
    pytest.param('[[rules]]\nname = "x"\nkind = "consumer_lag"\nmax_lag = 1\n'
                 '[[rules]]\nname = "x"\nkind = "worker_unhealthy"\n', "appear twice",
                 id="duplicate-names"),
    pytest.param('[[rules]]\nname = "has space"\nkind = "worker_unhealthy"\n', "pattern",
                 id="bad-name"),
    pytest.param("[[rules]\n", "not valid TOML", id="not-toml"),
])
def test_rules_file_invalid_raises(text: str, problem: str) -> None:
    with pytest.raises(AlertRulesError) as info:
        parse_rules(text)
    assert problem in str(info.value)


def test_rules_file_missing_raises(tmp_path: Any) -> None:
    with pytest.raises(AlertRulesError, match="cannot read"):
        load_rules(tmp_path / "nope.toml")


def test_rules_file_disabled_rule_never_fires() -> None:
    assert run(UNHEALTHY + "enabled = false\n", [make_health()]) == []


# --- the agent's handling of records (fake sink, no Kafka) -----------------------------

def _record(topic: str, value: bytes, offset: int = 0,
            timestamp_ms: int = 0) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(topic=topic, partition=0, offset=offset, timestamp=timestamp_ms,
                          timestamp_type=0, key=b"k", value=value, checksum=None,
                          serialized_key_size=1, serialized_value_size=len(value), headers=())


@pytest.mark.parametrize(("record_at", "observed_at"), [
    pytest.param(T0 - 20, T0 - 20, id="replayed-from-before-the-start-at-its-record-time"),
    pytest.param(T0 + 5, T0 + 7, id="live-at-the-clock"),
])
async def test_agent_observes_replayed_records_at_their_time_live_ones_at_the_clock(
        record_at: float, observed_at: float) -> None:
    sink = MemoryEventSink()
    agent = AlertAgent("unused:0", AlertEvaluator(parse_rules(UNHEALTHY)), sink,
                       clock=lambda: T0 + 7)
    agent._started_at = T0  # as run() sets it
    await agent._handle(_record(HEALTH, make_health().model_dump_json().encode(),
                                timestamp_ms=int(record_at * 1000)))
    [alert] = [Alert.model_validate_json(r.value) for r in sink.on(ALERTS)]
    assert alert.fired_at == observed_at


async def test_agent_bad_records_dead_lettered_good_ones_alert() -> None:
    sink = MemoryEventSink()
    agent = AlertAgent("unused:0", AlertEvaluator(parse_rules(UNHEALTHY)), sink,
                       clock=lambda: T0)
    await agent._handle(_record(HEALTH, b"{not json", offset=3))
    await agent._handle(_record(RESPONSES, make_health().model_dump_json().encode(), offset=4))
    await agent._handle(_record(HEALTH, make_health().model_dump_json().encode(), offset=5))
    dead = [DeadLetter.model_validate_json(r.value) for r in sink.on(DLQ)]
    assert [(d.origin_topic, d.origin_offset, d.consumer) for d in dead] == [
        (HEALTH, 3, "alerter"), (RESPONSES, 4, "alerter")]
    alerts = sink.on(ALERTS)
    assert [r.key for r in alerts] == [b"unhealthy/w-1"]
    assert Alert.model_validate_json(alerts[0].value).subject == "w-1"
    assert agent.counts["dead_lettered"] == 2 and agent.counts["alerts"] == 1
