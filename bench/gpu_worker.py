"""GPU check: the worker's request loop over the vLLM and transformers engines, tiny model.

    python -m bench.gpu_worker [--engines vllm,transformers] [--n 256] [--tokens 128]

For each engine, on a tiny random-weight Llama built here (workers.tinymodel):

- **direct**: ``n`` greedy requests of ``tokens`` output tokens straight into
  ``engine.generate``, all at once -> output tokens/s (median of ``repeat``
  runs, alternating with the worker runs);
- **worker**: the same requests through :class:`workers.worker.ShardWorker`'s
  request loop, fed by :class:`workers.filesource.FileShardConsumer` (the
  GPU host has no Java, so no Kafka broker: the file source sits behind the
  worker's ``consumer=`` seam) and answering into a ``MemoryEventSink``
  -> output tokens/s, and the ratio worker / direct;
- **probe wait**: ``fill`` long requests fill the batch (and queue behind
  it), then one 1-token probe arrives; its wall latency, sent at
  :data:`PROBE_PRIORITY` (priority scheduling) and at normal priority
  (arrival order). vLLM also runs a second engine with
  ``scheduling_policy="fcfs"``, where every request is served in arrival order.

Prints one JSON line per measurement as it lands (a timeout still leaves
results), then a table and a final ``RESULT {json}`` line. The process
ends with ``os._exit``: a finished vLLM process can hang at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from schemas.cost import CostModel
from schemas.events import InferenceRequest, SamplingParams
from streams.codec import encode
from streams.sink import MemoryEventSink
from workers.engines.base import PROBE_PRIORITY, REQUEST_PRIORITY, Engine
from workers.filesource import FileShardConsumer
from workers.tinymodel import TinyModelSpec, make_tiny_model
from workers.worker import ShardWorker

MODEL = "tiny-llama"
GREEDY = SamplingParams(temperature=0.0)
# Big enough for vLLM's attention kernels (head_dim 64), small enough to start fast.
GPU_SPEC = TinyModelSpec(vocab_size=1024, hidden_size=256, intermediate_size=512,
                         num_layers=4, num_heads=4, num_kv_heads=2, max_positions=1024)
results: list[dict[str, Any]] = []


def emit(**row: Any) -> None:
    results.append(row)
    print(json.dumps(row), flush=True)


def make_requests(n: int, tokens: int, tag: str) -> list[InferenceRequest]:
    return [InferenceRequest(request_id=f"{tag}-{i}", tenant="bench", model=MODEL,
                             prompt=f"c{i % 10}x{i} tok tok tok hello world {i}",
                             max_tokens=tokens, sampling=GREEDY) for i in range(n)]


async def direct(engine: Engine, n: int, tokens: int, tag: str) -> tuple[int, float]:
    requests = make_requests(n, tokens, tag)
    start = time.perf_counter()
    gens = await asyncio.gather(*(engine.generate(r, priority=REQUEST_PRIORITY["normal"])
                                  for r in requests))
    elapsed = time.perf_counter() - start
    return sum(len(g.token_ids) for g in gens), elapsed


async def via_worker(engine: Engine, n: int, tokens: int, tag: str,
                     workdir: Path) -> tuple[int, float]:
    path = workdir / f"{tag}.jsonl"
    with path.open("wb") as f:
        for request in make_requests(n, tokens, tag):
            f.write(encode(request) + b"\n")
    sink = MemoryEventSink()
    # Capacity far above the work: the gate must not be what limits throughput here.
    worker = ShardWorker(bootstrap="file", model=MODEL, engine=engine, sink=sink,
                         cost=CostModel(capacity_mu_per_min=1e12), max_batch=n,
                         max_in_flight=n, consumer=FileShardConsumer(path, model=MODEL))
    before = engine.stats().tokens_generated
    stop = asyncio.Event()
    start = time.perf_counter()
    task = asyncio.create_task(worker.run(stop))
    while worker.completed < n:
        if task.done():
            task.result()  # raises what stopped the worker
            raise RuntimeError(f"worker stopped after {worker.completed} of {n} requests")
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - start
    stop.set()
    await task
    # Engine-counted tokens: includes any health probe the worker sent (1 token each).
    return engine.stats().tokens_generated - before, elapsed


async def probe_wait(engine: Engine, fill: int, tokens: int, priority: int,
                     tag: str) -> float:
    fills = [asyncio.create_task(engine.generate(r, priority=REQUEST_PRIORITY["normal"]))
             for r in make_requests(fill, tokens, tag)]
    # The batch is full once the engine is producing tokens for it.
    deadline = time.perf_counter() + 60
    before = engine.stats().tokens_generated
    while engine.stats().tokens_generated - before < fill // 4:
        if time.perf_counter() > deadline:
            raise RuntimeError("fill requests produced no tokens within 60 s")
        await asyncio.sleep(0.002)
    probe = InferenceRequest(request_id=f"{tag}-probe", tenant="bench", model=MODEL,
                             prompt="probe", max_tokens=1, sampling=GREEDY)
    start = time.perf_counter()
    await engine.generate(probe, priority=priority)
    waited = time.perf_counter() - start
    for task in fills:  # cancelling aborts them in the engine: no need to finish the fill
        task.cancel()
    await asyncio.gather(*fills, return_exceptions=True)
    return waited


def build_engine(name: str, model_dir: Path, max_batch: int, policy: str) -> Engine:
    if name == "vllm":
        from workers.engines.vllm_engine import VllmEngine

        return VllmEngine(model_dir, max_batch=max_batch, policy="fcfs" if policy == "fcfs"
                          else "priority", max_model_len=1024, gpu_memory_utilization=0.3,
                          dtype="bfloat16", ignore_eos=True)
    from workers.engines.hf import TransformersEngine

    return TransformersEngine(model_dir, max_batch=max_batch)


async def bench_engine(name: str, model_dir: Path, args: argparse.Namespace,
                       workdir: Path) -> None:
    t0 = time.perf_counter()
    engine = build_engine(name, model_dir, args.n, "priority")
    try:
        # The first request starts the engine (and raises why, if it cannot start).
        await direct(engine, 16, 8, f"{name}-warm")
        emit(engine=name, what="startup_s", value=round(time.perf_counter() - t0, 1))
        if not await engine.health():
            raise RuntimeError(f"{name} engine is not healthy after start")
        # Alternate the order (direct first, then worker first) so that neither
        # side gains from running second on a warmer engine; report medians.
        direct_runs: list[float] = []
        worker_runs: list[float] = []
        for r in range(args.repeat):
            for side in (("direct", "worker") if r % 2 == 0 else ("worker", "direct")):
                tag = f"{name}-{side}{r}"
                if side == "direct":
                    tok, s = await direct(engine, args.n, args.tokens, tag)
                    direct_runs.append(tok / s)
                else:
                    tok, s = await via_worker(engine, args.n, args.tokens, tag, workdir)
                    worker_runs.append(tok / s)
        d, w = statistics.median(direct_runs), statistics.median(worker_runs)
        emit(engine=name, what="direct_tok_s", value=round(d, 1),
             runs=[round(x, 1) for x in direct_runs], requests=args.n, tokens=args.tokens)
        emit(engine=name, what="worker_tok_s", value=round(w, 1),
             runs=[round(x, 1) for x in worker_runs], ratio=round(w / d, 3))
        for label, prio, tag in (("priority (probe at PROBE_PRIORITY)", PROBE_PRIORITY, "pp"),
                                 ("arrival order (probe at normal)",
                                  REQUEST_PRIORITY["normal"], "pn")):
            waits = [await probe_wait(engine, args.fill, args.tokens, prio, f"{name}-{tag}{r}")
                     for r in range(args.repeat)]
            emit(engine=name, what="probe_wait_s", scheduling=label, fill=args.fill,
                 value=round(statistics.median(waits), 4), runs=[round(x, 4) for x in waits])
    finally:
        await engine.close()
    if name == "vllm" and not args.no_fcfs:
        t0 = time.perf_counter()
        engine = build_engine(name, model_dir, args.n, "fcfs")
        try:
            await direct(engine, 16, 8, f"{name}-fwarm")
            emit(engine=name, what="startup_s_fcfs", value=round(time.perf_counter() - t0, 1))
            waits = [await probe_wait(engine, args.fill, args.tokens, PROBE_PRIORITY,
                                      f"{name}-ff{r}") for r in range(args.repeat)]
            emit(engine=name, what="probe_wait_s", scheduling="vllm fcfs policy",
                 fill=args.fill, value=round(statistics.median(waits), 4),
                 runs=[round(x, 4) for x in waits])
        finally:
            await engine.close()


def table() -> str:
    lines = [f"{'engine':<13}{'measure':<50}{'value':>12}"]
    for row in results:
        what = row["what"]
        if what == "probe_wait_s":
            what = f"probe wait s, {row['scheduling']}, fill {row['fill']}"
        elif what == "worker_tok_s":
            what = f"worker tok/s (ratio to direct {row['ratio']})"
        lines.append(f"{row['engine']:<13}{what:<50}{row['value']:>12}")
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir = workdir / "tiny"
        built = make_tiny_model(model_dir, GPU_SPEC)
        emit(engine="-", what="model_parameters", value=built.parameters)
        for name in args.engines.split(","):
            try:
                await bench_engine(name, model_dir, args, workdir)
            except Exception as exc:  # report and go on to the next engine
                emit(engine=name, what="error", value=repr(exc)[:500])
    print(table(), flush=True)
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", default="vllm,transformers")
    parser.add_argument("--n", type=int, default=256, help="requests per throughput run")
    parser.add_argument("--tokens", type=int, default=128, help="output tokens per request")
    parser.add_argument("--fill", type=int, default=1024, help="requests ahead of the probe")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--no-fcfs", action="store_true", help="skip vLLM's fcfs engine")
    asyncio.run(main(parser.parse_args()))
    sys.stdout.flush()
    os._exit(0)
