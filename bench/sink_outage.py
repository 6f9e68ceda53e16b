"""The sink across a ClickHouse outage: nothing lost, nothing counted twice.

Starts its own Kafka and ClickHouse server (ports configurable), runs the sink
in this process, streams usage events to ``tw.usage`` for the whole run, stops
the ClickHouse server for ``--outage-s`` seconds mid-run, starts it again, then
waits until every produced event is committed. Counts rows, distinct ids and
the ``usage_minute`` view's requests (a SummingMergeTree never folds
duplicates away, unlike the ReplacingMergeTree table). Last line: one JSON
object {"produced", "rows", "distinct", "lost", "duplicated", ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from agents.sink import ClickHouseSink, SinkConfig
from bench.harness import log
from infra.clickhouse.migrate import migrate
from infra.clickhouse.server import LocalClickHouseServer
from infra.clickhouse.store import ServerStore
from infra.stack import down, up
from infra.topics import existing_partitions
from schemas.config import Settings
from schemas.events import UsageEvent
from streams.codec import encode
from streams.sink import KafkaEventSink
from streams.topics import USAGE

Say = Callable[[str], None]


async def set_group_offsets(bootstrap: str, group: str, topics: tuple[str, ...],
                            offsets: dict[TopicPartition, int] | None = None
                            ) -> dict[TopicPartition, int]:
    """Commit ``offsets`` for ``group`` (default: the log ends); returns what was committed."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        partitions = await existing_partitions(admin, list(topics))
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t, n in partitions.items() for p in range(n)]
        consumer.assign(tps)
        if offsets is None:
            offsets = await consumer.end_offsets(tps)
        await consumer.commit(offsets)
        return dict(offsets)
    finally:
        await consumer.stop()


async def stream_usage(bootstrap: str, stop: asyncio.Event, *, rate_per_s: float,
                       prefix: str) -> int:
    """Produce usage events at about ``rate_per_s`` until ``stop``; how many were acked."""
    producer = KafkaEventSink(bootstrap, client_id="outage-producer")
    await producer.start()
    sent = 0
    step_s = 0.05
    per_step = max(1, round(rate_per_s * step_s))
    try:
        while not stop.is_set():
            for _ in range(per_step):
                e = UsageEvent(request_id=f"{prefix}-{sent:08d}", tenant=f"t-{sent % 7}",
                               model="tiny-llama", input_tokens=100 + sent % 50, output_tokens=20,
                               model_units=0.5, worker="w-1", shard=sent % 4)
                await producer.send(USAGE, encode(e), key=e.tenant)
                sent += 1
            await producer.flush()
            await asyncio.sleep(step_s)
    finally:
        await producer.stop()
    return sent


async def outage_run(settings: Settings, database: str, *, outage_s: float,
                     before_s: float = 3.0, after_s: float = 3.0, rate_per_s: float = 500.0,
                     group: str = "tokenweir-sink-outage", prefix: str = "outage",
                     say: Say = log) -> dict[str, int]:
    """Stream, stop ClickHouse for ``outage_s``, restart it, drain; count what landed."""
    url = settings.clickhouse_server_url
    if url is None:
        raise ValueError("outage_run needs the ClickHouse server (clickhouse_server=True)")
    server = LocalClickHouseServer(settings)
    store = ServerStore(url)
    await migrate(store, database)
    await set_group_offsets(settings.bootstrap, group, (USAGE,))  # only this run's events
    dlq = KafkaEventSink(settings.bootstrap, client_id="outage-dlq")
    await dlq.start()
    config = SinkConfig(group_id=group, topics=(USAGE,), batch_max_wait_s=0.2,
                        backoff_initial_s=0.5, backoff_max_s=10.0)
    sink = ClickHouseSink(bootstrap=settings.bootstrap, store=store, database=database,
                          dead_letters=dlq, config=config)
    stop_sink, stop_producing = asyncio.Event(), asyncio.Event()
    sinking = asyncio.create_task(sink.run(stop_sink))
    producing = asyncio.create_task(stream_usage(settings.bootstrap, stop_producing,
                                                 rate_per_s=rate_per_s, prefix=prefix))
    try:
        await asyncio.sleep(before_s)
        say(f"stopping ClickHouse for {outage_s}s (sink so far: {sink.counters})")
        # In a thread: stopping takes seconds, and the consumer must keep heartbeating.
        await asyncio.to_thread(server.stop)
        await asyncio.sleep(outage_s)
        await server.start()
        say(f"ClickHouse back (sink: {sink.counters})")
        await asyncio.sleep(after_s)
        stop_producing.set()
        produced = await producing
        say(f"produced {produced}; waiting for the sink to commit them all")
        deadline = time.monotonic() + 120
        while sink.counters.committed < produced and time.monotonic() < deadline:
            if sinking.done():
                sinking.result()
            await asyncio.sleep(0.1)
    finally:
        stop_producing.set()
        stop_sink.set()
        await asyncio.gather(producing, sinking, return_exceptions=True)
        await dlq.stop()
    try:
        [(rows, distinct)] = await store.query(
            f"SELECT count(), uniqExact(request_id) FROM {database}.usage_events "
            f"WHERE request_id LIKE '{prefix}-%'")
        [(minute,)] = await store.query(
            f"SELECT sum(requests) FROM {database}.usage_minute")
    finally:
        await store.close()
    say(f"sink: {sink.counters}")
    return {"produced": produced, "rows": int(rows), "distinct": int(distinct),
            "minute_requests": int(minute), "lost": produced - int(distinct),
            "duplicated": max(int(rows), int(minute)) - int(distinct),
            "retries": sink.counters.retries}


async def main(outage_s: float, kafka_port: int, clickhouse_port: int, rate: float) -> dict[
        str, int]:
    state = Path(tempfile.mkdtemp(prefix="tw-sink-outage-"))
    settings = Settings(state_dir=state, kafka_port=kafka_port,
                        kafka_controller_port=kafka_port + 1, clickhouse_server=True,
                        clickhouse_port=clickhouse_port, tenant_partitions=4)
    try:
        await up(settings, log)
        return await outage_run(settings, settings.clickhouse_database, outage_s=outage_s,
                                before_s=5.0, after_s=5.0, rate_per_s=rate)
    finally:
        down(settings, log)
        shutil.rmtree(state, ignore_errors=True)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage-s", type=float, default=60.0)
    parser.add_argument("--kafka-port", type=int, default=20192)
    parser.add_argument("--clickhouse-port", type=int, default=20100)
    parser.add_argument("--rate", type=float, default=500.0, help="Usage events per second.")
    args = parser.parse_args()
    result = asyncio.run(main(args.outage_s, args.kafka_port, args.clickhouse_port, args.rate))
    print(json.dumps(result))


if __name__ == "__main__":
    cli()
