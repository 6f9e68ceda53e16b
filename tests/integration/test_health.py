"""A silent hang on the real broker: detected, worker replaced, its requests completed, 0 lost.

The short version of ``python -m bench.hang``: the admission agent, the health
agent, the local actuator running two sim workers, signed traffic through
``tw.requests``; one worker's sim engine hangs (SIGUSR1).
"""

from __future__ import annotations

from typing import Any

from bench.hang import Scenario, run_scenario
from infra.topics import provision
from schemas.config import Settings
from tests.integration.conftest import SIGNER


async def test_silent_hang_is_detected_replaced_and_its_requests_completed_elsewhere(
        settings: Settings, stack: Any) -> None:
    scenario = Scenario(model="hang-sim", warmup_s=6.0, after_s=15.0, settle_timeout_s=90.0)
    hang_settings = settings.model_copy(update={"models": [scenario.model]})
    await provision(hang_settings)
    report = await run_scenario(hang_settings, scenario, SIGNER, "acme")
    print(report)
    assert report["detect_s"] is not None and report["detect_s"] <= 10
    assert report["replaced_s"] is not None  # the actuator respawned it under its name
    assert report["held_unanswered_at_hang_on_its_shards"] > 0
    assert report["replaced_and_completed_s"] is not None
    assert report["replaced_and_completed_s"] <= 60
    assert report["lost"] == 0 and report["rejected"] == 0
    assert report["results_ok"] == report["requests"]
