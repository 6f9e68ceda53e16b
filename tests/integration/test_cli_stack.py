"""`tokenweir up/status/down` as an operator runs them, checked with kcat."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from infra import procs
from schemas.config import Settings
from streams.topics import registry


@pytest.fixture
def cli_settings(tmp_path) -> Settings:
    # Own ports and state dir: this test takes a whole stack up and down.
    return Settings(state_dir=tmp_path / "state", kafka_port=29092, kafka_controller_port=29093,
                    clickhouse_server=True, clickhouse_port=29000)


def tokenweir(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings.to_env()}
    return subprocess.run([sys.executable, "-m", "infra.cli", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_up_twice_status_kcat_then_down_leaves_nothing(cli_settings, kcat):
    first = tokenweir(cli_settings, "up")
    try:
        assert first.returncode == 0, first.stderr
        assert "kafka: started" in first.stdout
        assert "clickhouse: server started" in first.stdout

        second = tokenweir(cli_settings, "up")
        assert second.returncode == 0, second.stderr
        assert "up: nothing to do, already up" in second.stdout
        assert "0 created" in second.stdout and "0 migrations applied" in second.stdout

        status = tokenweir(cli_settings, "status")
        assert status.returncode == 0, status.stderr
        assert "reachable" in status.stdout
        listing = subprocess.run([kcat, "-b", cli_settings.bootstrap, "-L"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
        for topic in registry(cli_settings):
            assert f'topic "{topic.name}" with {topic.partitions} partitions' in listing
            assert f"topic     {topic.name}" in status.stdout
        pids = procs.tracked(cli_settings.run_dir())
        assert set(pids) == {"kafka", "clickhouse"}
    finally:
        stopped = tokenweir(cli_settings, "down")
    assert stopped.returncode == 0, stopped.stderr
    assert all(not procs.alive(pid) for pid in pids.values())
    assert procs.tracked(cli_settings.run_dir()) == {}
    after = tokenweir(cli_settings, "status")
    assert after.returncode == 1 and "UNREACHABLE" in after.stdout
