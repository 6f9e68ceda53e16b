"""The one seam through which tokenweir produces to Kafka.

``send`` enqueues a record; ``flush`` returns once every enqueued record is
acknowledged by the broker (or raises). Callers commit input offsets only
after ``flush`` — that is the at-least-once contract.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

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
        value: BaseModel | bytes,
        *,
        key: str | bytes | None = None,
        partition: int | None = None,
        headers: Headers | None = None,
    ) -> None: ...

    async def flush(self) -> None: ...


class KafkaEventSink:
    """aiokafka producer behind the :class:`EventSink` seam."""

    def __init__(self, bootstrap: str, *, linger_ms: int = 2, client_id: str = "tokenweir") -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            linger_ms=linger_ms,
            acks="all",
            enable_idempotence=True,
            max_request_size=16 * 1024 * 1024,
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
        value: BaseModel | bytes,
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
    value: bytes
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
        value: BaseModel | bytes,
        *,
        key: str | bytes | None = None,
        partition: int | None = None,
        headers: Headers | None = None,
    ) -> None:
        data = _bytes(value)
        assert data is not None  # narrows for mypy; value is never None here
        self.records.append(SentRecord(topic, data, _bytes(key), partition, headers or []))

    async def flush(self) -> None:
        self.flushed = len(self.records)

    def on(self, topic: str) -> list[SentRecord]:
        return [r for r in self.records if r.topic == topic]
