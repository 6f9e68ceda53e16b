"""The main job (for now): stack up, admission agent, echo worker, requests end to end."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import Callable

from infra import InfraError, procs
from infra.stack import down, up
from schemas.config import Settings
from schemas.events import InferenceRequest, InferenceResult, Rejection, Reply
from streams import StreamsError
from streams.client import TokenweirClient

Say = Callable[[str], None]

PROMPTS = [
    "Kafka keeps the request log durable and ordered per tenant",
    "model units price prefill and decode in one currency",
    "sticky sessions keep a conversation on one shard",
    "the worker commits offsets only after its results are acknowledged",
]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "infra.cli", *args]


def start_pipeline(settings: Settings, agent: str = "admission") -> list[str]:
    """Start the agent and one echo worker per model; their process names."""
    run_dir, logs = settings.run_dir(), settings.state_dir / "logs"
    env = {**os.environ, **settings.to_env()}
    names = [f"agent-{agent}"]
    procs.spawn(run_dir, f"agent-{agent}", _cli("agent", agent),
                log_path=logs / f"agent-{agent}.log", env=env)
    for model in settings.models:
        name = f"worker-{model}-0"
        procs.spawn(run_dir, name, _cli("worker", "--model", model, "--engine", "echo"),
                    log_path=logs / f"{name}.log", env=env)
        names.append(name)
    return names


DEMO_CONFIG = """\
# Demo profile: requests are not signed here, so authentication is off
# explicitly. Production configs keep auth_required = true and list keys.
auth_required = false

[models.tiny-llama]
alpha = 0.001
beta = 0.01
capacity_mu_per_min = 6000

[default_tenant]
limit_mu_per_min = 600
burst_mu = 100
"""


def demo_settings(settings: Settings) -> Settings:
    """The demo's control-plane file, unless one is configured."""
    if settings.control_config is not None:
        return settings
    path = settings.state_dir / "demo-control.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(DEMO_CONFIG)
    return settings.model_copy(update={"control_config": path.resolve()})


async def run_demo(settings: Settings, say: Say, *, n_requests: int, keep_running: bool) -> None:
    settings = demo_settings(settings)
    await up(settings, say)
    names = start_pipeline(settings)
    say(f"started {', '.join(names)}; logs in {settings.state_dir / 'logs'}")
    try:
        await _send(settings, say, n_requests)
    finally:
        if keep_running:
            say("stack left running; `tokenweir down` stops it")
        else:
            down(settings, say)


async def submit_honouring_retry_after(client: TokenweirClient, request: InferenceRequest,
                                      attempts: int = 30) -> Reply:
    """Submit; on an over-capacity rejection wait its retry-after and resubmit (new id)."""
    reply: Reply = await client.submit(request, timeout_s=120)
    for _ in range(attempts):
        if not isinstance(reply, Rejection) or reply.reason != "over_capacity":
            break
        await asyncio.sleep(reply.retry_after_s or 1.0)
        request = request.model_copy(update={"request_id": uuid.uuid4().hex})
        reply = await client.submit(request, timeout_s=120)
    return reply


async def _send(settings: Settings, say: Say, n_requests: int) -> None:
    requests = [
        InferenceRequest(tenant=f"tenant-{i % 3}", model=settings.models[i % len(settings.models)],
                         prompt=PROMPTS[i % len(PROMPTS)], max_tokens=8,
                         session_key=f"session-{i % 2}")
        for i in range(n_requests)
    ]
    started = time.monotonic()
    async with TokenweirClient(settings.bootstrap) as client:
        # The first request also waits for the agent's and worker's group joins.
        try:
            replies = await asyncio.gather(*(submit_honouring_retry_after(client, r)
                                             for r in requests))
        except StreamsError as exc:
            raise InfraError(f"demo request failed: {exc}") from exc
    say(f"{'request':<34} {'tenant':<9} {'status':<9} {'shard':>5}  text")
    for req, reply in zip(requests, replies, strict=True):
        if isinstance(reply, InferenceResult):
            say(f"{req.request_id:<34} {req.tenant:<9} {reply.status:<9} {reply.shard!s:>5}  "
                f"{reply.text}")
        else:
            say(f"{req.request_id:<34} {req.tenant:<9} {'rejected':<9} {'-':>5}  {reply.reason}")
    say(f"{len(replies)} replies in {time.monotonic() - started:.1f}s")
