"""`up`, `down` and `status` of the local stack (what runs where, idempotently)."""

from __future__ import annotations

from collections.abc import Callable

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from pydantic import BaseModel

from infra import InfraError, procs
from infra.clickhouse.migrate import MigrationReport, migrate
from infra.clickhouse.server import LocalClickHouseServer
from infra.clickhouse.store import ClickHouseStore, open_store
from infra.kafka.broker import KafkaBroker, describe_cluster
from infra.topics import ProvisionReport, existing_partitions, provision
from schemas.config import Settings
from streams.lag import group_lags
from streams.topics import registry

Say = Callable[[str], None]


def clickhouse_store(settings: Settings) -> ClickHouseStore:
    return open_store(settings.clickhouse_server_url, settings.state_dir / "chdb")


class UpReport(BaseModel):
    kafka_started: bool
    clickhouse_started: bool
    topics: ProvisionReport
    tables: MigrationReport

    @property
    def changed(self) -> bool:
        return (self.kafka_started or self.clickhouse_started or self.topics.changed
                or bool(self.tables.applied))


async def up(settings: Settings, say: Say) -> UpReport:
    kafka_started = False
    if settings.manages_broker:
        kafka_started = await KafkaBroker(settings).start(progress=say)
        say(f"kafka: {'started' if kafka_started else 'already running'} "
            f"on {settings.bootstrap}")
    else:
        await describe_cluster(settings.bootstrap)
        say(f"kafka: using external cluster {settings.bootstrap}")
    clickhouse_started = False
    if settings.clickhouse_server:
        clickhouse_started = await LocalClickHouseServer(settings).start()
        say(f"clickhouse: server {'started' if clickhouse_started else 'already running'} "
            f"on 127.0.0.1:{settings.clickhouse_port}")
    topics = await provision(settings)
    say(f"topics: {len(topics.created)} created, {len(topics.unchanged)} unchanged"
        + (f" ({', '.join(topics.created)})" if topics.created else ""))
    for problem in topics.mismatched:
        say(f"topics: WARNING {problem}")
    store = clickhouse_store(settings)
    try:
        tables = await migrate(store, settings.clickhouse_database)
    finally:
        await store.close()
    say(f"clickhouse ({store.backend}): {len(tables.applied)} migrations applied, "
        f"{len(tables.already)} already applied")
    report = UpReport(kafka_started=kafka_started, clickhouse_started=clickhouse_started,
                      topics=topics, tables=tables)
    say("up: stack started or changed" if report.changed else "up: nothing to do, already up")
    return report


def down(settings: Settings, say: Say) -> list[str]:
    """Stop every process this state dir started: agents and workers first, then services."""
    run_dir = settings.run_dir()
    stopped = []
    services = {"kafka", "clickhouse"}
    for name in [n for n in procs.tracked(run_dir) if n not in services]:
        # An actuator stops its own workers: those are gone by the time we get to them.
        if (pid := procs.stop(run_dir, name)) is not None:
            stopped.append(f"{name} (pid {pid})")
    if (pid := LocalClickHouseServer(settings).stop()) is not None:
        stopped.append(f"clickhouse (pid {pid})")
    if (pid := KafkaBroker(settings).stop()) is not None:
        stopped.append(f"kafka (pid {pid})")
    say("down: stopped " + ", ".join(stopped) if stopped else "down: nothing was running")
    return stopped


class TopicStatus(BaseModel):
    name: str
    partitions: int | None  # None: missing
    expected: int


class GroupLag(BaseModel):
    group: str
    lag: int  # records behind the log end, summed over partitions


class Status(BaseModel):
    processes: dict[str, int]
    broker: str
    broker_reachable: bool
    broker_error: str | None = None
    topics: list[TopicStatus] = []
    consumer_lag: list[GroupLag] = []


async def status(settings: Settings) -> Status:
    result = Status(processes=procs.tracked(settings.run_dir()), broker=settings.bootstrap,
                    broker_reachable=False)
    try:
        await describe_cluster(settings.bootstrap, timeout_s=3)
    except InfraError as exc:
        result.broker_error = str(exc)
        return result
    result.broker_reachable = True
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap, request_timeout_ms=5000)
    try:
        await admin.start()
        specs = registry(settings)
        have = await existing_partitions(admin, [s.name for s in specs])
        result.topics = [TopicStatus(name=s.name, partitions=have.get(s.name),
                                     expected=s.partitions) for s in specs]
        result.consumer_lag = await _lag(admin, settings.bootstrap)
    except KafkaError as exc:
        result.broker_error = repr(exc)
    finally:
        await admin.close()
    return result


async def _lag(admin: AIOKafkaAdminClient, bootstrap: str) -> list[GroupLag]:
    ends = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await ends.start()
    try:
        lags = await group_lags(admin, ends)
    finally:
        await ends.stop()
    return [GroupLag(group=g, lag=lag) for g, lag in lags.items()]
