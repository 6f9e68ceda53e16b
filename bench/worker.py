"""Worker overhead: output tokens/s through the Kafka shard worker ÷ a direct engine call.

For each engine (``sim``, and ``transformers`` on the tiny local model), in
one process and one run:

- direct: ``N`` requests submitted to the engine together (``asyncio.gather``
  over ``engine.generate``), timed from submission to the last generation;
- worker: the same ``N`` requests (fresh ids, same prompts, greedy) produced
  to ``tw.shard.<model>`` on a throwaway broker, served by a
  :class:`workers.worker.ShardWorker` running in this process on the very
  same engine object, timed from the first produce to the last result read
  back from the reply topic.

``N`` is 64 requests of 64 greedy tokens, for ``sim`` at a time scale that
makes a run last about 2.5 s, and for ``transformers`` on a tiny model built
by :mod:`workers.tinymodel` with hidden size 256 and 4 layers (4.5 M
parameters, some 1,700 tokens/s on one core: about 2.5 s a run too).

Why not the 64-wide default tiny model: it decodes about 9,000 tokens/s on
one core, so a request's whole generation costs the engine some 7 ms of CPU,
and on this benchmark's CPU-only host the broker and the Kafka clients take
their share of the very cores the engine computes on (about 1-2 ms of CPU
per request, broker included; measured per thread and for the broker
process). That measures the price of Kafka on a CPU shared with the engine,
not whether the worker keeps the engine busy: with ``--tiny-hidden 64
--tiny-intermediate 128 --tiny-layers 2 --transformers-requests 256`` the
ratio comes out near 0.9 (0.81-0.93 run by run on a 2-core machine), while
the engine's batches are just as full as in the direct run and the gaps
between them add up to under 1% of it. On a GPU host the engine's work is not
on those cores.

Both see the whole load at once: the direct run submits every request at
t=0, and the producer sends the ``N`` records back to back, flushed once
(``linger_ms`` groups them into a few produce requests), so that the worker,
too, can hand the engine a full batch at once. That matters for the
transformers engine, whose static batches take whoever is queued when a batch
starts.

Runs alternate (direct, worker, direct, worker, ...) after a warm-up of each
(group join, model load, first torch calls) and the ratio is that of the
best run of each mode: on a shared machine other load only ever slows a run
down, and short alternating runs let both modes meet its quiet moments. The
summary also lists each worker run over the direct run just before it, which
shows how noisy the machine was. torch gets one thread: the
event loop, the Kafka clients and the broker need the other core, as a GPU
host's CPU does. The sim engine runs at ``--sim-time-scale`` so that a run
lasts seconds and Kafka's fixed costs weigh what they would in production.

Prints a table, then the JSON summary as the last stdout line. Progress goes
to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from pydantic import TypeAdapter

from bench.harness import bench_stack, log
from schemas.config import Settings
from schemas.cost import CostModel
from schemas.events import InferenceRequest, InferenceResult, Reply, SamplingParams
from streams.codec import decode
from streams.sink import KafkaEventSink
from streams.topics import shard_topic
from workers.engines.base import Engine
from workers.worker import ShardWorker

REPLIES = "tw.bench.worker.replies"
COST = CostModel()  # the sim engine's speed: 6000 MU/min, β = 0.01 MU per output token
_REPLY: TypeAdapter[Reply] = TypeAdapter(Reply)
_WORDS = ("tokens", "flow", "through", "kafka", "to", "the", "engine", "and", "back", "again")


@dataclass(frozen=True)
class Run:
    engine: str
    mode: str  # direct | worker
    requests: int
    tokens: int  # output tokens
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def tiny_spec(args: argparse.Namespace) -> Any:
    from workers.tinymodel import TinyModelSpec

    return TinyModelSpec(hidden_size=args.tiny_hidden, intermediate_size=args.tiny_intermediate,
                         num_layers=args.tiny_layers)


def make_requests(model: str, n: int, max_tokens: int, tag: str) -> list[InferenceRequest]:
    # Prompts of different lengths (padding and prefill as in real batches), the same each run.
    return [InferenceRequest(request_id=f"{tag}-{i}", tenant="bench", model=model,
                             prompt=f"request {i}: " + " ".join(
                                 _WORDS[(i + j) % len(_WORDS)] for j in range(8 + i % 24)),
                             max_tokens=max_tokens, sampling=SamplingParams(temperature=0.0),
                             reply_topic=REPLIES)
            for i in range(n)]


async def direct(name: str, engine: Engine, requests: list[InferenceRequest]) -> Run:
    started = time.perf_counter()
    generations = await asyncio.gather(*(engine.generate(r) for r in requests))
    seconds = time.perf_counter() - started
    return Run(name, "direct", len(requests), sum(len(g.token_ids) for g in generations),
               seconds)


class Replies:
    """Results read back from the reply topic, by request id."""

    def __init__(self, bootstrap: str) -> None:
        # Default long polling: the broker answers a fetch as soon as a reply lands,
        # and a short fetch_max_wait_ms would only spin the broker and this loop.
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self._tp = TopicPartition(REPLIES, 0)

    async def start(self) -> None:
        await self._consumer.start()
        self._consumer.assign([self._tp])
        await self._consumer.seek_to_end(self._tp)
        await self._consumer.position(self._tp)

    async def stop(self) -> None:
        await self._consumer.stop()

    async def collect(self, ids: set[str], timeout_s: float) -> dict[str, InferenceResult]:
        got: dict[str, InferenceResult] = {}
        async with asyncio.timeout(timeout_s):
            while len(got) < len(ids):
                for records in (await self._consumer.getmany(timeout_ms=100)).values():
                    for record in records:
                        reply = decode(record.value, _REPLY)
                        if not isinstance(reply, InferenceResult) or reply.status != "ok":
                            raise RuntimeError(f"request failed: {reply}")
                        if reply.request_id in ids:
                            got.setdefault(reply.request_id, reply)
        return got


async def through_worker(name: str, producer: KafkaEventSink, replies: Replies,
                         requests: list[InferenceRequest], timeout_s: float) -> Run:
    topic = shard_topic(requests[0].model)
    started = time.perf_counter()
    for r in requests:
        await producer.send(topic, r, key=r.request_id, partition=0)
    await producer.flush()
    results = await replies.collect({r.request_id for r in requests}, timeout_s)
    seconds = time.perf_counter() - started
    return Run(name, "worker", len(requests),
               sum(r.usage.output_tokens for r in results.values()), seconds)


async def create_topics(bootstrap: str, topics: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name=t, num_partitions=1, replication_factor=1)
                                   for t in topics])
    finally:
        await admin.close()


async def bench_engine(settings: Settings, name: str, engine: Engine, args: argparse.Namespace
                       ) -> list[Run]:
    model = f"bench-{name}"
    await create_topics(settings.bootstrap, [shard_topic(model)])
    worker_sink = KafkaEventSink(settings.bootstrap, client_id=f"bench-worker-{name}")
    producer = KafkaEventSink(settings.bootstrap, linger_ms=5, client_id=f"bench-{name}")
    replies = Replies(settings.bootstrap)
    for part in (worker_sink, producer, replies):
        await part.start()
    stop = asyncio.Event()
    worker = ShardWorker(bootstrap=settings.bootstrap, model=model, engine=engine,
                         sink=worker_sink, cost=COST, worker_id=f"bench-{name}",
                         max_batch=args.max_batch)
    serving = asyncio.create_task(worker.run(stop))
    runs: list[Run] = []
    try:
        log(f"{name}: warming up (group join, engine start)")
        warm = make_requests(model, args.max_batch, args.max_tokens, f"{name}-warm")
        await direct(name, engine, warm)
        await through_worker(name, producer, replies,
                             make_requests(model, args.max_batch, args.max_tokens,
                                           f"{name}-warm-k"), timeout_s=120)
        n = getattr(args, f"{name}_requests")
        for rep in range(args.repeats):
            requests = make_requests(model, n, args.max_tokens, f"{name}-d{rep}")
            runs.append(await direct(name, engine, requests))
            log(f"{name}: direct {runs[-1].tokens_per_s:.0f} tokens/s "
                f"({runs[-1].seconds:.2f}s)")
            requests = make_requests(model, n, args.max_tokens, f"{name}-w{rep}")
            if serving.done():
                serving.result()
                raise RuntimeError("the worker stopped")
            runs.append(await through_worker(name, producer, replies, requests,
                                             timeout_s=600))
            log(f"{name}: worker {runs[-1].tokens_per_s:.0f} tokens/s "
                f"({runs[-1].seconds:.2f}s)")
    finally:
        stop.set()
        await serving
        for part in (replies, producer, worker_sink):
            await part.stop()
        await engine.close()
    if {r.tokens for r in runs} != {runs[0].tokens}:
        # Greedy: the same prompts give the same tokens however they reach the engine.
        raise RuntimeError(f"{name}: output token counts differ between runs: {runs}")
    return runs


def best(runs: list[Run], name: str, mode: str) -> Run:
    return max((r for r in runs if r.engine == name and r.mode == mode),
               key=lambda r: r.tokens_per_s)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from workers.engines.hf import TransformersEngine
    from workers.engines.sim import SimEngine
    from workers.tinymodel import make_tiny_model

    torch.set_num_threads(1)
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="tw-bench-worker-model-") as tmp:
        tiny = make_tiny_model(Path(tmp) / "tiny", tiny_spec(args))
        model_dir = tiny.directory
        async with bench_stack("worker", "", port=args.port) as settings:
            await create_topics(settings.bootstrap, [REPLIES])
            if "sim" in args.engines:
                sim = SimEngine(COST, seed=0, max_batch=args.max_batch,
                                time_scale=args.sim_time_scale)
                runs += await bench_engine(settings, "sim", sim, args)
            if "transformers" in args.engines:
                hf = TransformersEngine(model_dir, max_batch=args.max_batch, device="cpu")
                runs += await bench_engine(settings, "transformers", hf, args)

    print(f"{'engine':<13} {'mode':<7} {'requests':>8} {'tokens':>7} {'seconds':>8} "
          f"{'tokens/s':>9}")
    for r in runs:
        print(f"{r.engine:<13} {r.mode:<7} {r.requests:>8} {r.tokens:>7} {r.seconds:>8.2f} "
              f"{r.tokens_per_s:>9.0f}")
    summary: dict[str, Any] = {"bench": "worker"}
    for name in args.engines:
        d, w = best(runs, name, "direct"), best(runs, name, "worker")
        print(f"{name}: worker / direct = {w.tokens_per_s / d.tokens_per_s:.3f} "
              f"(best of {args.repeats} each)")
        # Each worker run over the direct run just before it: the spread shows the noise.
        mine = [r for r in runs if r.engine == name]
        paired = [round(b.tokens_per_s / a.tokens_per_s, 3) for a, b in zip(mine[::2], mine[1::2],
                                                                              strict=True)]
        summary |= {f"{name}_ratio": round(w.tokens_per_s / d.tokens_per_s, 3),
                    f"{name}_paired_ratios": paired,
                    f"{name}_worker_tokens_per_s": round(w.tokens_per_s, 1),
                    f"{name}_direct_tokens_per_s": round(d.tokens_per_s, 1),
                    f"{name}_requests": d.requests,
                    f"{name}_seconds_per_run": round(d.seconds, 2)}
    if "transformers" in args.engines:
        summary["transformers_model"] = (f"tiny: hidden {args.tiny_hidden}, intermediate "
                                         f"{args.tiny_intermediate}, {args.tiny_layers} layers, "
                                         f"{tiny.parameters} parameters")
    summary |= {"max_tokens": args.max_tokens,
                "max_batch": args.max_batch, "repeats": args.repeats,
                "sim_time_scale": args.sim_time_scale}
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", choices=("sim", "transformers"),
                        default=["sim", "transformers"])
    parser.add_argument("--sim-requests", type=int, default=64, help="N per sim run")
    parser.add_argument("--transformers-requests", type=int, default=64,
                        help="N per transformers run")
    parser.add_argument("--tiny-hidden", type=int, default=256)
    parser.add_argument("--tiny-intermediate", type=int, default=1024)
    parser.add_argument("--tiny-layers", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16,
                        help="Engine batch size; the worker holds twice this many requests.")
    parser.add_argument("--repeats", type=int, default=8, help="Runs of each mode, alternating.")
    parser.add_argument("--sim-time-scale", type=float, default=6.0,
                        help="Wall seconds per simulated second (6: about 2.5 s a run).")
    parser.add_argument("--port", type=int, default=29192, help="The throwaway broker's port.")
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
