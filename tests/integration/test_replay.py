"""The ServeGen replay through the real admission agent, with a kill -9 in the middle."""

from __future__ import annotations

import pytest

from infra.replay import Replay, replay_settings
from infra.stack import down, up
from schemas.config import Settings


@pytest.fixture(scope="module")
async def replay_stack(tmp_path_factory: pytest.TempPathFactory, settings: Settings, stack):
    # Its own broker; the session's ClickHouse server (chDB is one per process).
    base = Settings(kafka_port=39092, kafka_controller_port=39093, tenant_partitions=4,
                    shard_partitions=4, clickhouse_url=settings.clickhouse_server_url)
    settings = replay_settings(tmp_path_factory.mktemp("replay"), base)
    await up(settings, print)
    yield settings
    down(settings, print)


async def test_replay_with_agent_killed_keeps_limits_reservations_and_exact_totals(
        replay_stack):
    # 2 trace minutes at the day's peak, 8x faster: ~15 s of traffic, agent killed at 6 s.
    job = Replay(replay_stack, print, start_s=78000, duration_s=120, speedup=8, kill_at_s=6)
    report = await job.run()
    print(report.model_dump_json())
    assert report.agent_killed_at_s is not None
    assert report.lost == 0 and report.pending_after == 0
    assert report.admitted > 0 and report.rejected.get("rate_limited", 0) > 0
    assert report.charged_mu == report.actual_mu_agent == report.actual_mu_workers
    assert report.window_violations == 0 and report.window_max_ratio <= 1.0
    assert report.provisioned_rejected_within_reservation == 0
