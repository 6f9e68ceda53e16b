"""Async client: submit an InferenceRequest and await its reply by request id.

    async with TokenweirClient("127.0.0.1:9092") as client:
        reply = await client.submit(InferenceRequest(tenant="acme", model="m", prompt="hi"))

The reply is an :class:`InferenceResult` or a :class:`Rejection`. Workers
deliver at least once; duplicates of a reply already returned are dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from types import TracebackType

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from pydantic import TypeAdapter

from schemas.events import InferenceRequest, Reply
from streams import DecodeError, RequestTimeout, StreamsError
from streams.codec import decode
from streams.sink import KafkaEventSink
from streams.topics import REQUESTS, RESPONSES

log = logging.getLogger(__name__)
_REPLY: TypeAdapter[Reply] = TypeAdapter(Reply)
ANSWERED_MEMORY = 100_000  # request ids remembered for duplicate detection


async def reply_partitions(bootstrap: str, topic: str) -> list[int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    try:
        await admin.start()
        described = await admin.describe_topics([topic])
    except KafkaError as exc:
        raise StreamsError(f"cannot describe {topic} on {bootstrap}: {exc}") from exc
    finally:
        await admin.close()
    found = [t for t in described if t["topic"] == topic and t["error_code"] == 0]
    if not found or not found[0]["partitions"]:
        raise StreamsError(f"reply topic {topic} does not exist on {bootstrap}")
    return sorted(p["partition"] for p in found[0]["partitions"])


async def follow_replies(bootstrap: str, stop: asyncio.Event,
                         on_reply: Callable[[Reply], None], topic: str = RESPONSES) -> None:
    """Call ``on_reply`` for every reply on ``topic`` from now until ``stop``.

    For observers of many clients' replies (replays, the demo); records that do
    not decode are another producer's concern and are skipped.
    """
    partitions = await reply_partitions(bootstrap, topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        while not stop.is_set():
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    with contextlib.suppress(DecodeError):
                        on_reply(decode(record.value, _REPLY))
    finally:
        await consumer.stop()


class TokenweirClient:
    def __init__(
        self,
        bootstrap: str,
        *,
        reply_topic: str = RESPONSES,
        request_topic: str = REQUESTS,
        signer: Callable[[InferenceRequest], InferenceRequest] | None = None,
    ) -> None:
        self._bootstrap = bootstrap
        self._signer = signer
        self.reply_topic = reply_topic
        self._request_topic = request_topic
        self._sink = KafkaEventSink(bootstrap, linger_ms=1, client_id="tokenweir-client")
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, client_id="tokenweir-client"
        )
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        # Ids answered recently: a redelivered reply for one of them is a duplicate.
        self._answered: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._reader: asyncio.Task[None] | None = None
        self.duplicates_dropped = 0
        self.undecodable = 0

    async def __aenter__(self) -> TokenweirClient:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        partitions = await reply_partitions(self._bootstrap, self.reply_topic)
        await self._consumer.start()
        try:
            tps = [TopicPartition(self.reply_topic, p) for p in partitions]
            self._consumer.assign(tps)
            await self._consumer.seek_to_end(*tps)
            # Resolve positions now, so no reply produced after submit() is skipped.
            for tp in tps:
                await self._consumer.position(tp)
            await self._sink.start()
        except BaseException as exc:
            await self._consumer.stop()
            if isinstance(exc, KafkaError):
                raise StreamsError(f"cannot read {self.reply_topic}: {exc}") from exc
            raise
        self._reader = asyncio.create_task(self._read_replies(), name="tokenweir-client-replies")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._sink.stop()
        await self._consumer.stop()
        for fut in self._waiting.values():
            fut.cancel()

    async def send(self, request: InferenceRequest) -> asyncio.Future[Reply]:
        """Produce one request (signed, when the client has a signer); the future is its reply."""
        if self._signer is not None:
            request = self._signer(request)
        if request.reply_topic != self.reply_topic:
            raise StreamsError(
                f"request replies to {request.reply_topic}, this client reads {self.reply_topic}"
            )
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[request.request_id] = fut
        await self._sink.send(self._request_topic, request, key=request.tenant)
        await self._sink.flush()
        return fut

    async def submit(self, request: InferenceRequest, *, timeout_s: float = 60.0) -> Reply:
        fut = await self.send(request)
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except TimeoutError as exc:
            raise RequestTimeout(f"no reply to {request.request_id} within {timeout_s}s") from exc
        finally:
            self._waiting.pop(request.request_id, None)

    async def _read_replies(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    self._deliver(record.value)

    def _deliver(self, raw: bytes | None) -> None:
        try:
            reply = decode(raw, _REPLY)
        except DecodeError as exc:
            self.undecodable += 1
            log.warning("undecodable reply on %s: %s", self.reply_topic, exc.reason)
            return
        if reply.request_id in self._answered:
            self.duplicates_dropped += 1
            return
        fut = self._waiting.get(reply.request_id)
        if fut is None or fut.done():
            return  # another client's request, or one we gave up on
        fut.set_result(reply)
        self._answered[reply.request_id] = None
        if len(self._answered) > ANSWERED_MEMORY:
            self._answered.popitem(last=False)
