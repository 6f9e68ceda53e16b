"""The live autoscaler on a real broker: (1) the decide step gives the simulator's decisions
for one recorded sequence of windows; (2) a burst scales sim workers up and back down
through the local actuator, readable with kcat, without flapping."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import TypeAdapter

from agents.scaling import DemandWindow
from bench.scale_live import CONTROL, STABILISATION_S, flapped, render, run_scale_live
from bench.traces import azure_requests
from infra import procs
from infra.kafka.broker import KafkaBroker
from infra.stack import down
from infra.topics import provision
from schemas.config import Settings
from schemas.cost import CostModel
from schemas.events import HealthEvent, ScaleDecision
from sim.simulator import SimConfig, TokenweirScaler, Workload, simulate
from streams.sink import KafkaEventSink
from streams.topics import DEMAND, HEALTH, SCALE

PORT_BASE = int(os.environ.get("TOKENWEIR_TEST_PORT_BASE", "19000"))
DECISION: TypeAdapter[ScaleDecision] = TypeAdapter(ScaleDecision)
SIM = SimConfig()  # model "azure-fleet", C = 240 MU/min, start-up 60 s
REPLAY_CONTROL = f"""\
auth_required = false
[scaling.models.{SIM.model}]
capacity_mu_per_min = {SIM.capacity_mu_per_min}
startup_s = {SIM.startup_s}
min_replicas = {SIM.min_replicas}
max_replicas = {SIM.max_replicas}
"""


@asynccontextmanager
async def kafka_stack(name: str, control: str, port: int, **overrides: object
                      ) -> AsyncIterator[Settings]:
    """A broker of its own with the registry's topics (no ClickHouse: not needed here)."""
    with socket.socket() as probe:
        # A broker left over on this port would be used instead, with its old topics.
        assert probe.connect_ex(("127.0.0.1", port)) != 0, f"port {port} is already taken"
    state = Path(tempfile.mkdtemp(prefix=f"tw-{name}-"))
    (state / "control.toml").write_text(control)
    settings = Settings(state_dir=state, control_config=state / "control.toml",
                        kafka_port=port, kafka_controller_port=port + 1, tenant_partitions=4,
                        shard_partitions=4, **overrides)  # type: ignore[arg-type]
    try:
        await KafkaBroker(settings).start(progress=print)
        await provision(settings)
        yield settings
    finally:
        for log in sorted((state / "logs").glob("*.log")):
            print(f"--- {log.name}:\n" + "\n".join(log.read_text().splitlines()[-10:]))
        down(settings, print)
        shutil.rmtree(state, ignore_errors=True)


def recorded_windows() -> tuple[list[DemandWindow], list[ScaleDecision]]:
    """The first 20 minutes of azure2023 through the simulator: its windows and decisions."""
    trace = [r for r in azure_requests() if r.at < 1200.0]
    scaler = TokenweirScaler(SIM)
    simulate(Workload.build(trace, CostModel(), SIM), "tokenweir", SIM, scaler=scaler)
    return scaler.windows, scaler.decisions


async def read_scale(bootstrap: str, *, at_least: int, timeout_s: float) -> list[ScaleDecision]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    out: list[ScaleDecision] = []
    try:
        tp = TopicPartition(SCALE, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        deadline = asyncio.get_running_loop().time() + timeout_s
        quiet = 0
        while asyncio.get_running_loop().time() < deadline and (len(out) < at_least
                                                                 or quiet < 3):
            batches = await consumer.getmany(timeout_ms=1000)
            got = [DECISION.validate_json(r.value) for rs in batches.values() for r in rs]
            out += got
            quiet = 0 if got else quiet + 1
        return out
    finally:
        await consumer.stop()


async def produce(settings: Settings, windows: list[DemandWindow]) -> None:
    sink = KafkaEventSink(settings.bootstrap)
    await sink.start()
    try:
        for window in windows:
            await sink.send(DEMAND, window, key=window.model)
        await sink.flush()
    finally:
        await sink.stop()


def start_decide(settings: Settings) -> None:
    env = {**os.environ, **settings.to_env()}
    procs.spawn(settings.run_dir(), "autoscaler",
                [sys.executable, "-m", "infra.cli", "autoscaler", "--no-demand"],
                log_path=settings.state_dir / "logs" / "autoscaler.log", env=env)


async def test_decide_step_recorded_windows_same_decisions_as_simulator() -> None:
    windows, simulated = recorded_windows()
    by_at = {d.decided_at: d for d in simulated}
    must = [d for d in simulated if d.desired != d.current]
    assert len(windows) > 500 and len({d.desired for d in simulated}) > 2  # it does scale
    async with kafka_stack("autoscaler-replay", REPLAY_CONTROL, PORT_BASE + 396,
                           models=[SIM.model]) as settings:
        # Half the windows, the decide step, a restart (SIGTERM) mid-sequence, the rest:
        # the restarted step rebuilds its state from tw.demand and decides on.
        half = len(windows) // 2
        await produce(settings, windows[:half])
        start_decide(settings)
        first = await read_scale(settings.bootstrap, at_least=sum(
            1 for d in must if d.decided_at <= windows[half - 1].at), timeout_s=60)
        assert procs.stop(settings.run_dir(), "autoscaler") is not None
        await produce(settings, windows[half:])
        start_decide(settings)
        live = await read_scale(settings.bootstrap, at_least=len(must), timeout_s=90)
    assert first and live[:len(first)] == first
    assert live, "the decide step published nothing"
    # Every published decision is the simulator's for the same window, id included...
    assert [d for d in live if by_at.get(d.decided_at) != d] == []
    # ...and every window where the simulator asked for a change was published, once.
    assert len({d.decision_id for d in live}) == len(live)
    published = {d.decided_at for d in live}
    assert [d.decided_at for d in must if d.decided_at not in published] == []


async def kill_unhealthy(settings: Settings, name: str) -> bool:
    """Publish an unhealthy HealthEvent for ``name``: the actuator respawns it (new pid)."""
    before = procs.running(settings.run_dir(), name)
    assert before is not None, f"{name} is not running"
    sink = KafkaEventSink(settings.bootstrap)
    await sink.start()
    try:
        await sink.send(HEALTH, HealthEvent(worker=name, model="tiny-llama", previous="suspect",
                                            state="unhealthy", reason="test: hung"), key=name)
        await sink.flush()
    finally:
        await sink.stop()
    for _ in range(60):
        now = procs.running(settings.run_dir(), name)
        if now is not None and now != before:
            return True
        await asyncio.sleep(0.5)
    return False


async def test_live_burst_scales_workers_up_and_back_down_without_flapping(kcat: str) -> None:
    async with kafka_stack("autoscaler-live", CONTROL, PORT_BASE + 392) as settings:
        report = await run_scale_live(settings, print, rate=10.0, burst_s=25.0)
        print(render(report))
        restarted = await kill_unhealthy(settings, "worker-tiny-llama-0")
        out = await asyncio.to_thread(
            subprocess.run, [kcat, "-C", "-b", settings.bootstrap, "-t", SCALE, "-e", "-q"],
            capture_output=True, text=True, timeout=60, check=True)
    print(f"kcat -C -b {settings.bootstrap} -t {SCALE} -e -q\n{out.stdout}")
    from_kcat = [DECISION.validate_json(line) for line in out.stdout.splitlines() if line]
    assert len(from_kcat) == len(report.decisions) > 0
    assert report.answered == report.requests
    assert report.peak_workers >= 2, render(report)
    assert report.final_workers == 1 and from_kcat[-1].desired == 1, render(report)
    assert max(d.desired for d in from_kcat) >= 2
    assert not flapped(from_kcat, STABILISATION_S)
    assert restarted, "the unhealthy worker was not killed and respawned"
