"""Faust app factory and a Faust-backed :class:`~streams.sink.EventSink`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import faust
from aiokafka.errors import KafkaError
from faust.exceptions import ProducerSendError
from pydantic import BaseModel

from schemas.config import Settings
from streams.sink import Headers, ProduceError, _bytes


def create_app(settings: Settings, *, app_id: str | None = None) -> faust.App:
    """A Faust app on the configured broker and table store (uvloop via the runner)."""
    return faust.App(
        app_id or settings.app_id,
        broker=f"kafka://{settings.bootstrap}",
        store=settings.table_store,
        autodiscover=False,
        web_enabled=False,
        topic_replication_factor=1,
        topic_partitions=settings.tenant_partitions,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        # 2 ms of batching: at a steady trickle every record would otherwise be its
        # own produce request (measured: a sixth of the admission agent's time).
        producer_linger=0.002,
        producer_max_request_size=16 * 1024 * 1024,
        broker_commit_interval=1.0,
        # A killed agent's partitions move to the others (or to its restart) after
        # the session timeout: seconds, not Kafka's default minute of stalled tenants.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=2.0,
    )


def raw_topic(app: faust.App, name: str) -> faust.TopicT:
    """A topic whose records reach agents as bytes, so decoding (and dead-lettering) is ours."""
    return app.topic(name, key_serializer="raw", value_serializer="raw", key_type=bytes,
                     value_type=bytes)


# At most this many events, or this long, between two commits of an agent's state:
# a commit writes each touched key once, so a batch saves one state write per
# extra event of a key; routing and replies are sent at once, not per batch.
BATCH_MAX = 500
BATCH_WITHIN_S = 0.005


async def consume_in_batches(stream: faust.StreamT[bytes],
                             handle: Callable[[faust.EventT], Awaitable[None]],
                             commit: Callable[[], Awaitable[None]],
                             flush: Callable[[], Awaitable[None]]) -> None:
    """Handle events one by one; acknowledge them only once ``commit`` has written what
    handling them staged and ``flush`` has seen it acknowledged by the broker: every
    ``BATCH_MAX`` events or ``BATCH_WITHIN_S``, whichever comes first. Faust commits
    acknowledged offsets only, so a crash replays exactly the events whose state may not
    have reached Kafka. Handling goes on while a batch waits for its acknowledgements."""
    manual = stream.noack()  # type: ignore[attr-defined]  # on Stream, not StreamT
    handled: list[faust.EventT] = []
    lock = asyncio.Lock()  # a commit and a handler never interleave their writes

    async def settle() -> None:
        async with lock:
            batch = list(handled)
            handled.clear()
            if not batch:
                return
            await commit()
        await flush()
        for event in batch:
            event.ack()

    async def ticker() -> None:
        while True:
            await asyncio.sleep(BATCH_WITHIN_S)
            await settle()

    tick = asyncio.create_task(ticker(), name="batch-commit")
    try:
        async for event in manual.events():
            async with lock:
                await handle(event)
                handled.append(event)
            if len(handled) >= BATCH_MAX:
                await settle()
    finally:
        tick.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tick


class FaustEventSink:
    """Produces through the Faust app's Kafka producer, records already serialized.

    Records go straight to the producer (not through Faust's channels and their
    per-message buffer, which cost more than the agents' own work per record).
    Faust flushes that producer before it commits offsets; ``flush`` here also
    checks every record sent since the last call was acknowledged.
    """

    def __init__(self, app: faust.App) -> None:
        self._app = app
        self._pending: list[Awaitable[object]] = []

    async def send(
        self,
        topic: str,
        value: BaseModel | bytes | None,
        *,
        key: str | bytes | None = None,
        partition: int | None = None,
        headers: Headers | None = None,
    ) -> None:
        try:
            fut = await self._app.producer.send(topic, _bytes(key), _bytes(value), partition,
                                                None, headers)
        except (KafkaError, ProducerSendError) as exc:
            raise ProduceError(f"send to {topic}: {exc}") from exc
        self._pending.append(fut)

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        results = await asyncio.gather(*pending, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise ProduceError(f"{len(failed)} record(s) not acknowledged: {failed[0]}")
