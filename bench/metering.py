"""UsageEvents/s through the metering agent ÷ a raw aiokafka consumer, same topic, same run.

Phase 1 admits N requests through the real admission agent (a heartbeat
announces shards; nothing serves them), so every tenant holds N/T pending
reservations, as under load. The agent stops; N UsageEvents, one per admitted
request, are produced to ``tw.usage``. Phase 2 restarts the agent and measures
the rate at which it settles them (committed offsets of its consumer group,
from first progress to the end). The baseline reads the same N records with a
bare aiokafka consumer that does nothing with them. Last line: one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import time

from bench.harness import (
    bench_stack,
    group_rate,
    log,
    raw_consumer_rate,
    start_agent,
    stop_agent,
)
from schemas.cost import CostModel
from schemas.events import InferenceRequest, UsageEvent, WorkerHeartbeat
from streams.sink import KafkaEventSink
from streams.topics import HEARTBEATS, REQUESTS, USAGE

MODEL = "tiny-llama"
TENANTS = 50
CONTROL = """auth_required = false
[default_tenant]
limit_mu_per_min = 1e9
burst_mu = 1e9
"""


async def heartbeats(sink: KafkaEventSink, stop: asyncio.Event) -> None:
    seq = 0
    while not stop.is_set():
        seq += 1
        await sink.send(HEARTBEATS, WorkerHeartbeat(
            worker="bench-w", model=MODEL, engine="none", seq=seq, shards=[0, 1, 2, 3],
            engine_state="ready", capacity_mu_per_min=1e9), key="bench-w")
        await sink.flush()
        await asyncio.sleep(0.5)


async def produce(sink: KafkaEventSink, records: list[tuple[str, object, str]]) -> None:
    for i, (topic, value, key) in enumerate(records):
        await sink.send(topic, value, key=key)  # type: ignore[arg-type]
        if i % 5000 == 4999:
            await sink.flush()
    await sink.flush()


async def main(n: int) -> dict[str, float | int | str]:
    cost = CostModel()
    async with bench_stack("metering", CONTROL) as settings:
        sink = KafkaEventSink(settings.bootstrap, linger_ms=20, client_id="bench")
        await sink.start()
        stop = asyncio.Event()
        beats = asyncio.create_task(heartbeats(sink, stop))
        requests = [InferenceRequest(request_id=f"b-{i}", tenant=f"t{i % TENANTS}", model=MODEL,
                                     prompt="count these words " * 8, max_tokens=64)
                    for i in range(n)]
        start_agent(settings)
        await asyncio.sleep(3)
        await produce(sink, [(REQUESTS, r, r.tenant) for r in requests])
        log(f"admitting {n} requests...")
        await group_rate(settings.bootstrap, settings.app_id, REQUESTS, n)
        stop.set()
        await beats
        stop_agent(settings)
        usage = [UsageEvent(request_id=r.request_id, tenant=r.tenant, model=MODEL,
                            input_tokens=40, output_tokens=20 + i % 50,
                            model_units=cost.model_units(40, 20 + i % 50), worker="bench-w",
                            shard=i % 4) for i, r in enumerate(requests)]
        await produce(sink, [(USAGE, u, u.tenant) for u in usage])
        await sink.stop()
        total = len(usage)  # every send was acknowledged by flush()
        log(f"{total} usage events on {USAGE}; metering...")
        started = time.monotonic()
        start_agent(settings)
        agent_rate = await group_rate(settings.bootstrap, settings.app_id, USAGE, total)
        log(f"metering agent: {agent_rate:.0f} events/s ({time.monotonic() - started:.1f}s)")
        stop_agent(settings)
        raw_rate = await raw_consumer_rate(settings.bootstrap, USAGE, total)
        log(f"raw aiokafka consumer: {raw_rate:.0f} events/s")
    return {"bench": "metering", "events": total, "events_per_s": round(agent_rate),
            "baseline_per_s": round(raw_rate), "ratio": round(agent_rate / raw_rate, 3)}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    # Enough for a second or more of settling: committed offsets are polled every 50 ms.
    parser.add_argument("--events", type=int, default=200_000)
    print(json.dumps(asyncio.run(main(parser.parse_args().events))))
