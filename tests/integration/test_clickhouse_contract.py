"""One contract, every ClickHouse backend: embedded chDB and Debian's server."""

from __future__ import annotations

import itertools
from datetime import datetime

import pytest

from infra.clickhouse.migrate import load, migrate
from infra.clickhouse.store import ClickHouseError

_db_ids = itertools.count()

USAGE_COLUMNS = ["request_id", "tenant", "model", "input_tokens", "output_tokens",
                 "cached_tokens", "images", "model_units", "status", "queue_s", "ttft_s",
                 "tpot_s", "worker", "shard", "finished_at"]


def usage_row(request_id: str, tenant: str, mu: float, at: datetime) -> tuple:
    return (request_id, tenant, "tiny-llama", 100, 20, 0, 0, mu, "ok", 0.01, 0.02, 0.003,
            "w-1", 0, at)



@pytest.fixture
def database() -> str:
    return f"tw_contract_{next(_db_ids)}"


async def test_migrations_apply_once_then_report_applied(store, database):
    first = await migrate(store, database)
    second = await migrate(store, database)
    assert first.applied == [f"{m.version:04d}_{m.name}" for m in load()]
    assert first.applied[:3] == ["0001_usage", "0002_operations", "0003_minute_rollups"]
    assert first.already == []
    assert second.applied == [] and second.already == first.applied
    tables = await store.query(f"SELECT name FROM system.tables WHERE database = '{database}' "
                               "ORDER BY name")
    assert {"alerts", "health_events", "request_results", "scale_decisions",
            "schema_migrations", "usage_events", "usage_minute", "results_minute",
            } <= {t[0] for t in tables}


async def test_usage_redelivered_event_counts_once(store, database):
    await migrate(store, database)
    at = datetime(2026, 11, 24, 12, 30, 15)
    rows = [usage_row("r-1", "acme", 1.5, at), usage_row("r-2", "acme", 2.0, at),
            usage_row("r-3", "globex", 4.25, at)]
    await store.insert(f"{database}.usage_events", USAGE_COLUMNS, rows)
    await store.insert(f"{database}.usage_events", USAGE_COLUMNS, rows[:1])  # redelivery
    totals = await store.query(
        f"SELECT tenant, count(), sum(model_units), sum(input_tokens) "
        f"FROM {database}.usage_events FINAL GROUP BY tenant ORDER BY tenant")
    assert totals == [("acme", 2, 3.5, 200), ("globex", 1, 4.25, 100)]


async def test_datetime_and_types_round_trip(store, database):
    await migrate(store, database)
    at = datetime(2026, 1, 2, 3, 4, 5)
    await store.insert(f"{database}.usage_events", USAGE_COLUMNS, [usage_row("r-9", "t", 0.5, at)])
    [(finished, shard, mu, tenant)] = await store.query(
        f"SELECT finished_at, shard, model_units, tenant FROM {database}.usage_events")
    assert (finished, shard, mu, tenant) == (at, 0, 0.5, "t")


@pytest.mark.parametrize("at", [
    pytest.param(1_767_323_045, id="whole-epoch-seconds"),
    pytest.param(1_767_323_045.999, id="fractional-epoch-seconds-truncated"),
    pytest.param(datetime(2026, 1, 2, 3, 4, 5), id="naive-utc-datetime"),
])
async def test_datetime_column_takes_epoch_seconds_or_datetimes(store, database, at):
    await migrate(store, database)
    await store.insert(f"{database}.usage_events", USAGE_COLUMNS, [usage_row("r-1", "t", 1.0, at)])
    [(finished,)] = await store.query(
        f"SELECT toUnixTimestamp(finished_at) FROM {database}.usage_events")
    [(minute,)] = await store.query(
        f"SELECT toUnixTimestamp(minute) FROM {database}.usage_minute")
    assert (finished, minute) == (1_767_323_045, 1_767_323_040)


async def test_per_minute_aggregate_query_runs_on_both(store, database):
    await migrate(store, database)
    rows = [usage_row(f"r-{i}", "acme", 1.0, datetime(2026, 1, 1, 0, i // 3, i % 60))
            for i in range(9)]
    await store.insert(f"{database}.usage_events", USAGE_COLUMNS, rows)
    minutes = await store.query(
        f"SELECT toStartOfMinute(finished_at) AS minute, sum(model_units) "
        f"FROM {database}.usage_events FINAL GROUP BY minute ORDER BY minute")
    assert [m[1] for m in minutes] == [3.0, 3.0, 3.0]


async def test_alert_without_figures_reads_back_null(store, database):
    await migrate(store, database)
    columns = ["alert_id", "rule", "subject", "severity", "message", "value", "threshold",
               "fired_at"]
    await store.insert(f"{database}.alerts", columns, [
        ("a-1", "worker-down", "w-1", "critical", "gone", None, None, 1_767_323_045),
        ("a-2", "lag", "sink", "warning", "behind", 1200.0, 1000.0, 1_767_323_046)])
    rows = await store.query(f"SELECT alert_id, value, threshold FROM {database}.alerts FINAL "
                             "ORDER BY alert_id")
    assert rows == [("a-1", None, None), ("a-2", 1200.0, 1000.0)]


async def test_bad_sql_raises_clickhouse_error(store):
    with pytest.raises(ClickHouseError):
        await store.query("SELECT no_such_column FROM system.one")


@pytest.mark.parametrize("count", [pytest.param(3, id="few"),
                                   pytest.param(30_000, id="beyond-a-query-literal")])
async def test_existing_ids_finds_exactly_the_stored_ones(store, database, count):
    await migrate(store, database)
    at = datetime(2026, 3, 4, 5, 6, 7)
    stored = [f"req-{i:06d}" for i in range(0, count, 2)]
    await store.insert(f"{database}.usage_events", USAGE_COLUMNS,
                       [usage_row(rid, "acme", 1.0, at) for rid in stored])
    asked = [f"req-{i:06d}" for i in range(count)]
    found = await store.existing_ids(f"{database}.usage_events", "request_id", asked)
    assert found == set(stored)
    assert await store.existing_ids(f"{database}.usage_events", "request_id", []) == set()
