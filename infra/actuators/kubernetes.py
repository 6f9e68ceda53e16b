"""The Kubernetes actuator: ScaleDecisions set the scale subresource of a Deployment or
StatefulSet, through the official client (``pip install tokenweir[kubernetes]``).

Each decision becomes one ``PATCH /apis/apps/v1/namespaces/<ns>/<deployments|statefulsets>
/<name>/scale`` with body ``{"spec": {"replicas": n}}`` (a strategic merge patch):
only the replica count is written, so the Deployment's own rollout settings, and an
HPA-free cluster's view of it, are untouched.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from infra import InfraError
from infra.actuators.base import follow_decisions
from schemas.config import Settings
from schemas.events import ScaleDecision

log = logging.getLogger(__name__)

Kind = Literal["deployment", "statefulset"]
_K8S_NAME = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"  # DNS-1123 subdomain


class ScaleTarget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind
    namespace: str = Field(pattern=_K8S_NAME)
    name: str = Field(pattern=_K8S_NAME)


def parse_target(spec: str) -> tuple[str, ScaleTarget]:
    """``MODEL=KIND/NAMESPACE/NAME`` (KIND: deployment or statefulset)."""
    model, sep, rest = spec.partition("=")
    parts = rest.split("/")
    if not sep or not model or len(parts) != 3:
        raise InfraError(f"target {spec!r}: expected MODEL=KIND/NAMESPACE/NAME")
    kind, namespace, name = parts
    if kind not in ("deployment", "statefulset"):
        raise InfraError(f"target {spec!r}: kind must be deployment or statefulset")
    try:
        return model, ScaleTarget(kind=kind, namespace=namespace, name=name)  # type: ignore[arg-type]
    except ValueError as exc:
        raise InfraError(f"target {spec!r}: {exc}") from exc


def scale_body(replicas: int) -> dict[str, Any]:
    return {"spec": {"replicas": replicas}}


class KubernetesScaler:
    """One call per decision through ``AppsV1Api`` (synchronous client, run off the loop)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self._apps = client.AppsV1Api(api_client)
        self._api_exception: type[Exception] = client.exceptions.ApiException

    def scale(self, target: ScaleTarget, replicas: int) -> None:
        patch = (self._apps.patch_namespaced_deployment_scale if target.kind == "deployment"
                 else self._apps.patch_namespaced_stateful_set_scale)
        try:
            patch(name=target.name, namespace=target.namespace, body=scale_body(replicas))
        except self._api_exception as exc:
            status = getattr(exc, "status", "?")
            raise InfraError(f"scaling {target.kind} {target.namespace}/{target.name} to "
                             f"{replicas}: HTTP {status} {getattr(exc, 'reason', '')}") from exc


def api_client(*, kubeconfig: str | None = None, context: str | None = None,
               in_cluster: bool = False) -> Any:
    try:
        from kubernetes import client, config
    except ImportError as exc:
        raise InfraError("the kubernetes actuator needs `pip install tokenweir[kubernetes]`"
                         ) from exc
    try:
        if in_cluster:
            config.load_incluster_config()
        else:
            config.load_kube_config(config_file=kubeconfig, context=context)
    except config.ConfigException as exc:
        raise InfraError(f"kubernetes configuration: {exc}") from exc
    return client.ApiClient()


class KubernetesActuator:
    def __init__(self, scaler: KubernetesScaler, targets: dict[str, ScaleTarget]) -> None:
        self.scaler = scaler
        self.targets = targets
        self.applied: list[tuple[str, int]] = []  # (model, replicas) set, in order

    async def apply(self, decision: ScaleDecision) -> None:
        target = self.targets.get(decision.model)
        if target is None:
            return
        try:
            await asyncio.to_thread(self.scaler.scale, target, decision.desired)
        except InfraError as exc:
            # The next decision (re-sent every resend_s) retries; the actuator stays up.
            log.error("actuator: %s", exc)
            return
        self.applied.append((decision.model, decision.desired))
        log.warning("actuator: %s %s/%s scaled to %d (%s)", target.kind, target.namespace,
                    target.name, decision.desired, decision.reason)


async def run_kubernetes(settings: Settings, targets: dict[str, ScaleTarget],
                         stop: asyncio.Event, *, api: Any) -> None:
    actuator = KubernetesActuator(KubernetesScaler(api), targets)
    await follow_decisions(settings.bootstrap, stop, actuator.apply)
