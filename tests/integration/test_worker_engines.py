"""Same prompt, greedy sampling: the same tokens through a shard worker on the real broker
as from a direct call on a separate engine instance, for the sim and transformers engines.

Requests go straight to ``tw.shard.<model>`` partition 0 (no admission agent), on a
model name of each test's own, so that no other worker (the ``pipeline`` fixture's echo
worker serves ``tiny-llama``) shares the topic or the consumer group.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from infra import procs
from schemas.config import Settings
from schemas.cost import CostModel
from schemas.events import InferenceRequest, InferenceResult, Reply, SamplingParams
from streams.client import TokenweirClient
from streams.sink import KafkaEventSink
from streams.topics import shard_topic
from workers.engines.base import Engine, Generation
from workers.worker import ShardWorker

COST = CostModel(alpha=0.001, beta=0.01, gamma=0.5, delta=0.0, capacity_mu_per_min=600.0)
PROMPTS = [
    "hello there world",
    "The quick brown fox jumps over the lazy dog, then keeps running for a very long while",
    "a",
    "tenant acme asks for model units",
]


async def create_shard_topic(settings: Settings, model: str) -> str:
    topic = shard_topic(model)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name=topic, num_partitions=1, replication_factor=1)])
    except TopicAlreadyExistsError:
        pass
    finally:
        await admin.close()
    return topic


def build_engine(name: str, tiny_model_dir: Path | None) -> Engine:
    if name == "transformers":
        from workers.engines.hf import TransformersEngine

        assert tiny_model_dir is not None
        return TransformersEngine(tiny_model_dir, max_batch=8)
    from workers.engines.sim import SimEngine

    return SimEngine(COST, seed=3, max_batch=8, time_scale=0.01)


def requests_for(model: str) -> list[InferenceRequest]:
    return [InferenceRequest(tenant="acme", model=model, prompt=p, max_tokens=12 + i,
                             sampling=SamplingParams(temperature=0.0))
            for i, p in enumerate(PROMPTS)]


async def direct(engine: Engine, requests: list[InferenceRequest]) -> list[Generation]:
    """One request at a time, on an engine no worker touches."""
    try:
        return [await engine.generate(r) for r in requests]
    finally:
        await engine.close()


async def through_kafka(settings: Settings, model: str, requests: list[InferenceRequest]
                        ) -> list[Reply]:
    """Produce the requests together to the shard topic; their replies, in order."""
    async with TokenweirClient(settings.bootstrap, request_topic=shard_topic(model)) as client:
        futures = [await client.send(r) for r in requests]
        return list(await asyncio.wait_for(asyncio.gather(*futures), 180))


def assert_same(replies: list[Reply], expected: list[Generation], worker: str) -> None:
    for reply, gen in zip(replies, expected, strict=True):
        assert isinstance(reply, InferenceResult), reply
        assert reply.status == "ok", reply.error
        assert reply.token_ids == gen.token_ids and reply.text == gen.text
        assert reply.finish_reason == gen.finish_reason == "length"
        assert reply.usage.input_tokens == gen.input_tokens
        assert reply.usage.output_tokens == len(gen.token_ids)
        assert (reply.worker, reply.shard) == (worker, 0)


@pytest.mark.parametrize("name", ["sim", "transformers"])
async def test_worker_gives_the_same_greedy_tokens_as_a_direct_engine_call(
        settings: Settings, stack: Any, request: pytest.FixtureRequest, name: str) -> None:
    model_dir = request.getfixturevalue("tiny_model_dir") if name == "transformers" else None
    model = f"engine-{name}"
    await create_shard_topic(settings, model)
    requests = requests_for(model)
    expected = await direct(build_engine(name, model_dir), requests)

    engine = build_engine(name, model_dir)
    sink = KafkaEventSink(settings.bootstrap, client_id=f"test-worker-{model}")
    await sink.start()
    stop = asyncio.Event()
    worker = ShardWorker(bootstrap=settings.bootstrap, model=model, engine=engine, sink=sink,
                         cost=COST, worker_id=f"test-{model}", heartbeat_s=0.5)
    serving = asyncio.create_task(worker.run(stop))
    try:
        # Sent together: the worker fetches them in one batch and runs them
        # concurrently, so the transformers engine batches them (left padding).
        replies = await through_kafka(settings, model, requests)
    finally:
        stop.set()
        await serving
        await sink.stop()
        await engine.close()
    assert_same(replies, expected, f"test-{model}")
    assert worker.completed == len(requests)


async def test_worker_command_serves_a_transformers_model_dir(
        settings: Settings, stack: Any, tiny_model_dir: Path) -> None:
    model = "engine-transformers-cli"
    await create_shard_topic(settings, model)
    requests = requests_for(model)
    expected = await direct(build_engine("transformers", tiny_model_dir), requests)

    name = f"worker-{model}"
    env = {**os.environ, **settings.to_env(), "TOKENWEIR_MODELS": json.dumps([model]),
           "OMP_NUM_THREADS": "1"}
    procs.spawn(settings.run_dir(), name,
                [sys.executable, "-m", "infra.cli", "worker", "--model", model,
                 "--engine", "transformers", "--model-dir", str(tiny_model_dir),
                 "--worker-id", name],
                log_path=settings.state_dir / "logs" / f"{name}.log", env=env)
    try:
        replies = await through_kafka(settings, model, requests)
    finally:
        procs.stop(settings.run_dir(), name)
    assert_same(replies, expected, name)
