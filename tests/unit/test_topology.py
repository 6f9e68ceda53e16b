import pytest

from agents.passthrough import Forward, PassThroughPolicy
from schemas.config import Settings
from schemas.errors import ConfigError
from schemas.events import Rejection
from streams.topics import LEDGER, REQUESTS, USAGE, registry, shard_topic
from tests.builders import make_request


def test_registry_co_partitions_requests_usage_and_ledger_by_tenant():
    topics = {t.name: t for t in registry(Settings(tenant_partitions=12))}
    assert topics[REQUESTS].partitions == topics[USAGE].partitions == 12
    assert topics[LEDGER].partitions == 12 and topics[LEDGER].compacted
    assert topics[REQUESTS].key == topics[USAGE].key == "tenant"


def test_registry_has_one_shard_topic_per_model():
    topics = {t.name for t in registry(Settings(models=["a", "b"], shard_partitions=3))}
    assert {shard_topic("a"), shard_topic("b")} <= topics


def test_registry_compacts_config_and_retains_the_rest():
    for topic in registry(Settings()):
        configs = topic.configs()
        if topic.compacted:
            assert configs["cleanup.policy"] == "compact" and "retention.ms" not in configs
        else:
            assert int(configs["retention.ms"]) > 0


@pytest.mark.parametrize("models", [pytest.param(["a", "a"], id="duplicate"),
                                    pytest.param(["bad name"], id="space")])
def test_settings_invalid_models_raise(models):
    with pytest.raises((ConfigError, ValueError)):
        Settings(models=models)


def test_settings_round_trip_through_environment(monkeypatch):
    settings = Settings(models=["x", "y"], kafka_port=19092, kafka_controller_port=19093)
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    assert Settings() == settings


def test_passthrough_unknown_model_rejected():
    decision = PassThroughPolicy(["m"], 4).decide(make_request(model="other"))
    assert isinstance(decision, Rejection) and decision.reason == "unknown_model"


def test_passthrough_session_key_is_sticky():
    policy = PassThroughPolicy(["tiny-llama"], 8)
    shards = {policy.decide(make_request(session_key="conv-1")).partition  # type: ignore[union-attr]
              for _ in range(20)}
    assert len(shards) == 1


def test_passthrough_spreads_requests_without_session_over_shards():
    policy = PassThroughPolicy(["tiny-llama"], 4)
    decisions = [policy.decide(make_request()) for _ in range(200)]
    assert all(isinstance(d, Forward) for d in decisions)
    assert {d.partition for d in decisions if isinstance(d, Forward)} == {0, 1, 2, 3}
