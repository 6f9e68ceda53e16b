"""Requests end to end through the real broker, agent and worker processes."""

from __future__ import annotations

import asyncio
import json
import subprocess

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import TypeAdapter

from infra import procs
from schemas.config import Settings
from schemas.events import DeadLetter, InferenceRequest, InferenceResult, Rejection, Reply
from schemas.signing import sign
from streams.topics import DLQ, REQUESTS, RESPONSES, shard_topic
from tests.builders import make_request, malformed_requests, request_doc
from tests.integration.conftest import TENANT_KEYS, eventually, signed_client

REPLY = TypeAdapter(Reply)


async def test_client_request_gets_echo_result_from_worker(settings, pipeline):
    async with signed_client(settings) as client:
        reply = await client.submit(make_request(prompt="one two three four", max_tokens=3))
    assert isinstance(reply, InferenceResult)
    assert (reply.status, reply.text, reply.finish_reason) == ("ok", "one two three", "length")
    assert reply.usage.input_tokens == 4 and reply.usage.output_tokens == 3
    assert reply.shard in (0, 1)


async def test_unknown_model_gets_rejection_on_reply_topic(settings, pipeline):
    async with signed_client(settings) as client:
        reply = await client.submit(make_request(model="no-such-model"))
    assert isinstance(reply, Rejection) and reply.reason == "unknown_model"


def _kcat_read(kcat: str, settings: Settings, topic: str) -> list[str]:
    out = subprocess.run([kcat, "-b", settings.bootstrap, "-C", "-t", topic, "-o", "beginning",
                          "-e", "-q", "-f", "%s\n"], capture_output=True, encoding="utf-8",
                         errors="replace", timeout=60,
                         check=True)
    return out.stdout.splitlines()


def _kcat_read_all(settings: Settings, topic: str) -> list[str]:
    from tests.integration.conftest import KCAT

    assert KCAT is not None
    return _kcat_read(KCAT, settings, topic)


async def test_kcat_plain_json_request_comes_back_on_responses(settings, pipeline, kcat):
    # Signed here, sent by kcat as plain JSON: any producer can sign a request.
    unsigned = InferenceRequest(**request_doc(request_id="kcat-req-1", tenant="kcat-tenant",
                                              prompt="from kcat"))
    doc = sign(unsigned, *TENANT_KEYS["kcat-tenant"]).model_dump(mode="json")
    await asyncio.to_thread(
        subprocess.run, [kcat, "-b", settings.bootstrap, "-P", "-t", REQUESTS, "-K", "|"],
        input=f"kcat-tenant|{json.dumps(doc)}\n", text=True, check=True, timeout=30)
    replies: list[Reply] = []
    for _ in range(120):
        lines = await asyncio.to_thread(_kcat_read, kcat, settings, RESPONSES)
        replies = [REPLY.validate_json(ln) for ln in lines if "kcat-req-1" in ln]
        if replies:
            break
        await asyncio.sleep(0.5)
    assert replies, "no result for the kcat request on tw.responses"
    assert isinstance(replies[0], InferenceResult)
    assert replies[0].text == "from kcat" and replies[0].tenant == "kcat-tenant"


async def _dead_letters(settings: Settings, wanted: set[tuple[str, int, int]],
                        timeout_s: float = 90) -> dict[tuple[str, int, int], DeadLetter]:
    consumer = AIOKafkaConsumer(DLQ, bootstrap_servers=settings.bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    found: dict[tuple[str, int, int], DeadLetter] = {}
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(found) < len(wanted) and asyncio.get_running_loop().time() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    letter = DeadLetter.model_validate_json(record.value)
                    origin = (letter.origin_topic, letter.origin_partition, letter.origin_offset)
                    if origin in wanted:
                        found[origin] = letter
    finally:
        await consumer.stop()
    return found


async def _produce(settings: Settings, topic: str, records: list[bytes], key: bytes | None
                   ) -> set[tuple[str, int, int]]:
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap)
    await producer.start()
    try:
        futures = [await producer.send(topic, raw, key=key) for raw in records]
        metas = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return {(m.topic, m.partition, m.offset) for m in metas}


async def test_thousand_malformed_requests_become_dead_letters_and_agent_keeps_going(
        settings, pipeline):
    bad = malformed_requests(1000)
    origins = await _produce(settings, REQUESTS, [raw for _, raw in bad], key=b"mallory")
    letters = await _dead_letters(settings, origins)
    assert len(letters) == 1000
    expected_reasons = {reason for reason, _ in bad}
    assert all(any(r in letter.reason for r in expected_reasons) for letter in letters.values())
    assert procs.running(settings.run_dir(), "agent-admission") is not None
    async with signed_client(settings) as client:
        replies = await asyncio.gather(*(client.submit(make_request(prompt=f"after {i}"))
                                         for i in range(5)))
    assert [r.text for r in replies if isinstance(r, InferenceResult)] == [
        f"after {i}" for i in range(5)]


async def test_malformed_shard_records_dead_lettered_by_worker(settings, pipeline):
    origins = await _produce(settings, shard_topic("tiny-llama"),
                             [raw for _, raw in malformed_requests(20)], key=None)
    letters = await _dead_letters(settings, origins)
    assert len(letters) == 20
    assert {letter.consumer for letter in letters.values()} == {"worker.tiny-llama"}
    async with signed_client(settings) as client:
        reply = await client.submit(make_request(prompt="still serving"))
    assert isinstance(reply, InferenceResult) and reply.text == "still serving"


async def test_thousand_forged_or_unsigned_requests_rejected_none_reach_shards(
        settings, pipeline):
    forged = []
    for i in range(1000):
        request = make_request(request_id=f"forged-{i}", tenant="acme")
        match i % 4:
            case 0:
                forged.append(request)  # unsigned
            case 1:
                forged.append(sign(request, "key-unknown", "ab" * 32))
            case 2:
                forged.append(sign(request, "key-acme", "cd" * 32))  # wrong secret
            case _:
                forged.append(sign(request, *TENANT_KEYS["globex"]))  # another tenant's key
    async with signed_client(settings) as client:
        client._signer = None  # send them exactly as forged
        replies = await asyncio.gather(*(client.submit(r, timeout_s=120) for r in forged))
    assert all(isinstance(r, Rejection) and r.reason == "unauthenticated" for r in replies)
    on_shards = await asyncio.to_thread(_kcat_read_all, settings, shard_topic("tiny-llama"))
    assert not [line for line in on_shards if "forged-" in line]


async def test_tenants_snapshot_shows_settled_usage_against_limits(settings, pipeline):
    from infra.tenants import latest_usage, table

    async with signed_client(settings) as client:
        replies = await asyncio.gather(*(client.submit(
            make_request(tenant="globex", prompt=f"meter me {i}")) for i in range(10)))
    assert all(isinstance(r, InferenceResult) for r in replies)

    async def settled():
        snap = (await latest_usage(settings.bootstrap)).get("globex")
        return snap if snap and snap.admitted >= 10 and snap.pending == 0 else None

    snap = await eventually(settled, timeout_s=60)
    assert snap is not None, "no settled snapshot for globex on tw.metering"
    assert snap.charged_mu == snap.actual_mu > 0  # exact once nothing is pending
    assert snap.limit_mu_per_min == 100000 and sum(snap.mu_last_10s.values()) >= 0
    assert any(line.startswith("globex") for line in table({"globex": snap}))
