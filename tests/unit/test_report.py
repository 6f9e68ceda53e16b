"""The report's renderers and arguments, on hand-built figures (no ClickHouse)."""

from __future__ import annotations

import base64
import io
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from PIL import Image

from infra.report import (
    AlertSummary,
    Percentiles,
    Report,
    ReportError,
    ResultsMinute,
    ScalePoint,
    TenantFigures,
    UsageMinute,
    parse_since,
    render_html,
    render_text,
    table,
)

T0 = datetime(2026, 3, 1, 12, 0, 0)


def make_report(**overrides) -> Report:  # type: ignore[no-untyped-def]
    acme = TenantFigures(tenant="acme", model_units=1234.5, input_tokens=120000,
                         output_tokens=4500, requests=200, ok=150, errors=10, rejected=40,
                         first_token_s=Percentiles(p50=0.120, p95=0.450, p99=0.9),
                         total_s=Percentiles(p50=1.5, p95=3.25, p99=4.0))
    initech = TenantFigures(tenant="initech", requests=5, rejected=5)
    fields = dict(
        database="tokenweir", generated_at=T0 + timedelta(hours=1), since=T0,
        tenants=[acme, initech],
        overall=TenantFigures(tenant="(all)", model_units=1234.5, input_tokens=120000,
                              output_tokens=4500, requests=205, ok=150, errors=10, rejected=45,
                              first_token_s=acme.first_token_s, total_s=acme.total_s),
        usage_minutes=[UsageMinute(minute=T0 + timedelta(minutes=m), tenant=t, model_units=5.0,
                                   requests=3) for m in range(5) for t in ("acme", "initech")],
        results_minutes=[ResultsMinute(minute=T0 + timedelta(minutes=m), replies=40, ok=30,
                                       errors=2, rejected=8) for m in range(5)],
        scaling=[ScalePoint(model="llama-8b", at=T0 + timedelta(minutes=m), current=1 + m // 2,
                            desired=1 + m // 2 + m % 2, demand_stable_mu_per_min=100.0 * m)
                 for m in range(6)],
        alerts=[AlertSummary(rule="rejection-share", subject="acme", severity="warning",
                             count=3, last_fired=T0 + timedelta(minutes=4),
                             last_message="acme rejected 20% <of> requests")],
    )
    fields.update(overrides)
    return Report(**fields)


def test_render_text_hand_built_shows_every_section():
    text = render_text(make_report())

    acme = next(line for line in text.splitlines() if line.startswith("acme "))
    assert acme.split() == ["acme", "1,234.5", "120,000", "4,500", "200", "40", "20.0%", "10",
                            "120", "450", "900", "1,500", "3,250", "4,000"]
    assert re.search(r"^initech .* 100\.0% .* -\s+-\s+-$", text, re.M)
    assert re.search(r"^\(all\)\s+1,234\.5 .* 205\s+45\s+22\.0%", text, re.M)
    assert "since 2026-03-01 12:00:00 UTC" in text and "model llama-8b" in text
    assert re.search(r"^2026-03-01 12:00:00\s+1\s+1\s+1\s+1\s+0\.0$", text, re.M)
    assert re.search(r"^rejection-share\s+acme\s+warning\s+3\s+2026-03-01 12:04:00", text, re.M)


def test_render_text_empty_report_says_so():
    text = render_text(Report(database="tokenweir", generated_at=T0, since=None))

    assert "all stored rows" in text
    assert "no usage or results recorded" in text
    assert "no scale decisions" in text and "no alerts" in text


def test_render_html_hand_built_embeds_one_png_per_plot():
    page = render_html(make_report())

    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 4  # usage, results, latency, one model
    for data in images:
        png = Image.open(io.BytesIO(base64.b64decode(data)))
        assert png.format == "PNG"
    assert "&lt;of&gt;" in page and "<of>" not in page  # messages are escaped
    assert "class='sev-warning'" in page


def test_table_numeric_columns_right_aligned():
    assert table(["name", "n"], [["a", "1"], ["bbb", "22"]], [False, True]).splitlines() == \
        ["name   n", "----  --", "a      1", "bbb   22"]


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param(None, None, id="none"),
    pytest.param("90s", T0 - timedelta(seconds=90), id="seconds"),
    pytest.param("15m", T0 - timedelta(minutes=15), id="minutes"),
    pytest.param("2h", T0 - timedelta(hours=2), id="hours"),
    pytest.param("1.5d", T0 - timedelta(hours=36), id="fractional-days"),
    pytest.param("1w", T0 - timedelta(days=7), id="week"),
    pytest.param("2026-02-28T08:30", datetime(2026, 2, 28, 8, 30), id="naive-iso-is-utc"),
    pytest.param("2026-02-28T10:30+02:00", datetime(2026, 2, 28, 8, 30), id="zoned-iso"),
])
def test_parse_since_valid_returns_naive_utc(text, expected):
    assert parse_since(text, T0.replace(tzinfo=UTC)) == expected


def test_parse_since_zoned_now_is_converted():
    now = datetime(2026, 3, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    assert parse_since("1h", now) == datetime(2026, 3, 1, 11, 0)


@pytest.mark.parametrize("text", [pytest.param("yesterday", id="word"),
                                  pytest.param("15 minutes", id="long-unit"),
                                  pytest.param("-5m", id="negative")])
def test_parse_since_invalid_raises_report_error(text):
    with pytest.raises(ReportError, match="expected a duration"):
        parse_since(text, T0)
