"""Reading ``tw.alerts``: every alert kept (30 days), then new ones with ``follow``."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import TypeAdapter

from infra import InfraError
from schemas.events import Alert
from streams import DecodeError, StreamsError
from streams.client import reply_partitions as topic_partitions
from streams.codec import decode
from streams.consumer import behind, seek_to_time
from streams.topics import ALERTS

_ALERT: TypeAdapter[Alert] = TypeAdapter(Alert)


def format_alert(alert: Alert) -> str:
    at = dt.datetime.fromtimestamp(alert.fired_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    return (f"{at}Z  {alert.severity.upper():<8}  {alert.rule:<24}  {alert.subject:<24}  "
            f"{alert.message}")


async def tail_alerts(bootstrap: str, on_alert: Callable[[Alert], None], *,
                      follow: bool = False, stop: asyncio.Event | None = None,
                      since: float | None = None) -> int:
    """Hand every alert on the topic (from ``since``, epoch s, if given) to ``on_alert``;
    return how many records were skipped.

    Without ``follow`` it returns at the end of the topic; with it, when ``stop`` is set.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                client_id="tokenweir-alerts")
    skipped = 0
    try:
        await consumer.start()
        try:
            tps = [TopicPartition(ALERTS, p) for p in await topic_partitions(bootstrap, ALERTS)]
        except StreamsError as exc:
            raise InfraError(f"{exc} (run `tokenweir up`)") from exc
        consumer.assign(tps)
        if since is None:
            await consumer.seek_to_beginning(*tps)
        else:
            await seek_to_time(consumer, tps, since)
        ends = await consumer.end_offsets(tps)
        while follow or await behind(consumer, ends):
            if stop is not None and stop.is_set():
                break
            for records in (await consumer.getmany(*tps, timeout_ms=500)).values():
                for record in records:
                    try:
                        on_alert(decode(record.value, _ALERT))
                    except DecodeError:
                        skipped += 1  # not an alert; the topic's producers dead-letter theirs
        return skipped
    except KafkaError as exc:
        raise InfraError(f"reading {ALERTS} on {bootstrap}: {exc!r}") from exc
    finally:
        await consumer.stop()
