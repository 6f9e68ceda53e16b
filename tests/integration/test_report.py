"""`tokenweir report` read back from seeded tables, on chDB and on the ClickHouse server."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pytest
from click.testing import CliRunner, Result
from PIL import Image

from infra.cli import main
from infra.clickhouse.migrate import migrate
from infra.clickhouse.store import ClickHouseStore, ServerStore
from infra.report import ReportError, collect, render_html, render_text

_db_ids = itertools.count()
T0 = datetime(2026, 3, 1, 12, 0, 0)  # naive UTC
SINCE = T0 - timedelta(hours=1)
NOW = T0 + timedelta(hours=1)

USAGE_COLUMNS = ["request_id", "tenant", "model", "input_tokens", "output_tokens",
                 "cached_tokens", "images", "model_units", "status", "queue_s", "ttft_s",
                 "tpot_s", "worker", "shard", "finished_at"]
RESULT_COLUMNS = ["request_id", "tenant", "model", "status", "finish_reason", "error",
                  "input_tokens", "output_tokens", "queue_s", "ttft_s", "tpot_s", "total_s",
                  "worker", "shard", "completed_at"]
SCALE_COLUMNS = ["decision_id", "model", "current", "desired", "reason",
                 "demand_stable_mu_per_min", "demand_panic_mu_per_min", "utilisation",
                 "decided_at"]
ALERT_COLUMNS = ["alert_id", "rule", "subject", "severity", "message", "value", "threshold",
                 "fired_at"]


@dataclass
class Seed:
    """Rows to insert, with the figures the report must show computed alongside."""

    usage: list[tuple] = field(default_factory=list)
    results: list[tuple] = field(default_factory=list)
    scale: list[tuple] = field(default_factory=list)
    alerts: list[tuple] = field(default_factory=list)

    def add_request(self, rid: str, tenant: str, status: str, at: datetime, *, model: str,
                    mu: float, tokens_in: int, tokens_out: int, queue_s: float, ttft_s: float,
                    total_s: float) -> None:
        self.results.append((rid, tenant, model, status, "stop" if status == "ok" else "",
                             "boom" if status == "error" else "", tokens_in, tokens_out,
                             queue_s, ttft_s, 0.01, total_s, "w-1", 0, at))
        if status != "rejected":
            self.usage.append((rid, tenant, model, tokens_in, tokens_out, 0, 0, mu, status,
                               queue_s, ttft_s, 0.01, "w-1", 0, at))

    def in_window(self, rows: list[tuple]) -> list[tuple]:
        return [r for r in rows if r[-1] >= SINCE]


def seeded() -> Seed:
    seed = Seed()
    statuses = {"acme": ["ok"] * 17 + ["rejected"] * 2 + ["error"],
                "globex": ["ok"] * 9 + ["rejected"] * 6,
                "initech": ["rejected"] * 3}
    for tenant, kinds in statuses.items():
        for i, status in enumerate(kinds):
            seed.add_request(f"{tenant}-{i}", tenant, status, T0 + timedelta(seconds=37 * i),
                             model="llama-8b" if i % 3 else "qwen-7b", mu=0.5 + i * 0.25,
                             tokens_in=100 + i, tokens_out=10 * i, queue_s=0.01 * (i % 7),
                             ttft_s=0.05 + 0.003 * i, total_s=0.4 + 0.02 * i)
    # Before the window: counted only when the report covers everything.
    seed.add_request("old-1", "acme", "ok", SINCE - timedelta(days=2), model="llama-8b",
                     mu=100.0, tokens_in=1, tokens_out=1, queue_s=9.0, ttft_s=9.0, total_s=20.0)
    for model, replicas in (("llama-8b", [1, 1, 2, 3, 3, 2]), ("qwen-7b", [1, 2, 2, 1])):
        for i, current in enumerate(replicas):
            seed.scale.append((f"{model}-d{i}", model, current, current + (i % 2), "stable",
                               120.0 * current + i, 0.0, 0.5, T0 + timedelta(minutes=2 * i)))
    for i, (rule, subject, severity) in enumerate([
            ("rejection-share", "globex", "warning"), ("rejection-share", "globex", "warning"),
            ("worker-unhealthy", "w-3", "critical"), ("rejection-share", "initech", "info")]):
        seed.alerts.append((f"a-{i}", rule, subject, severity, f"message {i}", 0.4, 0.2,
                            T0 + timedelta(minutes=3 * i)))
    return seed


async def insert(store: ClickHouseStore, database: str, seed: Seed) -> None:
    await store.insert(f"{database}.usage_events", USAGE_COLUMNS, seed.usage)
    await store.insert(f"{database}.request_results", RESULT_COLUMNS, seed.results)
    await store.insert(f"{database}.scale_decisions", SCALE_COLUMNS, seed.scale)
    await store.insert(f"{database}.alerts", ALERT_COLUMNS, seed.alerts)


def exact_quantile(values: list[float], q: float) -> float:
    """ClickHouse's quantileExact: the sorted value at index floor(q * n)."""
    ordered = sorted(values)
    return ordered[min(math.floor(q * len(ordered)), len(ordered) - 1)]



@pytest.fixture
async def database(store) -> str:
    name = f"tw_report_{next(_db_ids)}"
    await migrate(store, name)
    return name


async def test_report_seeded_tables_figures_match_rows(store, database):
    seed = seeded()
    await insert(store, database, seed)

    report = await collect(store, database, SINCE, now=NOW)

    results, usage = seed.in_window(seed.results), seed.in_window(seed.usage)
    by_tenant = {t.tenant: t for t in report.tenants}
    assert sorted(by_tenant) == ["acme", "globex", "initech"]
    for tenant, figures in by_tenant.items():
        mine = [r for r in results if r[1] == tenant]
        mu = [u for u in usage if u[1] == tenant]
        assert figures.requests == len(mine)
        assert figures.rejected == sum(r[3] == "rejected" for r in mine)
        assert figures.errors == sum(r[3] == "error" for r in mine)
        assert figures.model_units == pytest.approx(sum(u[7] for u in mu))
        assert (figures.input_tokens, figures.output_tokens) == \
            (sum(u[3] for u in mu), sum(u[4] for u in mu))
    acme_ok = [r for r in results if r[1] == "acme" and r[3] == "ok"]
    acme = by_tenant["acme"]
    assert acme.first_token_s is not None and acme.total_s is not None
    assert acme.first_token_s.p95 == exact_quantile([r[8] + r[9] for r in acme_ok], 0.95)
    assert acme.total_s.p50 == exact_quantile([r[11] for r in acme_ok], 0.5)
    assert by_tenant["globex"].rejection_share == pytest.approx(6 / 15)
    assert by_tenant["initech"].first_token_s is None  # only rejections: no latency
    assert report.overall.rejected == 11


async def test_report_minute_rollups_sum_to_row_totals(store, database):
    seed = seeded()
    await insert(store, database, seed)

    report = await collect(store, database, SINCE, now=NOW)

    usage = seed.in_window(seed.usage)
    assert sum(m.model_units for m in report.usage_minutes) == \
        pytest.approx(sum(u[7] for u in usage))
    first_minute = [u for u in usage if u[-1] < T0 + timedelta(minutes=1)]
    assert {m.tenant: m.requests for m in report.usage_minutes if m.minute == T0} == \
        {t: sum(u[1] == t for u in first_minute) for t in {u[1] for u in first_minute}}
    assert sum(m.rejected for m in report.results_minutes) == 11
    assert sum(m.replies for m in report.results_minutes) == len(seed.in_window(seed.results))


async def test_report_scaling_and_alerts_read_back(store, database):
    seed = seeded()
    await insert(store, database, seed)

    report = await collect(store, database, SINCE, now=NOW)

    assert report.models == ["llama-8b", "qwen-7b"]
    llama = [(p.current, p.desired, p.at) for p in report.scaling if p.model == "llama-8b"]
    assert llama == [(r[2], r[3], r[8]) for r in seed.scale if r[1] == "llama-8b"]
    alerts = {(a.rule, a.subject): a for a in report.alerts}
    assert alerts[("rejection-share", "globex")].count == 2
    assert alerts[("rejection-share", "globex")].last_fired == T0 + timedelta(minutes=3)
    assert alerts[("rejection-share", "globex")].last_message == "message 1"
    assert alerts[("worker-unhealthy", "w-3")].severity == "critical"


async def test_report_without_since_includes_old_rows(store, database):
    seed = seeded()
    await insert(store, database, seed)

    report = await collect(store, database, None, now=NOW)

    acme = next(t for t in report.tenants if t.tenant == "acme")
    assert acme.requests == 21
    assert acme.model_units == pytest.approx(sum(u[7] for u in seed.usage if u[1] == "acme"))


async def test_report_since_mid_minute_covers_the_whole_minute(store, database):
    seed = seeded()
    await insert(store, database, seed)

    report = await collect(store, database, T0 + timedelta(seconds=30), now=NOW)

    assert report.since == T0
    assert report.overall.requests == len(seed.in_window(seed.results))
    assert sum(m.replies for m in report.results_minutes) == report.overall.requests


async def test_report_html_seeded_embeds_valid_png_plots(store, database):
    await insert(store, database, seeded())
    report = await collect(store, database, SINCE, now=NOW)

    page = render_html(report)

    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 3 + 2  # usage, results, latency, then one per model
    for data in images:
        png = Image.open(io.BytesIO(base64.b64decode(data)))
        png.verify()
        assert png.format == "PNG" and png.size[0] >= 1000
    assert "worker-unhealthy" in page and "<table>" in page


async def test_report_empty_tables_sensible_text_and_html(store, database):
    report = await collect(store, database, SINCE, now=NOW)

    text = render_text(report)
    page = render_html(report)

    assert report.tenants == [] and report.scaling == [] and report.alerts == []
    assert "no usage or results recorded" in text and "no alerts" in text
    assert "no scale decisions" in text
    assert "<img" not in page and "no usage rows" in page


async def test_report_missing_tables_raises_report_error(store):
    with pytest.raises(ReportError, match="tokenweir up"):
        await collect(store, f"tw_report_missing_{next(_db_ids)}", None)


async def test_report_cli_json_and_html_from_server(settings, stack, tmp_path, monkeypatch):
    server = ServerStore(settings.clickhouse_server_url)
    database = f"tw_report_cli_{next(_db_ids)}"
    try:
        await migrate(server, database)
        await insert(server, database, seeded())
    finally:
        await server.close()
    monkeypatch.setenv("TOKENWEIR_CLICKHOUSE_URL", settings.clickhouse_server_url)
    monkeypatch.setenv("TOKENWEIR_CLICKHOUSE_DATABASE", database)

    async def invoke(*args: str) -> Result:
        # The command runs its own event loop, so it cannot share this test's thread.
        return await asyncio.to_thread(CliRunner().invoke, main,
                                       ["--state-dir", str(tmp_path), "report", *args])

    as_json = await invoke("--json")
    text = await invoke("--since", SINCE.isoformat(), "--html", str(tmp_path / "r.html"))
    bad = await invoke("--since", "yesterday")

    assert as_json.exit_code == 0, as_json.output
    assert sum(t["requests"] for t in json.loads(as_json.output)["tenants"]) == 39
    assert text.exit_code == 0, text.output
    assert "acme" in text.output and (tmp_path / "r.html").read_text().count("<img") == 5
    assert bad.exit_code != 0 and "expected a duration" in bad.output
