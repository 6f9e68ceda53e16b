"""The file-fed shard source: the worker's request loop served from a JSON-lines file,
as the GPU check (bench/gpu_worker.py) runs it on hosts without a Kafka broker."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiokafka import TopicPartition
from pydantic import TypeAdapter

from schemas.cost import CostModel
from schemas.events import InferenceRequest, InferenceResult
from streams.codec import decode, encode
from streams.sink import MemoryEventSink
from streams.topics import shard_topic
from workers.engines import make_engine
from workers.filesource import FileShardConsumer
from workers.worker import ShardWorker

MODEL = "file-model"
RESULT: TypeAdapter[InferenceResult] = TypeAdapter(InferenceResult)


def request(i: int) -> InferenceRequest:
    return InferenceRequest(request_id=f"f{i}", tenant="t", model=MODEL, prompt=f"hello {i}",
                            max_tokens=4)


async def answered_count(worker: ShardWorker, n: int) -> None:
    while True:  # the worker offers no event for this; poll its counter
        if worker.completed >= n:
            return
        await asyncio.sleep(0.01)


async def test_worker_serves_a_file_and_picks_up_appended_lines(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b"".join(encode(request(i)) + b"\n" for i in range(5)))
    consumer = FileShardConsumer(path, model=MODEL)
    sink = MemoryEventSink()
    worker = ShardWorker(bootstrap="file", model=MODEL, engine=make_engine(
        "echo", model=MODEL, cost=CostModel()), sink=sink, consumer=consumer,
        commit_interval_s=0.01)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    async with asyncio.timeout(10):
        await answered_count(worker, 5)
        with path.open("ab") as f:  # a line written in two pieces arrives once, whole
            raw = encode(request(5))
            f.write(raw[:10])
            f.flush()
            await asyncio.sleep(0.05)
            f.write(raw[10:] + b"\n")
        await answered_count(worker, 6)
        stop.set()
        await task
    answered = {decode(r.value, RESULT).request_id for r in sink.on("tw.responses")}
    assert answered == {f"f{i}" for i in range(6)}
    assert consumer.committed == 6  # every line answered, flushed and committed
    assert consumer.assignment() == {TopicPartition(shard_topic(MODEL), 0)}
