"""A (re)started admission agent decides only once it has read the fleet.

Without the wait, the first requests after a restart met a router with no live
capacity and were rejected as ``over_capacity`` (or routed to a worker the health
agent had already judged unhealthy).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

from agents.admission import FleetView, follow_health, follow_heartbeats
from agents.control import AdmissionController
from schemas.config import Settings
from schemas.events import HealthEvent
from schemas.tenancy import ControlPlaneConfig
from streams.sink import KafkaEventSink
from streams.topics import HEALTH, HEARTBEATS
from tests.builders import make_heartbeat


async def test_followers_mark_the_fleet_known_only_once_beats_and_verdicts_are_read(
        settings: Settings, stack: Any) -> None:
    model = f"fleet-{uuid.uuid4().hex[:8]}"
    sink = KafkaEventSink(settings.bootstrap, client_id="test-fleet-view")
    await sink.start()
    try:
        for worker, shards in ((f"{model}-a", [0, 1]), (f"{model}-b", [2, 3])):
            await sink.send(HEARTBEATS, make_heartbeat(worker=worker, model=model, shards=shards,
                                                       sent_at=time.time()), key=worker)
        await sink.send(HEALTH, HealthEvent(worker=f"{model}-b", model=model,
                                            previous="healthy", state="unhealthy",
                                            reason="test: hung"), key=f"{model}-b")
        await sink.flush()
    finally:
        await sink.stop()
    ctl = AdmissionController(ControlPlaneConfig(), models=[model])
    fleet = FleetView(wait_s=60.0)
    assert ctl.router.healthy_shards(model, time.time()) == []
    followers = [asyncio.create_task(follow_heartbeats(settings.bootstrap, ctl,
                                                       caught_up=fleet.beats)),
                 asyncio.create_task(follow_health(settings.bootstrap, ctl,
                                                   caught_up=fleet.health))]
    try:
        await fleet.known()
        assert fleet.beats.is_set() and fleet.health.is_set()
        # Both beats were read, and b's verdict: only a's shards take requests.
        assert ctl.router.healthy_shards(model, time.time()) == [0, 1]
    finally:
        for task in followers:
            task.cancel()
        for task in followers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
