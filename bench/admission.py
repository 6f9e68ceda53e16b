"""Admission decisions/s per agent process, and the p99 latency it adds at 1,000 requests/s.

Latency: requests are produced at 1,000/s, the time each is sent recorded; a
consumer of the shard topic records when each routed record arrives. The same
is done through the pass-through agent (consume, decode, forward: no
authentication, limits or state) in the same run; the difference of the p99s
is what admission adds. The broker must be as warm for one agent as for the
other: the first two rounds of each agent are discarded (a fresh broker's p99 is
several times its later one, and each agent exercises broker code paths of its
own, the ledger's compacted topic and the usage topic, which the broker's JIT
compiler goes on compiling: its C2 thread took 54% of a core in the first
pass-through round, 27% in the first admission round, still 5.6% in the
second, against 0.6-3.5% once warm; that second admission round's p99 was
16-26 ms in three runs, the third's 9-14 ms, with pass-through at 7-10 ms).
The measured rounds then run in the order admission, pass-through,
pass-through, admission, so that what still drifts weighs on both alike. They
run before the throughput phase, not after it: its 100,000 requests left the
C2 compiler at over half a core for the next tens of seconds, which fell on
whichever agent was measured next.

Throughput: N signed requests from 50 tenants are produced while the agent is
down; the agent then starts and the rate at which its consumer group commits
them is its decision rate (start-up and recovery excluded). A heartbeat
announces four ready shards. Last line: one JSON object.
"""

from __future__ import annotations

import asyncio
import gc
import json
import secrets
import statistics
import time

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.harness import (
    bench_stack,
    group_committed,
    group_rate,
    log,
    start_agent,
    stop_agent,
)
from bench.metering import MODEL, heartbeats, produce
from schemas.config import Settings
from schemas.events import InferenceRequest
from schemas.signing import Signer
from streams.codec import encode
from streams.sink import KafkaEventSink
from streams.topics import REQUESTS, shard_topic

TENANTS = 50


class _Routed(msgspec.Struct):
    request_id: str  # all the receiver reads of a routed request


_ROUTED = msgspec.json.Decoder(_Routed)
KEYS = {f"t{i}": (f"key-t{i}", secrets.token_hex(32)) for i in range(TENANTS)}
CONTROL = "auth_required = true\n[default_tenant]\nlimit_mu_per_min = 1e9\nburst_mu = 1e9\n" + \
    "".join(f'[keys.{k}]\ntenant = "{t}"\nsecret = "{s}"\n' for t, (k, s) in KEYS.items())


def make(i: int, tag: str) -> InferenceRequest:
    return InferenceRequest(request_id=f"{tag}-{i}", tenant=f"t{i % TENANTS}", model=MODEL,
                            prompt="summarise the quarterly usage report " * 4, max_tokens=128,
                            session_key=f"s{i % 400}")


async def latencies(bootstrap: str, tag: str, rate: float, seconds: float) -> list[float]:
    """Send ``rate`` requests/s for ``seconds``; ms from send to routed record, per request."""
    signer = Signer(KEYS)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    parts = [TopicPartition(shard_topic(MODEL), p)
             for p in sorted(consumer.partitions_for_topic(shard_topic(MODEL)) or [0, 1, 2, 3])]
    consumer.assign(parts)
    await consumer.seek_to_end(*parts)
    sent: dict[str, float] = {}
    seen: list[float] = []
    total = int(rate * seconds)

    async def receive() -> None:
        while len(seen) < total:
            for records in (await consumer.getmany(timeout_ms=100)).values():
                arrived = time.time()
                for record in records:
                    rid = _ROUTED.decode(record.value).request_id
                    if rid in sent:
                        seen.append((arrived - sent.pop(rid)) * 1000)

    sink = KafkaEventSink(bootstrap, linger_ms=0, client_id="bench-latency")
    await sink.start()
    await warm_up(sink, consumer, signer, tag)
    # Signed and encoded beforehand: the load generator's own CPU (signing costs ~0.1 ms
    # a request) would otherwise compete with the agent and the broker for this
    # machine's cores, and inflate both tails. Latency is taken from the send itself.
    encoded = [(r.request_id, encode(r), r.tenant.encode())
               for r in (signer(make(i, tag)) for i in range(total))]
    # The measuring process must not pause either: its heap (broker set-up, chDB, the
    # round's encoded requests) would otherwise be scanned by full collections
    # of 50-70 ms while it stamps arrivals.
    gc.collect()
    gc.freeze()
    started = time.monotonic()
    reader = asyncio.create_task(receive())
    try:
        for i, (request_id, value, key) in enumerate(encoded):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sent[request_id] = time.time()
            await sink.send(REQUESTS, value, key=key)
        await sink.flush()
        await asyncio.wait_for(reader, timeout=120)
    finally:
        reader.cancel()
        await sink.stop()
        await consumer.stop()
    return seen


async def warm_up(sink: KafkaEventSink, consumer: AIOKafkaConsumer, signer: Signer, tag: str,
                  timeout_s: float = 90.0) -> None:
    """Send one request at a time until one is routed: the agent has joined its group and
    recovered its table, so start-up is not counted as latency."""
    deadline = time.monotonic() + timeout_s
    i = 0
    while time.monotonic() < deadline:
        i += 1
        await sink.send(REQUESTS, signer(make(i, f"{tag}-warm")), key=f"t{i % TENANTS}")
        await sink.flush()
        batches = await consumer.getmany(timeout_ms=300)
        if any(records for records in batches.values()):
            await asyncio.sleep(1.0)  # let the warm-up trickle drain
            await consumer.getmany(timeout_ms=100)
            return
    raise RuntimeError(f"agent routed nothing within {timeout_s:.0f}s")


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


async def latency_rounds(settings: Settings, rate: float, seconds: float
                         ) -> dict[str, list[float]]:
    """ms per routed request, per agent, over alternating rounds (see the module's doc)."""
    discarded = ["passthrough", "admission"] * 2
    rounds = [*discarded, "admission", "passthrough", "passthrough", "admission"]
    samples: dict[str, list[float]] = {"admission": [], "passthrough": []}
    for i, agent in enumerate(rounds):
        start_agent(settings, agent)
        ms = await latencies(settings.bootstrap, f"r{i}", rate, seconds)
        stop_agent(settings, agent)
        counted = i >= len(discarded)
        log(f"round {i} {agent}{'' if counted else ' (warm-up, not counted)'}: p50/p99 "
            f"{statistics.median(ms):.2f}/{p99(ms):.2f} ms")
        if counted:
            samples[agent].extend(ms)
    return samples


async def main(n: int, rate: float, seconds: float) -> dict[str, float | int | str]:
    async with bench_stack("admission", CONTROL) as settings:
        sink = KafkaEventSink(settings.bootstrap, linger_ms=20, client_id="bench")
        await sink.start()
        stop = asyncio.Event()
        beats = asyncio.create_task(heartbeats(sink, stop))
        ms = await latency_rounds(settings, rate, seconds)
        admission_ms, baseline_ms = ms["admission"], ms["passthrough"]
        signer = Signer(KEYS)
        before = await group_committed(settings.bootstrap, settings.app_id, REQUESTS)
        await produce(sink, [(REQUESTS, signer(make(i, "tp")), f"t{i % TENANTS}")
                             for i in range(n)])
        start_agent(settings, "admission")
        decisions = await group_rate(settings.bootstrap, settings.app_id, REQUESTS, n,
                                     after=before)
        log(f"admission: {decisions:.0f} decisions/s over {n} requests")
        stop_agent(settings, "admission")
        stop.set()
        await beats
        await sink.stop()
    added = p99(admission_ms) - p99(baseline_ms)
    log(f"at {rate:.0f} req/s: p50/p99 admission {statistics.median(admission_ms):.2f}/"
        f"{p99(admission_ms):.2f} ms, pass-through {statistics.median(baseline_ms):.2f}/"
        f"{p99(baseline_ms):.2f} ms")
    return {"bench": "admission", "decisions_per_s": round(decisions), "requests": n,
            "rate_per_s": rate, "p99_ms": round(p99(admission_ms), 2),
            "baseline_p99_ms": round(p99(baseline_ms), 2), "added_p99_ms": round(added, 2),
            "p50_ms": round(statistics.median(admission_ms), 2),
            "baseline_p50_ms": round(statistics.median(baseline_ms), 2)}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="per latency round (two counted per agent, after two discarded)")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.requests, args.rate, args.seconds))))
