"""The main job (for now): stack up, pass-through agent, echo worker, requests end to end."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable

from infra import InfraError, procs
from infra.stack import down, up
from schemas.config import Settings
from schemas.events import InferenceRequest, InferenceResult
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


def start_pipeline(settings: Settings) -> list[str]:
    """Start the pass-through agent and one echo worker per model; their process names."""
    run_dir, logs = settings.run_dir(), settings.state_dir / "logs"
    env = {**os.environ, **settings.to_env()}
    names = ["agent-passthrough"]
    procs.spawn(run_dir, "agent-passthrough", _cli("agent", "passthrough"),
                log_path=logs / "agent-passthrough.log", env=env)
    for model in settings.models:
        name = f"worker-{model}-0"
        procs.spawn(run_dir, name, _cli("worker", "--model", model, "--engine", "echo"),
                    log_path=logs / f"{name}.log", env=env)
        names.append(name)
    return names


async def run_demo(settings: Settings, say: Say, *, n_requests: int, keep_running: bool) -> None:
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
            replies = await asyncio.gather(*(client.submit(r, timeout_s=120) for r in requests))
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
