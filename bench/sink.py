"""UsageEvents/s through the ClickHouse sink ÷ a raw aiokafka consumer, same topic, same run.

N usage events (realistic field values) are produced to ``tw.usage`` of a
throwaway stack (embedded chDB). The baseline reads them all with a bare
aiokafka consumer that does nothing with them (fresh group). Then the sink
(fresh group, in this process) consumes, validates, dedupes, inserts into chDB
and commits; its rate runs from its first fetch to the moment every record is
committed, like the baseline's from its first fetch. The table is checked to
hold exactly N rows.

The two are measured in ``--rounds`` interleaved rounds (the order alternates;
each sink round writes a fresh database, each reader is a fresh group), and
each figure is the median of its rounds: single runs on this shared 2-core
machine swing by ±20 % (the broker shares the cores). Last line: one JSON
object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from typing import Any

from bench.harness import bench_stack, log, raw_consumer_rate
from infra.clickhouse.migrate import migrate
from infra.clickhouse.store import ChdbStore
from schemas.config import Settings
from schemas.events import UsageEvent
from streams.codec import encode
from streams.sink import KafkaEventSink
from streams.topics import USAGE

MODELS = ("tiny-llama", "llama-3-8b", "qwen-2.5-7b")
TENANTS = 50


def usage_events(n: int, seed: int = 0, start: float | None = None) -> list[UsageEvent]:
    """``n`` usage events spread over about ten minutes, as a busy fleet reports them."""
    rng = random.Random(seed)
    t0 = start if start is not None else time.time() - 600
    events = []
    for i in range(n):
        model = MODELS[i % len(MODELS)]
        inp, out = rng.randint(16, 4096), rng.randint(1, 1024)
        events.append(UsageEvent(
            request_id=f"req-{seed}-{i:09d}", tenant=f"tenant-{rng.randrange(TENANTS):02d}",
            model=model, input_tokens=inp, output_tokens=out,
            cached_tokens=rng.randint(0, inp // 2), images=int(rng.random() < 0.05),
            model_units=round(0.001 * inp + 0.01 * out, 6), status="ok",
            queue_s=rng.random() * 0.5, ttft_s=0.02 + rng.random() * 0.3,
            tpot_s=0.01 + rng.random() * 0.04, worker=f"worker-{model}-{rng.randrange(8)}",
            shard=rng.randrange(4), finished_at=t0 + 600.0 * i / max(1, n)))
    return events


async def produce(bootstrap: str, values: list[tuple[bytes, bytes]], topic: str = USAGE) -> None:
    sink = KafkaEventSink(bootstrap, linger_ms=20, client_id="bench-sink-producer")
    await sink.start()
    try:
        for i, (key, value) in enumerate(values):
            await sink.send(topic, value, key=key)
            if i % 20_000 == 19_999:
                await sink.flush()
        await sink.flush()
    finally:
        await sink.stop()


async def sink_rate(settings_bootstrap: str, store: ChdbStore, database: str, total: int,
                    group: str = "bench-sink") -> float:
    from agents.sink import ClickHouseSink, SinkConfig

    dlq = KafkaEventSink(settings_bootstrap, client_id="bench-sink-dlq")
    await dlq.start()
    sink = ClickHouseSink(bootstrap=settings_bootstrap, store=store, database=database,
                          dead_letters=dlq, config=SinkConfig(group_id=group,
                                                              topics=(USAGE,)))
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(stop))
    try:
        first: tuple[float, int] | None = None
        while sink.counters.committed < total:
            if task.done():
                task.result()
                raise RuntimeError("the sink stopped early")
            if first is None and sink.counters.fetched:
                first = (time.monotonic(), sink.counters.fetched)
            await asyncio.sleep(0.002)
        end = time.monotonic()
        if first is None or first[1] >= total:
            raise RuntimeError("all records came in one fetch: use more records")
        log(f"sink counters: {sink.counters}")
        return (total - first[1]) / (end - first[0])
    finally:
        stop.set()
        await task
        await dlq.stop()


async def sink_round(settings: Settings, store: ChdbStore, database: str, n: int,
                     group: str) -> tuple[float, float]:
    """(events/s, µs CPU per event) of the sink writing all ``n`` records into ``database``."""
    await migrate(store, database)
    cpu = time.process_time()
    rate = await sink_rate(settings.bootstrap, store, database, n, group)
    cpu_us = (time.process_time() - cpu) / n * 1e6
    [(rows, distinct)] = await store.query(
        f"SELECT count(), uniqExact(request_id) FROM {database}.usage_events")
    [(minute_requests,)] = await store.query(
        f"SELECT sum(requests) FROM {database}.usage_minute")
    if not rows == distinct == minute_requests == n:
        raise RuntimeError(f"table holds {rows} rows ({distinct} distinct, "
                           f"{minute_requests} in usage_minute), expected {n}")
    return rate, cpu_us


async def main(n: int, port: int, rounds: int) -> dict[str, Any]:
    async with bench_stack("sink", "", port=port) as settings:
        log(f"building {n} usage events")
        values = [(e.tenant.encode(), encode(e)) for e in usage_events(n)]
        started = time.monotonic()
        await produce(settings.bootstrap, values)
        log(f"produced {n} in {time.monotonic() - started:.1f}s")
        store = ChdbStore(settings.state_dir / "chdb")
        raw: list[tuple[float, float]] = []
        sink: list[tuple[float, float]] = []
        for r in range(rounds):
            order = ("raw", "sink") if r % 2 == 0 else ("sink", "raw")
            for what in order:
                if what == "raw":
                    cpu = time.process_time()
                    rate = await raw_consumer_rate(settings.bootstrap, USAGE, n, f"bench-raw-{r}")
                    raw.append((rate, (time.process_time() - cpu) / n * 1e6))
                    log(f"round {r}: raw consumer {rate:.0f}/s, {raw[-1][1]:.1f} µs CPU/event")
                else:
                    sink.append(await sink_round(settings, store,
                                                 f"{settings.clickhouse_database}_r{r}", n,
                                                 f"bench-sink-{r}"))
                    log(f"round {r}: sink {sink[-1][0]:.0f}/s, {sink[-1][1]:.1f} µs CPU/event "
                        "(all threads)")
        await store.close()
    rate = statistics.median(s for s, _ in sink)
    baseline = statistics.median(b for b, _ in raw)
    # CPU per event (this process, all threads, start-up included) is steadier than
    # rates on a shared machine: it says what the sink costs beside the bare consumer.
    return {"bench": "sink", "events": n, "rounds": rounds, "events_per_s": round(rate),
            "baseline_per_s": round(baseline), "ratio": round(rate / baseline, 3),
            "round_ratios": [round(s / b, 3) for (s, _), (b, _) in zip(sink, raw, strict=True)],
            "cpu_us_per_event": round(statistics.median(c for _, c in sink), 1),
            "baseline_cpu_us_per_event": round(statistics.median(c for _, c in raw), 1)}


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=500_000,
                        help="records (enough for ten 50k batches: steady state, not start-up)")
    parser.add_argument("--port", type=int, default=20092, help="Kafka port (and port + 1).")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.events, args.port, args.rounds))))


if __name__ == "__main__":
    cli()
