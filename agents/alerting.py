"""Alert rules over the streams: a rules file in, Alerts out. Pure, no I/O, no clock.

A rules file (TOML) lists rules, each of one kind:

- ``tenant_throttled``: the fraction of a tenant's replies that are throttling
  rejections (``rate_limited`` / ``over_capacity``, vs InferenceResults) over a
  sliding window is above ``max_fraction``;
- ``ttft_slo``: the p-quantile of time to first token (queue + TTFT, from
  InferenceResult timings) per model or tenant over a window is above ``target_s``;
- ``consumer_lag``: a consumer group is more than ``max_lag`` records behind;
- ``worker_unhealthy``: a HealthEvent puts a worker in one of ``states``;
- ``model_at_max_replicas``: a ScaleDecision asks for the model's max replicas.

:meth:`AlertEvaluator.observe` takes the caller's :class:`AlertState`, one
observation and the time, updates the windows held in the state and returns
the Alerts to publish. Dedupe and cooldown live here too: one (rule, subject)
fires at most once per ``cooldown_s``. There are no "resolved" alerts: an alert
says a condition held at ``fired_at``; it fires again after the cooldown if
the condition still holds then.
"""

from __future__ import annotations

import bisect
import collections
import fnmatch
import math
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from agents import AgentsError
from agents.scaling import ScalingConfig
from schemas.events import (
    Alert,
    HealthEvent,
    HealthState,
    InferenceResult,
    Rejection,
    ScaleDecision,
)

DEFAULT_RULES_PATH = Path(__file__).with_name("default_alerts.toml")
# The autoscaler's own default, used when a rule names no max for a model.
SCALING_MAX_REPLICAS: int = ScalingConfig.model_fields["max_replicas"].default
_ALERT_NS = uuid.UUID("0c6a8f0e-5b1d-4c1e-8d3a-7e2b9f4a6c15")

RuleName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$")]
Severity = Literal["info", "warning", "critical"]
ThrottleReason = Literal["rate_limited", "over_capacity"]


class AlertRulesError(AgentsError):
    """A rules file that cannot be read or holds an invalid rule."""


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: RuleName  # the Alert's ``rule``; key of tw.alerts is "<name>/<subject>"
    severity: Severity = "warning"
    cooldown_s: Annotated[float, Field(ge=0)] = 300.0  # s between two alerts of one subject
    enabled: bool = True


class TenantThrottledRule(_Rule):
    kind: Literal["tenant_throttled"]
    max_fraction: Annotated[float, Field(gt=0, lt=1)]  # throttled ÷ (throttled + results)
    window_s: Annotated[float, Field(gt=0)] = 60.0  # s, sliding
    min_replies: Annotated[int, Field(ge=1)] = 20  # replies in the window before judging
    reasons: Annotated[list[ThrottleReason], Field(min_length=1)] = [
        "rate_limited", "over_capacity"]


class TtftSloRule(_Rule):
    kind: Literal["ttft_slo"]
    target_s: Annotated[float, Field(gt=0)]  # s, queue_s + ttft_s
    quantile: Annotated[float, Field(gt=0, le=1)] = 0.95
    window_s: Annotated[float, Field(gt=0)] = 300.0  # s, sliding
    min_samples: Annotated[int, Field(ge=1)] = 20  # ok results in the window before judging
    per: Literal["model", "tenant"] = "model"


class ConsumerLagRule(_Rule):
    kind: Literal["consumer_lag"]
    max_lag: Annotated[int, Field(ge=0)]  # records behind the log end, summed over partitions
    groups: Annotated[list[str], Field(min_length=1)] = ["*"]  # glob patterns of group ids


class WorkerUnhealthyRule(_Rule):
    kind: Literal["worker_unhealthy"]
    severity: Severity = "critical"
    states: Annotated[list[HealthState], Field(min_length=1)] = ["unhealthy"]


class ModelAtMaxRule(_Rule):
    kind: Literal["model_at_max_replicas"]
    max_replicas: Annotated[int, Field(ge=1)] = SCALING_MAX_REPLICAS  # replicas, every model
    models: dict[str, Annotated[int, Field(ge=1)]] = {}  # model -> its own max replicas

    def max_for(self, model: str) -> int:
        return self.models.get(model, self.max_replicas)


Rule = Annotated[
    TenantThrottledRule | TtftSloRule | ConsumerLagRule | WorkerUnhealthyRule | ModelAtMaxRule,
    Field(discriminator="kind"),
]


class AlertRules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: list[Rule] = []

    @model_validator(mode="after")
    def _unique_names(self) -> AlertRules:
        names = [r.name for r in self.rules]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"rule names must be unique: {', '.join(twice)} appear twice")
        return self

    def active(self) -> list[Rule]:
        return [r for r in self.rules if r.enabled]


_RULES: TypeAdapter[AlertRules] = TypeAdapter(AlertRules)


def with_scaling_maxima(rules: AlertRules, maxima: dict[str, int]) -> AlertRules:
    """``model_at_max_replicas`` rules judged against the autoscaler's own max per model.

    A model listed in a rule's ``models`` keeps the rules file's value; every other
    model in ``maxima`` (model -> max replicas, from the autoscaler's configuration)
    gets the autoscaler's.
    """
    merged: list[Rule] = [
        r.model_copy(update={"models": {**maxima, **r.models}})
        if isinstance(r, ModelAtMaxRule) else r
        for r in rules.rules]
    return AlertRules(rules=merged)


def parse_rules(text: str, *, source: str = "<rules>") -> AlertRules:
    try:
        return _RULES.validate_python(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise AlertRulesError(f"{source}: not valid TOML: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in exc.errors(include_url=False, include_input=False))
        raise AlertRulesError(f"{source}: invalid alert rules: {problems}") from exc


def load_rules(path: Path | None = None) -> AlertRules:
    """Read a rules file (default: the one shipped next to this module)."""
    path = path or DEFAULT_RULES_PATH
    try:
        text = path.read_text()
    except OSError as exc:
        raise AlertRulesError(f"cannot read alert rules {path}: {exc}") from exc
    return parse_rules(text, source=str(path))


class ConsumerLag(BaseModel):
    """One poll of a consumer group's lag (the agent polls the Kafka admin API)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group: str
    lag: Annotated[int, Field(ge=0)]  # records behind the log end, summed over partitions


Observation = InferenceResult | Rejection | HealthEvent | ScaleDecision | ConsumerLag


class _ThrottleWindow:
    """(at s, throttled?) samples of one subject, oldest first, with a running count."""

    def __init__(self) -> None:
        self.samples: collections.deque[tuple[float, bool]] = collections.deque()
        self.throttled = 0

    def add(self, at: float, throttled: bool) -> None:
        self.samples.append((at, throttled))
        self.throttled += throttled

    def expire(self, before: float) -> None:
        while self.samples and self.samples[0][0] <= before:
            self.throttled -= self.samples.popleft()[1]


class _QuantileWindow:
    """(at s, value s) samples in arrival order plus the same values kept sorted."""

    def __init__(self) -> None:
        self.samples: collections.deque[tuple[float, float]] = collections.deque()
        self.sorted: list[float] = []

    def add(self, at: float, value: float) -> None:
        self.samples.append((at, value))
        bisect.insort(self.sorted, value)

    def expire(self, before: float) -> None:
        while self.samples and self.samples[0][0] <= before:
            _, value = self.samples.popleft()
            del self.sorted[bisect.bisect_left(self.sorted, value)]

    def quantile(self, q: float) -> float:
        """Nearest-rank quantile: the smallest value with at least q of the samples at or below."""
        rank = max(1, math.ceil(q * len(self.sorted)))
        return self.sorted[rank - 1]


@dataclass
class AlertState:
    """Everything the evaluator remembers. Owned by the caller; only the evaluator mutates it."""

    throttle: dict[tuple[str, str], _ThrottleWindow] = field(default_factory=dict)  # rule, tenant
    ttft: dict[tuple[str, str], _QuantileWindow] = field(default_factory=dict)  # rule, subject
    last_fired: dict[tuple[str, str], float] = field(default_factory=dict)  # (rule, subject) -> s
    suppressed: int = 0  # alerts held back by a cooldown


def alert_key(alert: Alert) -> str:
    """The Kafka key of an alert on tw.alerts."""
    return f"{alert.rule}/{alert.subject}"


class AlertEvaluator:
    def __init__(self, rules: AlertRules) -> None:
        self.rules = rules.active()

    def observe(self, state: AlertState, obs: Observation, now: float) -> list[Alert]:
        """Alerts that ``obs`` (seen at ``now``, epoch s) fires, after dedupe and cooldown."""
        fired: list[Alert] = []
        for rule in self.rules:
            candidate = self._judge(state, rule, obs, now)
            if candidate is not None and self._may_fire(state, rule, candidate.subject, now):
                fired.append(candidate)
        return fired

    @property
    def lookback_s(self) -> float:
        """How far back a restarted agent re-reads the streams to refill every window (s)."""
        return max((r.window_s for r in self.rules
                    if isinstance(r, TenantThrottledRule | TtftSloRule)), default=0.0)

    @property
    def longest_cooldown_s(self) -> float:
        """How far back published alerts can still hold a cooldown (s)."""
        return max((r.cooldown_s for r in self.rules), default=0.0)

    def restore(self, state: AlertState, alert: Alert) -> None:
        """Take in an alert published before a restart: its cooldown holds as if it had
        fired in this process, so a refilled window does not fire it again."""
        key = (alert.rule, alert.subject)
        if alert.fired_at > state.last_fired.get(key, -math.inf):
            state.last_fired[key] = alert.fired_at

    def sweep(self, state: AlertState, now: float) -> None:
        """Forget windows that emptied and cooldowns that ended (bounds memory)."""
        windows = {r.name: r.window_s for r in self.rules
                   if isinstance(r, TenantThrottledRule | TtftSloRule)}
        for table in (state.throttle, state.ttft):
            for key in list(table):
                window = table[key]
                window.expire(now - windows.get(key[0], 0.0))
                if not window.samples:
                    del table[key]
        cooldowns = {r.name: r.cooldown_s for r in self.rules}
        for key, at in list(state.last_fired.items()):
            if now - at >= cooldowns.get(key[0], 0.0):
                del state.last_fired[key]

    def _may_fire(self, state: AlertState, rule: Rule, subject: str, now: float) -> bool:
        last = state.last_fired.get((rule.name, subject))
        if last is not None and now - last < rule.cooldown_s:
            state.suppressed += 1
            return False
        state.last_fired[(rule.name, subject)] = now
        return True

    def _judge(self, state: AlertState, rule: Rule, obs: Observation, now: float
               ) -> Alert | None:
        if isinstance(rule, TenantThrottledRule):
            return _throttled(state, rule, obs, now)
        if isinstance(rule, TtftSloRule):
            return _ttft(state, rule, obs, now)
        if isinstance(rule, ConsumerLagRule):
            return _lag(rule, obs, now)
        if isinstance(rule, WorkerUnhealthyRule):
            return _unhealthy(rule, obs, now)
        return _at_max(rule, obs, now)


def _alert(rule: Rule, subject: str, message: str, now: float, *,
           value: float | None = None, threshold: float | None = None) -> Alert:
    # Same rule, subject and instant ⇒ same id, so a replayed alert is deduplicated downstream.
    alert_id = uuid.uuid5(_ALERT_NS, f"{rule.name}|{subject}|{now:.3f}").hex
    return Alert(alert_id=alert_id, rule=rule.name, subject=subject[:256],
                 severity=rule.severity, message=message[:1024], value=value,
                 threshold=threshold, fired_at=now)


def _throttled(state: AlertState, rule: TenantThrottledRule, obs: Observation, now: float
               ) -> Alert | None:
    if isinstance(obs, InferenceResult):
        throttled = False
    elif isinstance(obs, Rejection) and obs.reason in rule.reasons:
        throttled = True
    else:
        return None  # other rejections say nothing about throttling
    window = state.throttle.setdefault((rule.name, obs.tenant), _ThrottleWindow())
    window.expire(now - rule.window_s)
    window.add(now, throttled)
    total = len(window.samples)
    fraction = window.throttled / total
    if total < rule.min_replies or fraction <= rule.max_fraction:
        return None
    return _alert(rule, obs.tenant,
                  f"tenant {obs.tenant} throttled on {fraction:.1%} of {total} replies over "
                  f"{rule.window_s:g} s (threshold {rule.max_fraction:.1%})",
                  now, value=fraction, threshold=rule.max_fraction)


def _ttft(state: AlertState, rule: TtftSloRule, obs: Observation, now: float) -> Alert | None:
    if not isinstance(obs, InferenceResult) or obs.status != "ok":
        return None
    subject = obs.model if rule.per == "model" else obs.tenant
    window = state.ttft.setdefault((rule.name, subject), _QuantileWindow())
    window.expire(now - rule.window_s)
    window.add(now, obs.timings.queue_s + obs.timings.ttft_s)
    if len(window.samples) < rule.min_samples:
        return None
    value = window.quantile(rule.quantile)
    if value <= rule.target_s:
        return None
    return _alert(rule, subject,
                  f"{rule.per} {subject}: time to first token p{rule.quantile * 100:g} "
                  f"{value:.3g} s over {len(window.samples)} results in {rule.window_s:g} s "
                  f"(target {rule.target_s:g} s)",
                  now, value=value, threshold=rule.target_s)


def _lag(rule: ConsumerLagRule, obs: Observation, now: float) -> Alert | None:
    if not isinstance(obs, ConsumerLag) or obs.lag <= rule.max_lag:
        return None
    if not any(fnmatch.fnmatchcase(obs.group, pattern) for pattern in rule.groups):
        return None
    return _alert(rule, obs.group,
                  f"consumer group {obs.group} is {obs.lag} records behind "
                  f"(threshold {rule.max_lag})",
                  now, value=float(obs.lag), threshold=float(rule.max_lag))


def _unhealthy(rule: WorkerUnhealthyRule, obs: Observation, now: float) -> Alert | None:
    if not isinstance(obs, HealthEvent) or obs.state not in rule.states:
        return None
    return _alert(rule, obs.worker,
                  f"worker {obs.worker} ({obs.model}) is {obs.state}"
                  f"{f' (was {obs.previous})' if obs.previous else ''}: {obs.reason}",
                  now)


def _at_max(rule: ModelAtMaxRule, obs: Observation, now: float) -> Alert | None:
    if not isinstance(obs, ScaleDecision):
        return None
    ceiling = rule.max_for(obs.model)
    says_max = "max replicas" in obs.reason.lower() or "max_replicas" in obs.reason.lower()
    if obs.desired < ceiling and not says_max:
        return None
    return _alert(rule, obs.model,
                  f"model {obs.model} wants {obs.desired} replicas, its max is {ceiling} "
                  f"(current {obs.current}; {obs.reason})",
                  now, value=float(obs.desired), threshold=float(ceiling))
