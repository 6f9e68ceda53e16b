"""100% saturation with image preprocessing and long outputs: false verdicts and probe timeouts.

A stack of its own (Kafka on ``--port``, default 24192), the health agent (this
process) and ``--workers`` sim workers (``tokenweir worker`` processes, each
with a ``--preprocess-pool`` of image preprocessing processes) started with
``--probe-priority``. Requests go straight to the shard topic, each with one
JPEG and ``--max-tokens`` of output, and the producer keeps
``--backlog`` of them unanswered at all times: every worker's engine runs a
full batch with as many queued behind it, for ``--minutes``. No fault is
injected, so every ``unhealthy`` verdict is false.

Equal long requests finish in waves: between waves no request completes for
longer than the probe interval, so the workers probe. At ``high`` priority a
probe goes ahead of the queue (and displaces a running request for one
step); at ``normal`` it waits behind the whole queue, times out, and the
health agent calls a busy worker unhealthy.

Prints ``false_unhealthy`` (unhealthy verdicts), ``probe_timeouts`` (failed
probe results, each counted once), probe latencies, the longest gap between
two heartbeats of a worker and the requests completed. Last stdout line: one
JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import time
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from agents.health_agent import run_health_agent
from bench.hang import Fleet, background, until, watch
from bench.harness import bench_stack, log
from bench.multimodal import synthetic_jpeg
from infra import procs
from schemas.config import Settings
from schemas.events import InferenceRequest, InferenceResult, Reply, SamplingParams
from streams.client import TokenweirClient
from streams.topics import shard_topic

MODEL = "saturation-sim"
REPLIES = "tw.bench.saturation.replies"
PORT = int(os.environ.get("TOKENWEIR_TEST_PORT_BASE", "24000")) + 192
CONTROL = "auth_required = false\n"


def spawn_worker(settings: Settings, name: str, args: argparse.Namespace) -> None:
    env = {**os.environ, **settings.to_env()}
    procs.spawn(settings.run_dir(), name,
                [sys.executable, "-m", "infra.cli", "worker", "--model", MODEL, "--engine", "sim",
                 "--worker-id", name, "--max-batch", str(args.max_batch),
                 "--time-scale", str(args.time_scale), "--probe-priority", args.probe_priority,
                 "--preprocess-pool", str(args.preprocess_pool), "--drain-timeout", "2"],
                log_path=settings.state_dir / "logs" / f"{name}.log", env=env)


async def create_topics(settings: Settings) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    try:
        for name in (shard_topic(MODEL), REPLIES):
            try:
                await admin.create_topics([NewTopic(name=name, num_partitions=4,
                                                    replication_factor=1)])
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()


async def saturate(settings: Settings, args: argparse.Namespace, image_b64: str,
                   seconds: float, counts: dict[str, int]) -> None:
    """Keep ``args.backlog`` requests unanswered for ``seconds``."""
    outstanding: set[asyncio.Future[Reply]] = set()
    i = 0
    end = time.monotonic() + seconds
    async with TokenweirClient(settings.bootstrap, reply_topic=REPLIES,
                               request_topic=shard_topic(MODEL)) as client:
        while time.monotonic() < end:
            while len(outstanding) < args.backlog:
                request = InferenceRequest(
                    request_id=f"sat-{i}", tenant=f"t{i % 8}", model=MODEL,
                    prompt=f"describe image {i} at length", max_tokens=args.max_tokens,
                    images=[image_b64], reply_topic=REPLIES,
                    sampling=SamplingParams(temperature=0.0))
                outstanding.add(await client.send(request))
                i += 1
            done, _ = await asyncio.wait(outstanding, timeout=0.5,
                                         return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                outstanding.discard(future)
                reply = future.result()
                ok = isinstance(reply, InferenceResult) and reply.status == "ok"
                counts["completed" if ok else "failed"] += 1
        counts["sent"] = i


async def main(args: argparse.Namespace) -> dict[str, Any]:
    image_b64 = base64.b64encode(synthetic_jpeg(args.width, args.height)).decode()
    async with bench_stack("saturation", CONTROL, port=args.port, tenant_partitions=4) as base:
        settings = base.model_copy(update={"models": [MODEL]})
        await create_topics(settings)
        fleet = Fleet()
        stop = asyncio.Event()
        names = [f"sat-{args.probe_priority}-{i}" for i in range(args.workers)]
        counts = {"completed": 0, "failed": 0, "sent": 0}
        try:
            async with background(watch(settings.bootstrap, fleet),
                                  run_health_agent(settings.bootstrap, stop=stop)):
                for name in names:
                    spawn_worker(settings, name, args)
                log(f"saturation: waiting for {len(names)} workers (preprocessing pools start)")
                await until(lambda: all(n in fleet.beats and fleet.beats[n].shards
                                        for n in names)
                            and sum(len(fleet.beats[n].shards) for n in names) == 4,
                            "workers owning every shard", 300)
                started = time.time()
                beats_before = {n: fleet.beats[n].seq for n in names}
                log(f"saturation: {args.minutes:g} min at 100%, probes at {args.probe_priority} "
                    f"priority")
                await saturate(settings, args, image_b64, args.minutes * 60, counts)
                ended = time.time()
                gaps = _beat_gaps(fleet, names)
        finally:
            stop.set()
            for name in names:
                procs.stop(settings.run_dir(), name, timeout_s=15)
    probes = _probes(fleet, names, started, ended)
    verdicts = [e for e in fleet.health if e.worker in names and started <= e.at <= ended]
    latencies = sorted(p[1] for p in probes)
    return {
        "bench": "saturation", "probe_priority": args.probe_priority, "minutes": args.minutes,
        "false_unhealthy": sum(1 for e in verdicts if e.state == "unhealthy"),
        "probe_timeouts": sum(1 for p in probes if not p[0]),
        "suspect_verdicts": sum(1 for e in verdicts if e.state == "suspect"),
        "probes": len(probes),
        "probe_latency_p50_s": round(latencies[len(latencies) // 2], 3) if latencies else None,
        "probe_latency_max_s": round(latencies[-1], 3) if latencies else None,
        "max_heartbeat_gap_s": round(max(gaps.values(), default=0.0), 2),
        "beats": {n: fleet.beats[n].seq - beats_before[n] for n in names if n in fleet.beats},
        "completed": counts["completed"], "failed": counts["failed"], "sent": counts["sent"],
        "completed_per_min": round(counts["completed"] / args.minutes, 1),
        "workers": args.workers, "max_batch": args.max_batch, "max_tokens": args.max_tokens,
        "backlog": args.backlog, "image": f"{args.width}x{args.height} JPEG",
        "preprocess_pool": args.preprocess_pool,
        "verdicts": [f"{e.worker}:{e.previous}->{e.state}@{e.at - started:.0f}s ({e.reason})"
                     for e in verdicts][:20],
    }


def _probes(fleet: Fleet, names: list[str], start: float, end: float
            ) -> list[tuple[bool, float]]:
    """Each probe result once (beats repeat the latest), (ok, latency s), inside the run."""
    seen: dict[tuple[str, float], tuple[bool, float]] = {}
    for worker, probe in fleet.probes:
        if worker in names and start <= probe.at <= end:
            seen[(worker, probe.at)] = (probe.ok, probe.latency_s)
    return list(seen.values())


def _beat_gaps(fleet: Fleet, names: list[str]) -> dict[str, float]:
    return {n: fleet.max_gap.get(n, 0.0) for n in names}


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--probe-priority", choices=["high", "normal"], default="high")
    parser.add_argument("--port", type=int, default=PORT, help="Kafka port (and port + 1)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=4096, help="long outputs")
    parser.add_argument("--time-scale", type=float, default=4.0,
                        help="sim: wall s per simulated s (a wave of requests about 13 s)")
    parser.add_argument("--backlog", type=int, default=48,
                        help="requests kept unanswered (over the workers' 2 x max-batch)")
    parser.add_argument("--preprocess-pool", type=int, default=1)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args))))


if __name__ == "__main__":
    cli()
