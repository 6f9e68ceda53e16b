"""Faust app factory and a Faust-backed :class:`~streams.sink.EventSink`."""

from __future__ import annotations

import faust
from pydantic import BaseModel

from schemas.config import Settings
from streams.sink import Headers, _bytes


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
        producer_max_request_size=16 * 1024 * 1024,
        broker_commit_interval=1.0,
    )


def raw_topic(app: faust.App, name: str) -> faust.TopicT:
    """A topic whose records reach agents as bytes, so decoding (and dead-lettering) is ours."""
    return app.topic(name, key_serializer="raw", value_serializer="raw", key_type=bytes,
                     value_type=bytes)


class FaustEventSink:
    """Produces through the Faust app's producer; Faust flushes it before committing."""

    def __init__(self, app: faust.App) -> None:
        self._app = app
        self._topics: dict[str, faust.TopicT] = {}

    async def send(
        self,
        topic: str,
        value: BaseModel | bytes,
        *,
        key: str | bytes | None = None,
        partition: int | None = None,
        headers: Headers | None = None,
    ) -> None:
        channel = self._topics.get(topic)
        if channel is None:
            channel = self._topics[topic] = raw_topic(self._app, topic)
        await channel.send(key=_bytes(key), value=_bytes(value), partition=partition,
                           headers=headers)

    async def flush(self) -> None:
        await self._app.producer.flush()
