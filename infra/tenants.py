"""Live per-tenant usage against limits, from the compacted ``tw.metering`` topic."""

from __future__ import annotations

import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import TypeAdapter

from infra import InfraError
from schemas.events import TenantUsage
from streams import DecodeError
from streams.codec import decode
from streams.topics import METERING

_SNAPSHOT: TypeAdapter[TenantUsage] = TypeAdapter(TenantUsage)
STALE_S = 10.0  # the metering agent publishes every 2 s; older snapshots are flagged


async def latest_usage(bootstrap: str) -> dict[str, TenantUsage]:
    """The newest snapshot of every tenant (the topic is compacted by tenant)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        await consumer.start()
        tp = TopicPartition(METERING, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        latest: dict[str, TenantUsage] = {}
        while await consumer.position(tp) < end:
            for records in (await consumer.getmany(tp, timeout_ms=500)).values():
                for record in records:
                    try:
                        snap = decode(record.value, _SNAPSHOT)
                    except DecodeError:
                        continue  # not ours to judge here; the agent wrote it
                    latest[snap.tenant] = snap
        return latest
    except KafkaError as exc:
        raise InfraError(f"reading {METERING} on {bootstrap}: {exc!r}") from exc
    finally:
        await consumer.stop()


def table(snapshots: dict[str, TenantUsage], now: float | None = None) -> list[str]:
    now = time.time() if now is None else now
    head = (f"{'tenant':<16} {'limit/min':>10} {'burst':>8} {'reserved':>9} {'MU this min':>11} "
            f"{'used':>6} {'MU last 10s':>11} {'bucket':>9} {'pending':>7} {'admitted':>8} "
            f"{'rejected':>8} {'charged':>11} {'actual':>11}")
    lines = [head]
    for tenant in sorted(snapshots):
        s = snapshots[tenant]
        minute, recent = sum(s.mu_last_minute.values()), sum(s.mu_last_10s.values())
        used = f"{minute / s.limit_mu_per_min:6.0%}" if s.limit_mu_per_min else "     -"
        stale = "  (stale)" if now - s.at > STALE_S else ""
        lines.append(f"{tenant:<16} {s.limit_mu_per_min:>10.1f} {s.burst_mu:>8.1f} "
                     f"{s.reservation_mu_per_min:>9.1f} {minute:>11.2f} {used} {recent:>11.2f} "
                     f"{s.bucket_mu:>9.1f} {s.pending:>7} {s.admitted:>8} {s.rejected:>8} "
                     f"{s.charged_mu:>11.3f} {s.actual_mu:>11.3f}{stale}")
    return lines
