"""`tokenweir alerter` on a real broker: every rule fires on its scenario, stays silent on the
control scenario next to it, and the alerts on tw.alerts are plain JSON that kcat reads."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from infra.alerts import tail_alerts
from schemas.config import Settings
from schemas.events import Alert, DeadLetter, HealthEvent, Rejection, ScaleDecision, Timings
from streams.sink import KafkaEventSink
from streams.topics import ALERTS, DLQ, HEALTH, RESPONSES, SCALE
from tests.builders import make_result
from tests.integration.conftest import eventually

REPO = Path(__file__).resolve().parents[2]
LAG_TOPIC = "alerts.lagtest"

RULES = """
[[rules]]
name = "throttled"
kind = "tenant_throttled"
max_fraction = 0.2
window_s = 60
min_replies = 50        # so that no prefix of globex's 5 % is ever above 20 %

[[rules]]
name = "ttft"
kind = "ttft_slo"
target_s = 2.0
window_s = 60
min_samples = 20

[[rules]]
name = "lag"
kind = "consumer_lag"
max_lag = 20
groups = ["lagtest-*"]

[[rules]]
name = "unhealthy"
kind = "worker_unhealthy"

[[rules]]
name = "at-max"
kind = "model_at_max_replicas"
max_replicas = 64
[rules.models]
slow-model = 4
"""

# (rule, subject) each scenario must fire; the silent scenarios use the other subjects.
EXPECTED = {("throttled", "acme"), ("ttft", "slow-model"), ("lag", "lagtest-behind"),
            ("unhealthy", "w-bad"), ("at-max", "slow-model")}


class Alerter:
    """`tokenweir alerter` as a process that a test may stop and start again."""

    def __init__(self, settings: Settings, rules: Path) -> None:
        self._settings = settings
        self._rules = rules
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {**os.environ, **self._settings.to_env()}
        self._proc = proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "infra.cli", "alerter", "--rules", str(self._rules),
            "--lag-interval", "1", cwd=REPO, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        assert proc.stdout is not None
        # It prints its rules once it has read back its alerts and positioned its topics.
        seen = b""
        while b"alerter: 5 rules" not in seen:
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert line, f"alerter exited: {seen.decode()}"
            seen += line

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            proc.terminate()
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        print(out.decode())
        assert proc.returncode == 0, out


@pytest.fixture(scope="module")
async def alerter(settings: Settings, stack, tmp_path_factory) -> AsyncIterator[Alerter]:  # type: ignore[no-untyped-def]
    rules = tmp_path_factory.mktemp("alerts") / "rules.toml"
    rules.write_text(RULES)
    running = Alerter(settings, rules)
    await running.start()
    yield running
    await running.stop()


async def _produce_replies(sink: KafkaEventSink, tenant: str, stride: int) -> None:
    """100 replies of ``tenant``, every ``stride``-th a throttling rejection."""
    for i in range(100):
        rid = f"{tenant}-{i}"
        reply = (Rejection(request_id=rid, tenant=tenant, model="fast-model",
                           reason="rate_limited") if i % stride == 0
                 else make_result(request_id=rid, tenant=tenant, model="fast-model",
                                  timings=Timings(queue_s=0.1, ttft_s=0.2)))
        await sink.send(RESPONSES, reply, key=rid)


async def _produce_scenarios(settings: Settings) -> None:
    sink = KafkaEventSink(settings.bootstrap, client_id="alerts-test")
    await sink.start()
    try:
        # Throttled: acme 34 % (fires), globex 5 % (silent), spread over the 100 replies.
        for tenant, stride in (("acme", 3), ("globex", 20)):
            await _produce_replies(sink, tenant, stride)
        # TTFT: slow-model p95 3 s vs 2 s target (fires); fast-model 0.3 s above (silent).
        for i in range(30):
            rid = f"slow-{i}"
            await sink.send(RESPONSES, make_result(request_id=rid, tenant="kcat-tenant",
                                                   model="slow-model",
                                                   timings=Timings(queue_s=1.0, ttft_s=2.0)),
                            key=rid)
        # Health: unhealthy (fires), suspect (silent), plus one record that is no event.
        for worker, state in (("w-bad", "unhealthy"), ("w-maybe", "suspect")):
            await sink.send(HEALTH, HealthEvent(worker=worker, model="slow-model",
                                                previous="healthy", state=state,
                                                reason="silent hang test"), key=worker)
        await sink.send(HEALTH, b'{"worker": "w-garbage", "state": ', key="w-garbage")
        # Scale: slow-model at its max of 4 (fires), fast-model 3 of 64 (silent).
        for model, desired in (("slow-model", 4), ("fast-model", 3)):
            await sink.send(SCALE, ScaleDecision(model=model, current=desired - 1,
                                                 desired=desired, reason="scale up"), key=model)
        await sink.flush()
    finally:
        await sink.stop()


async def _consumer_groups_behind(settings: Settings) -> None:
    """50 records; group lagtest-behind committed at 5 (lag 45), lagtest-ok at 48 (lag 2)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    try:
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([NewTopic(LAG_TOPIC, 1, 1)])
    finally:
        await admin.close()
    sink = KafkaEventSink(settings.bootstrap, client_id="alerts-test-lag")
    await sink.start()
    try:
        for i in range(50):
            await sink.send(LAG_TOPIC, f"record {i}".encode(), partition=0)
        await sink.flush()
    finally:
        await sink.stop()
    tp = TopicPartition(LAG_TOPIC, 0)
    for group, offset in (("lagtest-behind", 5), ("lagtest-ok", 48)):
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=group,
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign([tp])
            await consumer.commit({tp: offset})
        finally:
            await consumer.stop()


async def _alerts(settings: Settings) -> list[Alert]:
    found: list[Alert] = []
    await tail_alerts(settings.bootstrap, found.append)
    return found


def _kcat_alerts(kcat: str, settings: Settings) -> list[tuple[str, str]]:
    out = subprocess.run([kcat, "-C", "-b", settings.bootstrap, "-t", ALERTS, "-e", "-q",
                          "-f", "%k\t%s\n"], capture_output=True, text=True, check=True,
                         timeout=60)
    return [tuple(line.split("\t", 1)) for line in out.stdout.splitlines() if line]  # type: ignore[misc]


@pytest.fixture(scope="module")
async def scenarios(settings: Settings, alerter: Alerter) -> None:
    """Every scenario produced, and every alert expected from them on tw.alerts."""
    await _consumer_groups_behind(settings)
    await _produce_scenarios(settings)

    async def all_fired() -> bool:
        return EXPECTED <= {(a.rule, a.subject) for a in await _alerts(settings)}

    assert await eventually(all_fired, timeout_s=60), await _alerts(settings)


async def test_alerter_every_rule_fires_on_its_scenario_and_stays_silent_on_the_control(
        settings: Settings, scenarios: None, kcat: str) -> None:
    await asyncio.sleep(3)  # a few more lag polls: nothing else, and nothing twice (cooldown)
    alerts = await _alerts(settings)
    print("\n".join(a.model_dump_json() for a in alerts))
    assert sorted((a.rule, a.subject) for a in alerts) == sorted(EXPECTED)
    by_rule = {a.rule: a for a in alerts}
    assert 0.2 < (by_rule["throttled"].value or 0) <= 34 / 50
    assert by_rule["ttft"].value == pytest.approx(3.0) and by_rule["ttft"].threshold == 2.0
    assert by_rule["lag"].value == 45 and by_rule["lag"].threshold == 20
    assert by_rule["unhealthy"].severity == "critical"
    assert by_rule["at-max"].value == 4 and by_rule["at-max"].threshold == 4

    # Readable with kcat: key "<rule>/<subject>", value one Alert as JSON.
    lines = await asyncio.to_thread(_kcat_alerts, kcat, settings)
    read = [(key, Alert.model_validate_json(value)) for key, value in lines]
    assert sorted(key for key, _ in read) == sorted(f"{r}/{s}" for r, s in EXPECTED)
    assert all(key == f"{a.rule}/{a.subject}" for key, a in read)
    assert json.loads(lines[0][1])["schema_version"] == 1


async def test_alerter_undecodable_health_record_is_dead_lettered(
        settings: Settings, scenarios: None) -> None:
    async def dead() -> list[DeadLetter]:
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap,
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            tp = TopicPartition(DLQ, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            end = (await consumer.end_offsets([tp]))[tp]
            letters = []
            while await consumer.position(tp) < end:
                for records in (await consumer.getmany(tp, timeout_ms=500)).values():
                    letters += [DeadLetter.model_validate_json(r.value or b"") for r in records]
            return [d for d in letters if d.consumer == "alerter" and d.origin_topic == HEALTH]
        finally:
            await consumer.stop()

    letters = await eventually(dead, timeout_s=30)
    assert letters and "invalid JSON" in letters[0].reason


def test_cli_alerts_prints_lines_and_json(settings: Settings, scenarios: None) -> None:
    env = {**os.environ, **settings.to_env()}
    pretty = subprocess.run([sys.executable, "-m", "infra.cli", "alerts"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60, check=True).stdout
    as_json = subprocess.run([sys.executable, "-m", "infra.cli", "alerts", "--json"], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=60,
                             check=True).stdout
    print(pretty)
    assert "CRITICAL  unhealthy" in pretty and "w-bad" in pretty
    rules = {Alert.model_validate_json(line).rule for line in as_json.splitlines()}
    assert rules == {rule for rule, _ in EXPECTED}


async def test_alerter_restarted_fires_what_it_missed_and_nothing_twice(
        settings: Settings, scenarios: None, alerter: Alerter) -> None:
    await alerter.stop()
    sink = KafkaEventSink(settings.bootstrap, client_id="alerts-test-restart")
    await sink.start()
    try:
        await _produce_replies(sink, "initech", 3)  # 34 % throttled while no alerter runs
        await sink.flush()
    finally:
        await sink.stop()
    await alerter.start()
    expected = EXPECTED | {("throttled", "initech")}

    async def caught_up() -> bool:
        return ("throttled", "initech") in {(a.rule, a.subject) for a in await _alerts(settings)}

    assert await eventually(caught_up, timeout_s=30), await _alerts(settings)
    # The earlier scenarios are in the replayed window and lagtest-behind is still
    # behind: all within their cooldowns, read back from tw.alerts, so none fires again.
    await asyncio.sleep(3)
    alerts = await _alerts(settings)
    assert sorted((a.rule, a.subject) for a in alerts) == sorted(expected), alerts
