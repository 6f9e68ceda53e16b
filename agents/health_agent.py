"""The health agent: heartbeats in, :class:`HealthEvent` transitions out on ``tw.health``.

Reads every worker's beats from ``tw.heartbeats`` (one partition, outside any
consumer group, starting ``lookback_s`` in the past so that a restarted agent
knows the fleet at once), feeds them to a :class:`agents.health.HealthTracker`,
judges every worker once per ``tick_s`` (silence shows only with time) and
publishes each transition keyed by worker. What follows from a verdict is up
to the consumers of ``tw.health``: the admission router stops routing to the
shards of an unhealthy worker, an actuator restarts it, alerting raises an
alert.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import TypeAdapter

from agents import AgentsError
from agents.health import HealthConfig, HealthTracker
from schemas.events import HealthEvent, WorkerHeartbeat
from streams import StreamsError
from streams.consumer import seek_to_time
from streams.deadletter import decode_or_dead_letter
from streams.sink import EventSink, KafkaEventSink
from streams.topics import HEALTH, HEARTBEATS

log = logging.getLogger(__name__)
_BEAT: TypeAdapter[WorkerHeartbeat] = TypeAdapter(WorkerHeartbeat)


async def publish(sink: EventSink, events: list[HealthEvent]) -> None:
    for event in events:
        log.warning("health: %s %s -> %s (%s)", event.worker, event.previous, event.state,
                    event.reason)
        await sink.send(HEALTH, event, key=event.worker)
    if events:
        await sink.flush()


async def run_health_agent(bootstrap: str, *, config: HealthConfig | None = None,
                           tick_s: float = 1.0, lookback_s: float = 10.0,
                           stop: asyncio.Event | None = None) -> None:
    """Judge workers until ``stop`` is set (or forever); raises :class:`AgentsError`."""
    tracker = HealthTracker(config)
    stop = stop or asyncio.Event()
    sink = KafkaEventSink(bootstrap, client_id="tokenweir-health")
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                client_id="tokenweir-health")
    try:
        await sink.start()
        await consumer.start()
        tp = TopicPartition(HEARTBEATS, 0)
        consumer.assign([tp])
        await seek_to_time(consumer, [tp], time.time() - lookback_s)
        next_tick = time.monotonic()
        while not stop.is_set():
            wait_ms = max(0, int((next_tick - time.monotonic()) * 1000))
            for records in (await consumer.getmany(timeout_ms=min(wait_ms, 200))).values():
                for record in records:
                    beat = await decode_or_dead_letter(
                        sink, _BEAT, raw=record.value, key=record.key, topic=record.topic,
                        partition=record.partition, offset=record.offset, consumer="health")
                    if beat is not None:
                        await publish(sink, tracker.observe(beat, time.time()))
            if time.monotonic() >= next_tick:
                await publish(sink, tracker.tick(time.time()))
                next_tick = time.monotonic() + tick_s
    except (KafkaError, StreamsError) as exc:
        raise AgentsError(f"health agent: {exc}") from exc
    finally:
        await consumer.stop()
        await sink.stop()
