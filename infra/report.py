"""`tokenweir report`: usage, outcomes, latency, scaling and alerts read back from ClickHouse.

:func:`collect` turns the tables into a :class:`Report` (figures only); the renderers
turn a report into terminal tables or a self-contained HTML page with matplotlib plots.
Every query runs on both chDB and Debian's ClickHouse 18.16, so the SQL stays in the
old dialect: no JOINs, times read as epoch seconds (``toUInt32``) so that neither
backend's time zone handling leaks into the figures.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field, computed_field

from infra import InfraError
from infra.clickhouse.store import ClickHouseStore

TABLES = ("usage_events", "request_results", "scale_decisions", "alerts", "usage_minute",
          "results_minute")
LEVELS = (0.5, 0.95, 0.99)
ALL = "(all)"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class ReportError(InfraError):
    """The report cannot be made: bad arguments or tables missing."""


class Percentiles(BaseModel):
    p50: float  # s
    p95: float  # s
    p99: float  # s


class TenantFigures(BaseModel):
    tenant: str
    model_units: float = 0.0  # MU, from usage_events
    input_tokens: int = 0
    output_tokens: int = 0
    requests: int = 0  # replies recorded: ok + error + rejected
    ok: int = 0
    errors: int = 0
    rejected: int = 0
    # Over ok replies only: a rejection or error has no meaningful latency.
    first_token_s: Percentiles | None = None  # queue_s + ttft_s: submission to first token
    total_s: Percentiles | None = None  # submission to last token

    @computed_field  # type: ignore[prop-decorator]
    @property
    def rejection_share(self) -> float:  # fraction of requests, 0..1
        return self.rejected / self.requests if self.requests else 0.0


class UsageMinute(BaseModel):
    minute: datetime  # naive UTC, start of the minute
    tenant: str
    model_units: float  # MU in this minute
    requests: int


class ResultsMinute(BaseModel):
    minute: datetime  # naive UTC, start of the minute
    replies: int
    ok: int
    errors: int
    rejected: int


class ScalePoint(BaseModel):
    model: str
    at: datetime  # naive UTC
    current: int  # replicas
    desired: int  # replicas
    demand_stable_mu_per_min: float  # MU/min


class AlertSummary(BaseModel):
    rule: str
    subject: str
    severity: str
    count: int
    last_fired: datetime  # naive UTC
    last_message: str


class Report(BaseModel):
    database: str
    generated_at: datetime  # naive UTC
    since: datetime | None  # naive UTC; None: everything stored
    tenants: list[TenantFigures] = []
    usage_minutes: list[UsageMinute] = []
    results_minutes: list[ResultsMinute] = []
    scaling: list[ScalePoint] = []
    alerts: list[AlertSummary] = []
    overall: TenantFigures = Field(default_factory=lambda: TenantFigures(tenant=ALL))

    @property
    def models(self) -> list[str]:
        return sorted({p.model for p in self.scaling})


# ---------------------------------------------------------------------------- since


def parse_since(text: str | None, now: datetime) -> datetime | None:
    """``90s``/``15m``/``2h``/``7d``/``1w`` back from ``now``, or an ISO timestamp (UTC if
    it has no zone). Returns naive UTC; None for no bound."""
    if text is None or not text.strip():
        return None
    now = _naive_utc(now)
    if match := _DURATION.match(text):
        return now - timedelta(seconds=float(match[1]) * _UNIT_S[match[2]])
    try:
        return _naive_utc(datetime.fromisoformat(text.strip()))
    except ValueError as exc:
        raise ReportError(f"--since {text!r}: expected a duration such as 15m, 2h, 7d or an "
                          "ISO timestamp such as 2026-01-31T12:00") from exc


def _naive_utc(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value


def _at(epoch_s: Any) -> datetime:
    return datetime.fromtimestamp(int(epoch_s), UTC).replace(tzinfo=None)


def _epoch(value: datetime) -> int:
    return int(value.replace(tzinfo=UTC).timestamp())


# ---------------------------------------------------------------------------- collect


async def collect(store: ClickHouseStore, database: str, since: datetime | None,
                  now: datetime | None = None) -> Report:
    """Read every figure the report shows; rows before the minute ``since`` falls in are
    left out (naive datetimes are UTC)."""
    await _check_tables(store, database)
    if since is not None:
        # Whole minutes, so that the per-minute rollups and the raw rows cover the same rows.
        since = _naive_utc(since).replace(second=0, microsecond=0)
    report = Report(database=database, since=since,
                    generated_at=_naive_utc(now or datetime.now(UTC)))
    report.tenants = await _tenants(store, database, since)
    # Without GROUP BY each query yields exactly one row, so this is one figure.
    report.overall = (await _figures(store, database, since, f"'{ALL}'"))[0]
    report.usage_minutes = await _usage_minutes(store, database, since)
    report.results_minutes = await _results_minutes(store, database, since)
    report.scaling = await _scaling(store, database, since)
    report.alerts = await _alerts(store, database, since)
    return report


async def _usage_minutes(store: ClickHouseStore, database: str,
                         since: datetime | None) -> list[UsageMinute]:
    # SummingMergeTree: rows of one key may not be merged yet, so always sum.
    rows = await store.query(
        f"SELECT toUInt32(minute) AS m, tenant, sum(model_units), sum(requests) "
        f"FROM {database}.usage_minute {_where('minute', since)} "
        "GROUP BY m, tenant ORDER BY m, tenant")
    return [UsageMinute(minute=_at(m), tenant=t, model_units=float(mu), requests=int(n))
            for m, t, mu, n in rows]


async def _results_minutes(store: ClickHouseStore, database: str,
                           since: datetime | None) -> list[ResultsMinute]:
    rows = await store.query(
        f"SELECT toUInt32(minute) AS m, sum(replies), sum(ok), sum(errors), sum(rejected) "
        f"FROM {database}.results_minute {_where('minute', since)} GROUP BY m ORDER BY m")
    return [ResultsMinute(minute=_at(m), replies=int(r), ok=int(o), errors=int(e),
                          rejected=int(j)) for m, r, o, e, j in rows]


async def _scaling(store: ClickHouseStore, database: str,
                   since: datetime | None) -> list[ScalePoint]:
    rows = await store.query(
        f"SELECT model, toUInt32(decided_at) AS at, current, desired, "
        f"demand_stable_mu_per_min FROM {database}.scale_decisions FINAL "
        f"{_where('decided_at', since)} ORDER BY model, at, decision_id")
    return [ScalePoint(model=model, at=_at(at), current=int(cur), desired=int(des),
                       demand_stable_mu_per_min=float(demand))
            for model, at, cur, des, demand in rows]


async def _alerts(store: ClickHouseStore, database: str,
                  since: datetime | None) -> list[AlertSummary]:
    rows = await store.query(
        f"SELECT rule, subject, severity, count() AS n, toUInt32(max(fired_at)) AS last, "
        f"argMax(message, fired_at) FROM {database}.alerts FINAL "
        f"{_where('fired_at', since)} GROUP BY rule, subject, severity "
        "ORDER BY last DESC, rule, subject")
    return [AlertSummary(rule=rule, subject=subject, severity=severity, count=int(n),
                         last_fired=_at(last), last_message=message)
            for rule, subject, severity, n, last, message in rows]


def _where(column: str, since: datetime | None) -> str:
    # toDateTime(<epoch>) is the same instant whatever the server's time zone.
    return "" if since is None else f"WHERE {column} >= toDateTime({_epoch(since)})"


async def _check_tables(store: ClickHouseStore, database: str) -> None:
    rows = await store.query(f"SELECT name FROM system.tables WHERE database = '{database}'")
    missing = sorted(set(TABLES) - {r[0] for r in rows})
    if missing:
        raise ReportError(f"ClickHouse database {database!r} lacks {', '.join(missing)}: "
                          "run `tokenweir up` to apply the migrations")


async def _tenants(store: ClickHouseStore, database: str,
                   since: datetime | None) -> list[TenantFigures]:
    figures = await _figures(store, database, since, "tenant")
    return sorted(figures, key=lambda f: (-f.model_units, f.tenant))


async def _figures(store: ClickHouseStore, database: str, since: datetime | None,
                   key: str) -> list[TenantFigures]:
    """One row per value of ``key``: ``tenant``, or a constant for everyone together."""
    group = "GROUP BY tenant" if key == "tenant" else ""
    figures: dict[str, TenantFigures] = {}
    usage = await store.query(
        f"SELECT {key}, sum(model_units), sum(input_tokens), sum(output_tokens) "
        f"FROM {database}.usage_events FINAL {_where('finished_at', since)} {group}")
    for name, mu, tokens_in, tokens_out in usage:
        figures[name] = TenantFigures(tenant=name, model_units=float(mu),
                                      input_tokens=int(tokens_in), output_tokens=int(tokens_out))
    levels = ", ".join(str(q) for q in LEVELS)
    # quantilesExact: the sorted value at index floor(q * n), no interpolation.
    results = await store.query(
        f"SELECT {key}, count(), countIf(status = 'ok'), countIf(status = 'error'), "
        f"countIf(status = 'rejected'), "
        f"quantilesExactIf({levels})(queue_s + ttft_s, status = 'ok'), "
        f"quantilesExactIf({levels})(total_s, status = 'ok') "
        f"FROM {database}.request_results FINAL {_where('completed_at', since)} {group}")
    for name, n, ok, errors, rejected, first_token, total in results:
        t = figures.setdefault(name, TenantFigures(tenant=name))
        t.requests, t.ok, t.errors, t.rejected = int(n), int(ok), int(errors), int(rejected)
        # Over no ok rows the quantiles read 0, not NULL: say "no figure" instead.
        if t.ok:
            t.first_token_s, t.total_s = _percentiles(first_token), _percentiles(total)
    return list(figures.values())


def _percentiles(values: Sequence[Any]) -> Percentiles:
    return Percentiles(**{f"p{round(q * 100)}": float(v)
                          for q, v in zip(LEVELS, values, strict=True)})


# ---------------------------------------------------------------------------- text


def render_text(report: Report) -> str:
    window = (f"since {report.since:%Y-%m-%d %H:%M:%S} UTC" if report.since
              else "all stored rows")
    parts = [f"tokenweir report: database {report.database}, {window}, "
             f"generated {report.generated_at:%Y-%m-%d %H:%M:%S} UTC"]
    parts += ["", "TENANTS", _tenant_table(report)]
    parts += ["", "REPLICAS AGAINST DEMAND (per model; last decision in each interval)"]
    parts += [_scaling_table(report, model) for model in report.models] or \
        ["no scale decisions"]
    parts += ["", "ALERTS", _alert_table(report.alerts) if report.alerts else "no alerts"]
    return "\n".join(parts) + "\n"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]],
          right: Sequence[bool] | None = None) -> str:
    """Fixed-width columns; ``right`` marks right-aligned (numeric) ones."""
    right = right or [False] * len(headers)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w)
                         for c, w, r in zip(cells, widths, right, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _ms(p: Percentiles | None) -> list[str]:
    if p is None:
        return ["-", "-", "-"]
    return [f"{v * 1000:,.0f}" for v in (p.p50, p.p95, p.p99)]


def _tenant_row(t: TenantFigures) -> list[str]:
    return [t.tenant, f"{t.model_units:,.1f}", f"{t.input_tokens:,}", f"{t.output_tokens:,}",
            f"{t.requests:,}", f"{t.rejected:,}", f"{t.rejection_share:.1%}", f"{t.errors:,}",
            *_ms(t.first_token_s), *_ms(t.total_s)]


TENANT_HEADERS = ["tenant", "MU", "input tok", "output tok", "requests", "rejected", "rej %",
                  "errors", "1st token p50 ms", "p95", "p99", "total p50 ms", "p95", "p99"]


def _tenant_table(report: Report) -> str:
    if not report.tenants:
        return "no usage or results recorded"
    rows = [_tenant_row(t) for t in report.tenants]
    if len(report.tenants) > 1:
        rows.append(_tenant_row(report.overall))
    return table(TENANT_HEADERS, rows, [False] + [True] * (len(TENANT_HEADERS) - 1))


def _buckets(points: list[ScalePoint], max_rows: int = 12) -> list[list[ScalePoint]]:
    """Consecutive decisions split into at most ``max_rows`` equal time intervals."""
    span_s = (points[-1].at - points[0].at).total_seconds()
    width_s = max(span_s / max_rows, 1e-9)
    groups: dict[int, list[ScalePoint]] = {}
    for p in points:
        index = min(int((p.at - points[0].at).total_seconds() / width_s), max_rows - 1)
        groups.setdefault(index, []).append(p)
    return [groups[i] for i in sorted(groups)]


def _scaling_table(report: Report, model: str) -> str:
    points = [p for p in report.scaling if p.model == model]
    rows = []
    for group in _buckets(points):
        last = group[-1]
        demand = sum(p.demand_stable_mu_per_min for p in group) / len(group)
        rows.append([f"{group[0].at:%Y-%m-%d %H:%M:%S}", str(len(group)), str(last.current),
                     str(last.desired), str(max(p.desired for p in group)), f"{demand:,.1f}"])
    headers = ["from (UTC)", "decisions", "current", "desired", "max desired",
               "demand MU/min (mean)"]
    return f"model {model}\n" + table(headers, rows, [False] + [True] * 5)


def _alert_table(alerts: list[AlertSummary]) -> str:
    rows = [[a.rule, a.subject, a.severity, str(a.count), f"{a.last_fired:%Y-%m-%d %H:%M:%S}",
             a.last_message] for a in alerts]
    return table(["rule", "subject", "severity", "count", "last fired (UTC)", "last message"],
                 rows, [False, False, False, True, False, False])


# ---------------------------------------------------------------------------- html

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.8em;
     border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta { color: #666; } img { max-width: 100%; display: block; margin: 0.8em 0; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { padding: 0.3em 0.6em; border-bottom: 1px solid #eee; text-align: left; }
th { background: #f5f5f5; } td.num, th.num { text-align: right;
     font-variant-numeric: tabular-nums; }
tr.total td { font-weight: bold; border-top: 2px solid #ccc; }
.sev-critical { color: #b00020; font-weight: bold; } .sev-warning { color: #b26a00; }
.empty { color: #888; font-style: italic; }
"""
_MAX_TENANTS_PLOTTED = 8  # the rest share one "other" band


def render_html(report: Report) -> str:
    """One self-contained page: plots are PNGs inlined as base64 data URIs."""
    window = (f"since {report.since:%Y-%m-%d %H:%M:%S} UTC" if report.since
              else "all stored rows")
    body = [f"<h1>tokenweir report</h1><p class='meta'>database <b>{_e(report.database)}</b>, "
            f"{window}, generated {report.generated_at:%Y-%m-%d %H:%M:%S} UTC</p>",
            "<h2>Tenants</h2>", _tenant_html(report),
            "<h2>Usage per minute</h2>", _plot_or_note(_usage_plot, report, "no usage rows"),
            "<h2>Requests and rejections per minute</h2>",
            _plot_or_note(_results_plot, report, "no request results"),
            "<h2>Latency per tenant</h2>",
            _plot_or_note(_latency_plot, report, "no completed requests"),
            "<h2>Replicas against demand</h2>"]
    body += [_img(_scaling_plot(report, model)) for model in report.models] or \
        ["<p class='empty'>no scale decisions</p>"]
    body += ["<h2>Alerts</h2>", _alert_html(report.alerts)]
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>tokenweir report: {_e(report.database)}</title><style>{_CSS}</style>"
            "</head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _e(text: object) -> str:
    return html.escape(str(text))


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool],
                row_classes: Sequence[str] | None = None) -> str:
    head = "".join(f"<th class='{'num' if n else ''}'>{_e(h)}</th>"
                   for h, n in zip(headers, numeric, strict=True))
    classes = row_classes or [""] * len(rows)
    body = "".join(
        f"<tr class='{c}'>" + "".join(f"<td class='{'num' if n else ''}'>{cell}</td>"
                                      for cell, n in zip(row, numeric, strict=True)) + "</tr>"
        for row, c in zip(rows, classes, strict=True))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _tenant_html(report: Report) -> str:
    if not report.tenants:
        return "<p class='empty'>no usage or results recorded</p>"
    tenants = [*report.tenants, report.overall] if len(report.tenants) > 1 else report.tenants
    rows = [[_e(c) for c in _tenant_row(t)] for t in tenants]
    classes = [""] * len(report.tenants) + (["total"] if len(tenants) > len(report.tenants)
                                            else [])
    headers = [h if h not in ("p95", "p99") else f"{h} ms" for h in TENANT_HEADERS]
    return _html_table(headers, rows, [False] + [True] * (len(headers) - 1), classes)


def _alert_html(alerts: list[AlertSummary]) -> str:
    if not alerts:
        return "<p class='empty'>no alerts</p>"
    rows = [[_e(a.rule), _e(a.subject), f"<span class='sev-{_e(a.severity)}'>"
             f"{_e(a.severity)}</span>", str(a.count), f"{a.last_fired:%Y-%m-%d %H:%M:%S}",
             _e(a.last_message)] for a in alerts]
    return _html_table(["rule", "subject", "severity", "count", "last fired (UTC)",
                        "last message"], rows, [False, False, False, True, False, False])


def _img(png: bytes) -> str:
    return f"<img alt='plot' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _plot_or_note(plot: Any, report: Report, note: str) -> str:
    png = plot(report)
    return _img(png) if png is not None else f"<p class='empty'>{_e(note)}</p>"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return buf.getvalue()


def _time_axis(ax: Any) -> None:
    import matplotlib.dates as mdates

    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.set_xlabel("time (UTC)")
    ax.grid(True, alpha=0.3)


def _minutes(first: datetime, last: datetime) -> list[datetime]:
    count = int((last - first).total_seconds() // 60) + 1
    return [first + timedelta(minutes=i) for i in range(count)]


def _usage_plot(report: Report) -> bytes | None:
    if not report.usage_minutes:
        return None
    minutes = _minutes(report.usage_minutes[0].minute, report.usage_minutes[-1].minute)
    index = {m: i for i, m in enumerate(minutes)}
    ranked = [t.tenant for t in report.tenants if t.model_units > 0]
    shown = ranked[:_MAX_TENANTS_PLOTTED]
    series: dict[str, list[float]] = {name: [0.0] * len(minutes) for name in shown}
    for u in report.usage_minutes:
        name = u.tenant if u.tenant in series else "other"
        series.setdefault(name, [0.0] * len(minutes))[index[u.minute]] += u.model_units
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 4.2))
    # Steps, not slopes: each figure is one whole minute's MU.
    ax.stackplot(minutes, list(series.values()), labels=list(series), step="post", alpha=0.85)
    ax.set_title("Model units per minute, stacked by tenant")
    ax.set_ylabel("MU per minute")
    ax.set_ylim(bottom=0)
    _time_axis(ax)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="tenant")
    return _png(fig)


def _results_plot(report: Report) -> bytes | None:
    if not report.results_minutes:
        return None
    rows = report.results_minutes
    minutes = _minutes(rows[0].minute, rows[-1].minute)
    index = {m: i for i, m in enumerate(minutes)}
    counts = {"requests": [0] * len(minutes), "rejected": [0] * len(minutes),
              "errors": [0] * len(minutes)}
    for r in rows:
        i = index[r.minute]
        counts["requests"][i] += r.replies
        counts["rejected"][i] += r.rejected
        counts["errors"][i] += r.errors
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 3.8))
    styles = {"requests": "tab:blue", "rejected": "tab:red", "errors": "tab:orange"}
    for name, values in counts.items():
        ax.step(minutes, values, where="post", label=name, color=styles[name], lw=1.4)
    ax.fill_between(minutes, counts["rejected"], step="post", color="tab:red", alpha=0.15)
    ax.set_title("Requests (all replies) against rejections and errors per minute")
    ax.set_ylabel("requests per minute")
    ax.set_ylim(bottom=0)
    _time_axis(ax)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _png(fig)


def _latency_plot(report: Report) -> bytes | None:
    tenants = [t for t in report.tenants if t.first_token_s is not None]
    if not tenants:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=False)
    width = 0.26
    names = [t.tenant for t in tenants]
    positions = list(range(len(names)))
    colours = {"p50": "#4c72b0", "p95": "#dd8452", "p99": "#c44e52"}
    for ax, attr, title in ((axes[0], "first_token_s", "Time to first token (queue + TTFT)"),
                            (axes[1], "total_s", "Total time (submission to last token)")):
        for k, level in enumerate(("p50", "p95", "p99")):
            values = [getattr(getattr(t, attr), level) * 1000 for t in tenants]
            ax.bar([p + (k - 1) * width for p in positions], values, width, label=level,
                   color=colours[level])
        ax.set_xticks(positions, names, rotation=30 if len(names) > 4 else 0, ha="right"
                      if len(names) > 4 else "center")
        ax.set_title(title)
        ax.set_xlabel("tenant")
        ax.set_ylabel("latency (ms)")
        ax.grid(True, axis="y", alpha=0.3)
        # Headroom above the tallest bar keeps the legend clear of the bars.
        top = max(getattr(t, attr).p99 for t in tenants) * 1000
        ax.set_ylim(0, top * 1.25 if top > 0 else 1)
        ax.legend(fontsize=8, title="percentile", ncol=3, loc="upper center")
    return _png(fig)


def _scaling_plot(report: Report, model: str) -> bytes:
    points = [p for p in report.scaling if p.model == model]
    times = [p.at for p in points]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 3.8))
    ax.step(times, [p.current for p in points], where="post", label="current replicas",
            color="tab:blue", lw=1.6)
    ax.step(times, [p.desired for p in points], where="post", label="desired replicas",
            color="tab:green", lw=1.2, ls="--")
    ax.set_ylabel("replicas")
    top = max(max(p.current for p in points), max(p.desired for p in points))
    ax.set_ylim(0, math.ceil(top * 1.15) + 1)
    ax.yaxis.get_major_locator().set_params(integer=True)
    demand = ax.twinx()
    demand.plot(times, [p.demand_stable_mu_per_min for p in points], color="0.45", lw=1.0,
                label="demand (stable window)")
    demand.fill_between(times, [p.demand_stable_mu_per_min for p in points], color="0.6",
                        alpha=0.15)
    demand.set_ylabel("demand (MU per minute)")
    demand.set_ylim(bottom=0)
    ax.set_title(f"Replicas against demand: {model}")
    _time_axis(ax)
    lines = ax.get_legend_handles_labels()
    more = demand.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8)
    return _png(fig)
