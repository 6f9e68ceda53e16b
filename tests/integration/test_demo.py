"""The README's main command, end to end on a short slice: every agent, the actuator,
sim workers, the sink, the totals check and the report, on chDB and on the server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from schemas.config import Settings
from tests.integration.conftest import PORT_BASE

# Two hours of the ServeGen day from 10:00, 0.2% of its requests, 240× faster:
# about 165 requests from 4 tenants over 30 s.
SLICE = ["--start", "36000", "--duration", "7200", "--speedup", "240", "--sample", "0.002",
         "--tenants", "4"]


def run_demo(state_dir: Path, html: Path, kafka_port: int, **env: str) -> str:
    environ = {**os.environ, "TOKENWEIR_KAFKA_PORT": str(kafka_port),
               "TOKENWEIR_KAFKA_CONTROLLER_PORT": str(kafka_port + 1), **env}
    done = subprocess.run(
        [sys.executable, "-m", "infra.cli", "--state-dir", str(state_dir), "demo", *SLICE,
         "--html", str(html)],
        env=environ, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def check_totals_and_report(out: str, html: Path) -> None:
    rows = re.findall(r"^(\S+)\s+clickhouse\s+(\d+)\s+(\d+)\s+(\d+).*\s(yes|NO)$", out, re.M)
    assert len(rows) == 4, out
    assert all(match == "yes" for *_, match in rows), out
    assert sum(int(requests) for _, requests, *_ in rows) > 100
    assert "TENANTS" in out and "REPLICAS AGAINST DEMAND" in out
    page = html.read_text()
    assert page.count("src='data:image/png;base64,") >= 3


def test_demo_embedded_totals_match_and_report_written(tmp_path: Path) -> None:
    html = tmp_path / "report.html"
    out = run_demo(tmp_path / "state", html, kafka_port=PORT_BASE + 600)
    check_totals_and_report(out, html)
    assert "(chdb, run" in out
    assert "down: stopped" in out


def test_demo_on_clickhouse_server_totals_match(tmp_path: Path, settings: Settings,
                                                stack: object) -> None:
    html = tmp_path / "report.html"
    out = run_demo(tmp_path / "state", html, kafka_port=PORT_BASE + 610,
                   TOKENWEIR_CLICKHOUSE_URL=str(settings.clickhouse_server_url),
                   TOKENWEIR_CLICKHOUSE_DATABASE="demo_test")
    check_totals_and_report(out, html)
    assert "(server, run" in out
