"""The one seam through which tokenweir produces to Kafka.

``send`` enqueues a record; ``flush`` returns once every enqueued record is
acknowledged by the broker (or raises). Callers commit input offsets only
after ``flush`` — that is the at-least-once contract.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import BaseModel

from streams import StreamsError
from streams.codec import encode

Headers = list[tuple[str, bytes]]  # Kafka record headers


class ProduceError(StreamsError):
    """The broker did not accept a record."""


def _bytes(value: BaseModel | bytes | str | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return encode(value)


class EventSink(Protocol):
    async def send(
        self,
        topic: str,
        value: BaseModel | bytes | None,  # None: a tombstone (compacted topics)
        *,
        key: str | bytes | None = None,
        partition: int | None = None,
        headers: Headers | None = None,
    ) -> None: ...

    async def flush(self) -> None: ...


KeyedRecord = tuple[bytes, bytes | None]  # key, value (None: a tombstone)
FEW_RECORDS = 64  # send_many: up to this many go through send(), one by one


class BulkEventSink(EventSink, Protocol):
    async def send_many(self, topic: str, partition: int,
                        records: Sequence[KeyedRecord]) -> None:
        """Send ``records`` to one partition, in this order (changelogs: many small records,
        where ``send``'s cost per record would dominate)."""
        ...


class KafkaEventSink:
    """aiokafka producer behind the :class:`EventSink` seam."""

    def __init__(self, bootstrap: str, *, linger_ms: int = 2, client_id: str = "tokenweir",
                 batch_bytes: int = 16 * 1024) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            linger_ms=linger_ms,
            acks="all",
            enable_idempotence=True,
            max_request_size=16 * 1024 * 1024,
            max_batch_size=batch_bytes,
            client_id=client_id,
        )
        self._pending: list[asyncio.Future[object]] = []

    async def start(self) -> None:
        try:
            await self._producer.start()
        except KafkaError as exc:
            raise ProduceError(f"cannot connect producer: {exc}") from exc

    async def stop(self) -> None:
        await self._producer.stop()

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
            fut = await self._producer.send(
                topic, _bytes(value), key=_bytes(key), partition=partition, headers=headers
            )
        except KafkaError as exc:
            raise ProduceError(f"send to {topic}: {exc}") from exc
        self._pending.append(fut)

    async def send_many(self, topic: str, partition: int,
                        records: Sequence[KeyedRecord]) -> None:
        """Many records are appended to record batches directly (~0.3 µs each, against
        ~10 µs through ``send``). Such a batch is queued only once the partition's earlier
        batch has left, a wait of up to a round trip: a few records go through ``send``."""
        if len(records) <= FEW_RECORDS:
            for key, value in records:
                await self.send(topic, value, key=key, partition=partition)
            return
        try:
            batch = self._producer.create_batch()
            for key, value in records:
                if batch.append(key=key, value=value, timestamp=None) is None:
                    await self._send_batch(batch, topic, partition)
                    batch = self._producer.create_batch()
                    if batch.append(key=key, value=value, timestamp=None) is None:
                        raise ProduceError(f"a record of {len(value or b'')} bytes does not "
                                           f"fit a batch for {topic}")
            if batch.record_count():
                await self._send_batch(batch, topic, partition)
        except KafkaError as exc:
            raise ProduceError(f"send to {topic}[{partition}]: {exc}") from exc

    async def _send_batch(self, batch: Any, topic: str, partition: int) -> None:
        batch.close()  # nothing else goes into it through send()
        self._pending.append(await self._producer.send_batch(batch, topic, partition=partition))

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        # Always wait for the producer: a concurrent flush may hold futures of
        # records this caller sent, and they must be delivered before it returns.
        await self._producer.flush()
        results = await asyncio.gather(*pending, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise ProduceError(f"{len(failed)} record(s) not acknowledged: {failed[0]}")


@dataclass(frozen=True)
class SentRecord:
    topic: str
    value: bytes | None  # None: a tombstone
    key: bytes | None
    partition: int | None
    headers: Headers


class MemoryEventSink:
    """In-memory fake of :class:`EventSink` for unit tests."""

    def __init__(self) -> None:
        self.records: list[SentRecord] = []
        self.flushed = 0  # records acknowledged by flush()

    async def send(
        self,
        topic: str,
        value: BaseModel | bytes | None,
        *,
        key: str | bytes | None = None,
        partition: int | None = None,
        headers: Headers | None = None,
    ) -> None:
        self.records.append(SentRecord(topic, _bytes(value), _bytes(key), partition,
                                       headers or []))

    async def send_many(self, topic: str, partition: int,
                        records: Sequence[KeyedRecord]) -> None:
        self.records.extend(SentRecord(topic, value, key, partition, [])
                            for key, value in records)

    async def flush(self) -> None:
        self.flushed = len(self.records)

    def on(self, topic: str) -> list[SentRecord]:
        return [r for r in self.records if r.topic == topic]
