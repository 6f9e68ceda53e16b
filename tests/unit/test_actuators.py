"""Actuators, without processes or a cluster: decision gate, local plan, health restarts,
and the exact HTTP request the Kubernetes actuator sends."""

import json

import pytest
import urllib3

from infra import InfraError
from infra.actuators.base import DecisionGate, latest_per_model
from infra.actuators.kubernetes import KubernetesScaler, ScaleTarget, parse_target
from infra.actuators.local import owned_model, plan, restart_for
from schemas.events import HealthEvent, ScaleDecision


def decision(desired: int, at: float, *, model: str = "m", current: int = 1,
             decision_id: str | None = None) -> ScaleDecision:
    return ScaleDecision(decision_id=decision_id or f"d-{model}-{at}-{desired}", model=model,
                         current=current, desired=desired, reason="test", decided_at=at)


def test_gate_drops_duplicates_and_stale_decisions() -> None:
    gate = DecisionGate()
    first, newer = decision(2, 10.0), decision(3, 12.0)
    assert gate.accept(first)
    assert not gate.accept(first)  # same id redelivered
    assert gate.accept(newer)
    assert not gate.accept(decision(1, 11.0))  # older than the one applied
    assert gate.accept(decision(1, 11.0, model="other"))  # per model


def test_latest_per_model_keeps_newest_of_each() -> None:
    got = latest_per_model([decision(2, 10.0), decision(4, 12.0), decision(3, 11.0),
                            decision(1, 5.0, model="x")])
    assert {(d.model, d.desired) for d in got} == {("m", 4), ("x", 1)}


@pytest.mark.parametrize(
    ("desired", "running", "busy", "start", "stop"),
    [
        pytest.param(3, {"worker-m-0": 1.0}, set(), ["worker-m-1", "worker-m-2"], [],
                     id="up-lowest-free-indices"),
        pytest.param(2, {"worker-m-0": 1.0}, {"worker-m-1"}, ["worker-m-2"], [],
                     id="up-skips-names-still-draining"),
        pytest.param(1, {"worker-m-0": 1.0, "worker-m-1": 5.0, "worker-m-2": 3.0}, set(), [],
                     ["worker-m-1", "worker-m-2"], id="down-stops-newest-first"),
        pytest.param(2, {"worker-m-0": 1.0, "worker-m-1": 2.0}, set(), [], [], id="steady"),
    ],
)
def test_local_plan(desired, running, busy, start, stop) -> None:  # type: ignore[no-untyped-def]
    p = plan("m", desired, running, busy)
    assert (p.start, p.stop) == (start, stop)


def test_owned_model_longest_prefix() -> None:
    models = ["llama", "llama-big"]
    assert owned_model("worker-llama-big-3", models) == "llama-big"
    assert owned_model("worker-llama-0", models) == "llama"
    assert owned_model("agent-admission", models) is None
    assert owned_model("worker-llama-x", models) is None


def health(worker: str, state: str, at: float) -> HealthEvent:
    return HealthEvent(worker=worker, model="m", previous="suspect", state=state,  # type: ignore[arg-type]
                       reason="no tokens", at=at)


@pytest.mark.parametrize(
    ("event", "restart"),
    [
        pytest.param(health("worker-m-0", "unhealthy", 20.0), "worker-m-0", id="ours-unhealthy"),
        pytest.param(health("worker-m-0", "suspect", 20.0), None, id="suspect-waits"),
        pytest.param(health("worker-m-9", "unhealthy", 20.0), None, id="not-ours"),
        pytest.param(health("worker-m-0", "unhealthy", 5.0), None,
                     id="about-previous-incarnation"),
    ],
)
def test_restart_for_health_event(event: HealthEvent, restart: str | None) -> None:
    assert restart_for(event, {"worker-m-0": 10.0}) == restart


class FakePool:
    """Stands in for urllib3's PoolManager under the client's RESTClientObject."""

    def __init__(self, reply: dict) -> None:  # type: ignore[type-arg]
        self.calls: list[dict] = []  # type: ignore[type-arg]
        self._reply = reply

    def request(self, method, url, **kwargs):  # type: ignore[no-untyped-def]
        self.calls.append({"method": method, "url": url, **kwargs})
        return urllib3.HTTPResponse(body=json.dumps(self._reply).encode(), status=200,
                                    headers={"Content-Type": "application/json"},
                                    preload_content=False)


def fake_client(reply: dict) -> tuple[object, FakePool]:  # type: ignore[type-arg]
    from kubernetes import client

    config = client.Configuration(host="https://k8s.test:6443")
    config.api_key = {"authorization": "token-123"}
    config.api_key_prefix = {"authorization": "Bearer"}
    api = client.ApiClient(config)
    pool = FakePool(reply)
    api.rest_client.pool_manager = pool
    return api, pool


@pytest.mark.parametrize(
    ("target", "path"),
    [
        pytest.param(ScaleTarget(kind="deployment", namespace="inference", name="tiny-llama"),
                     "/apis/apps/v1/namespaces/inference/deployments/tiny-llama/scale",
                     id="deployment"),
        pytest.param(ScaleTarget(kind="statefulset", namespace="gpu", name="vllm-70b"),
                     "/apis/apps/v1/namespaces/gpu/statefulsets/vllm-70b/scale",
                     id="statefulset"),
    ],
)
def test_kubernetes_scaler_sends_scale_subresource_patch(target: ScaleTarget, path: str) -> None:
    api, pool = fake_client({"apiVersion": "autoscaling/v1", "kind": "Scale",
                             "metadata": {"name": target.name, "namespace": target.namespace},
                             "spec": {"replicas": 5}, "status": {"replicas": 3}})
    KubernetesScaler(api).scale(target, 5)
    [call] = pool.calls
    assert call["method"] == "PATCH"
    assert call["url"] == "https://k8s.test:6443" + path
    headers = {k.lower(): v for k, v in call["headers"].items()}
    assert headers["content-type"] == "application/strategic-merge-patch+json"
    assert headers["authorization"] == "Bearer token-123"
    assert json.loads(call["body"]) == {"spec": {"replicas": 5}}


def test_kubernetes_scaler_http_error_becomes_infra_error() -> None:
    from kubernetes import client

    api, pool = fake_client({})
    pool.request = lambda method, url, **kw: urllib3.HTTPResponse(  # type: ignore[method-assign]
        body=b'{"kind":"Status","code":404}', status=404, reason="Not Found",
        headers={"Content-Type": "application/json"}, preload_content=False)
    with pytest.raises(InfraError, match="HTTP 404"):
        KubernetesScaler(api).scale(ScaleTarget(kind="deployment", namespace="a", name="b"), 1)
    assert client  # imported: the optional extra is installed here


@pytest.mark.parametrize("spec", ["m", "m=deployment/ns", "m=daemonset/ns/n", "m=deployment/NS/n"])
def test_parse_target_rejects_malformed(spec: str) -> None:
    with pytest.raises(InfraError):
        parse_target(spec)


def test_parse_target_ok() -> None:
    assert parse_target("tiny-llama=statefulset/gpu/vllm") == (
        "tiny-llama", ScaleTarget(kind="statefulset", namespace="gpu", name="vllm"))
