"""Turning unusable records into dead letters instead of crashing consumers."""

from __future__ import annotations

from typing import TypeVar

from pydantic import TypeAdapter

from schemas.events import DeadLetter
from streams import DecodeError
from streams.codec import decode
from streams.sink import EventSink
from streams.topics import DLQ

T = TypeVar("T")

MAX_DEAD_RAW = 16 * 1024 * 1024


async def decode_or_dead_letter(
    sink: EventSink,
    adapter: TypeAdapter[T],
    *,
    raw: bytes | None,
    key: bytes | None,
    topic: str,
    partition: int,
    offset: int,
    consumer: str,
) -> T | None:
    """Decode a record, or send it to ``tw.dlq`` with the reason and return None."""
    try:
        return decode(raw, adapter)
    except DecodeError as exc:
        await send_dead_letter(sink, raw=raw, key=key, reason=exc.reason, topic=topic,
                               partition=partition, offset=offset, consumer=consumer)
        return None


async def send_dead_letter(
    sink: EventSink,
    *,
    raw: bytes | None,
    key: bytes | None,
    reason: str,
    topic: str,
    partition: int,
    offset: int,
    consumer: str,
) -> None:
    """Send a record already found unusable (``reason`` says why) to ``tw.dlq``."""
    await sink.send(
        DLQ,
        DeadLetter(
            raw=(raw or b"")[:MAX_DEAD_RAW],
            key=key[: 64 * 1024] if key else None,
            reason=reason[:4096],
            origin_topic=topic,
            origin_partition=partition,
            origin_offset=offset,
            consumer=consumer,
        ),
        key=topic,
    )
