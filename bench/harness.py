"""Shared pieces of the Kafka benchmarks: a throwaway stack, agent processes, rates.

Each benchmark brings up its own broker on its own ports under a temporary
state directory, so a run measures only what it starts, and tears it down.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from infra import procs
from infra.stack import down, up
from schemas.config import Settings


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@asynccontextmanager
async def bench_stack(name: str, control_toml: str, *, port: int = 29092,
                      tenant_partitions: int = 8) -> AsyncIterator[Settings]:
    state = Path(tempfile.mkdtemp(prefix=f"tw-bench-{name}-"))
    (state / "control.toml").write_text(control_toml)
    settings = Settings(state_dir=state, control_config=state / "control.toml",
                        kafka_port=port, kafka_controller_port=port + 1,
                        tenant_partitions=tenant_partitions, shard_partitions=4)
    try:
        await up(settings, log)  # inside: a broker started before a failure is stopped
        yield settings
    except BaseException:
        for path in sorted((state / "logs").glob("agent-*.log")):
            tail = path.read_text(errors="replace").splitlines()[-30:]
            log(f"--- last lines of {path.name}:\n" + "\n".join(tail))
        raise
    finally:
        down(settings, log)
        shutil.rmtree(state, ignore_errors=True)


def start_agent(settings: Settings, name: str = "admission") -> None:
    env = {**os.environ, **settings.to_env()}
    procs.spawn(settings.run_dir(), f"agent-{name}",
                [sys.executable, "-m", "infra.cli", "agent", name],
                log_path=settings.state_dir / "logs" / f"agent-{name}.log", env=env)


def stop_agent(settings: Settings, name: str = "admission") -> None:
    procs.stop(settings.run_dir(), f"agent-{name}")


async def committed(admin: AIOKafkaAdminClient, group: str, topic: str) -> int:
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    except KafkaError:
        return 0  # the group (or its coordinator) does not exist yet
    return sum(max(0, meta.offset) for tp, meta in offsets.items() if tp.topic == topic)


async def group_committed(bootstrap: str, group: str, topic: str) -> int:
    """Records of ``topic`` the group has committed, over all partitions."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return await committed(admin, group, topic)
    finally:
        await admin.close()


async def group_rate(bootstrap: str, group: str, topic: str, total: int, *, after: int = 0,
                     timeout_s: float = 600.0) -> float:
    """Records/s a consumer group commits on ``topic``, from its first progress until it
    has committed ``total`` more than ``after`` (what it had committed before).

    Starting the clock at the first committed progress leaves process start-up,
    group join and table recovery out: what is measured is steady consumption.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout_s
        first: tuple[float, int] | None = None
        while time.monotonic() < deadline:
            done = await committed(admin, group, topic) - after
            now = time.monotonic()
            if first is None and done > 0:
                first = (now, done)
            if done >= total and first is not None:
                if done == first[1]:
                    raise RuntimeError("all records were committed at once: use more records")
                return (done - first[1]) / (now - first[0])
            await asyncio.sleep(0.05)
        raise RuntimeError(f"group {group} did not commit {total} more on {topic}")
    finally:
        await admin.close()


async def raw_consumer_rate(bootstrap: str, topic: str, total: int,
                            group_id: str = "bench-raw") -> float:
    """Records/s of a bare aiokafka consumer reading ``topic`` from the beginning."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group_id,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        seen, n0, started = 0, 0, None
        while seen < total:
            batches = await consumer.getmany(timeout_ms=1000)
            n = sum(len(records) for records in batches.values())
            if n and started is None:
                started, n0 = time.monotonic(), n  # the first fetch includes connection set-up
            seen += n
        if started is None:
            raise RuntimeError(f"no records on {topic}")
        return (seen - n0) / (time.monotonic() - started)
    finally:
        await consumer.stop()
