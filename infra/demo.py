"""The main job: the whole control plane on the embedded defaults, driven by a real trace.

``tokenweir demo`` brings the stack up (Kafka, chDB or the ClickHouse
server), starts the agents (admission, autoscaler, health, alerts), the
local actuator (which starts and drains sim workers as the autoscaler
decides) and the ClickHouse sink, replays a slice of a real trace with
several tenants at a speed-up behind a progress bar, checks that the
per-tenant totals in ClickHouse equal those of the replies it received,
prints the report and writes it as HTML. Everything it started is stopped
at the end unless ``--keep-running``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer
from pydantic import BaseModel, TypeAdapter
from tqdm import tqdm

from infra import InfraError, procs
from infra.clickhouse.store import ClickHouseStore
from infra.demo_trace import DemoPlan, DemoTrace, control_toml, plan
from infra.stack import clickhouse_store, down, up
from schemas.config import Settings
from schemas.cost import CostModel
from schemas.events import Rejection, Reply, WorkerHeartbeat
from streams import StreamsError
from streams.client import follow_replies
from streams.codec import decode
from streams.sink import KafkaEventSink
from streams.topics import HEARTBEATS, REQUESTS

Say = Callable[[str], None]
_BEAT: TypeAdapter[WorkerHeartbeat] = TypeAdapter(WorkerHeartbeat)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "infra.cli", *args]


def start_pipeline(settings: Settings, agent: str = "admission") -> list[str]:
    """Start the agent and one echo worker per model; their process names."""
    run_dir, logs = settings.run_dir(), settings.state_dir / "logs"
    env = {**os.environ, **settings.to_env()}
    names = [f"agent-{agent}"]
    procs.spawn(run_dir, f"agent-{agent}", _cli("agent", agent),
                log_path=logs / f"agent-{agent}.log", env=env)
    for model in settings.models:
        name = f"worker-{model}-0"
        procs.spawn(run_dir, name, _cli("worker", "--model", model, "--engine", "echo"),
                    log_path=logs / f"{name}.log", env=env)
        names.append(name)
    return names


class DemoOptions(BaseModel):
    trace: DemoTrace = DemoTrace()
    engine: Literal["sim", "transformers"] = "sim"
    html: Path = Path("tokenweir-report.html")
    keep_running: bool = False


class TenantTotals(BaseModel):
    requests: int = 0  # replies: ok + error + rejected
    ok: int = 0
    rejected: int = 0
    served: int = 0  # replies from a worker (ok + error): one UsageEvent each
    input_tokens: int = 0
    output_tokens: int = 0
    model_units: float = 0.0  # MU, rounded to µMU


def totals_from_replies(replies: dict[str, Reply], cost: CostModel) -> dict[str, TenantTotals]:
    """Per-tenant totals of what the clients were told, priced as the workers price."""
    totals: dict[str, TenantTotals] = defaultdict(TenantTotals)
    for reply in replies.values():
        t = totals[reply.tenant]
        t.requests += 1
        if isinstance(reply, Rejection):
            t.rejected += 1
            continue
        t.served += 1
        if reply.status == "ok":
            t.ok += 1
        u = reply.usage
        t.input_tokens += u.input_tokens
        t.output_tokens += u.output_tokens
        t.model_units += cost.model_units(u.input_tokens, u.output_tokens, u.images,
                                          u.cached_tokens)
    for t in totals.values():
        t.model_units = round(t.model_units, 6)
    return dict(totals)


async def totals_from_clickhouse(store: ClickHouseStore, database: str, run_id: str
                                 ) -> dict[str, TenantTotals]:
    """The same totals, read back from the sink's tables (exact: FINAL, one row per id)."""
    prefix = f"demo-{run_id}-%"
    usage = await store.query(
        f"SELECT tenant, count(), sum(input_tokens), sum(output_tokens), sum(model_units) "
        f"FROM {database}.usage_events FINAL WHERE request_id LIKE '{prefix}' GROUP BY tenant")
    results = await store.query(
        f"SELECT tenant, count(), countIf(status = 'ok'), countIf(status = 'rejected') "
        f"FROM {database}.request_results FINAL WHERE request_id LIKE '{prefix}' "
        f"GROUP BY tenant")
    totals: dict[str, TenantTotals] = defaultdict(TenantTotals)
    for tenant, served, inp, out, mu in usage:
        t = totals[tenant]
        t.served, t.input_tokens, t.output_tokens = int(served), int(inp), int(out)
        t.model_units = round(float(mu), 6)
    for tenant, n, ok, rejected in results:
        t = totals[tenant]
        t.requests, t.ok, t.rejected = int(n), int(ok), int(rejected)
    return dict(totals)


def totals_table(replayed: dict[str, TenantTotals], stored: dict[str, TenantTotals]) -> str:
    head = (f"{'tenant':<12} {'source':<10} {'requests':>8} {'ok':>6} {'rejected':>8} "
            f"{'usage':>6} {'in tokens':>10} {'out tokens':>10} {'MU':>14}  match")
    lines = [head, "-" * len(head)]
    for tenant in sorted(set(replayed) | set(stored)):
        a, b = replayed.get(tenant, TenantTotals()), stored.get(tenant, TenantTotals())
        same = "yes" if a == b else "NO"
        for source, t in (("replayed", a), ("clickhouse", b)):
            lines.append(f"{tenant:<12} {source:<10} {t.requests:>8} {t.ok:>6} {t.rejected:>8} "
                         f"{t.served:>6} {t.input_tokens:>10} {t.output_tokens:>10} "
                         f"{t.model_units:>14.6f}  "
                         + (same if source == "clickhouse" else ""))
    return "\n".join(lines)


class Demo:
    def __init__(self, settings: Settings, say: Say, options: DemoOptions) -> None:
        self.options = options
        self.say = say
        self.run_id = uuid.uuid4().hex[:8]
        self.model = settings.models[0]
        self.plan: DemoPlan = plan(options.trace, model=self.model, run_id=self.run_id)
        config = settings.state_dir / "demo-control.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(control_toml(self.plan, self.model, options.trace))
        self.settings = settings.model_copy(update={"control_config": config.resolve()})
        self.replies: dict[str, Reply] = {}

    async def run(self) -> bool:
        """True when ClickHouse's per-tenant totals equal the replayed ones."""
        settings = self.settings
        await up(settings, self.say)
        store = clickhouse_store(settings)
        stop = asyncio.Event()
        try:
            names = start_services(settings, self.options, await self._model_dir())
            self.say(f"started {', '.join(names)}; logs in {settings.state_dir / 'logs'}")
            background = [asyncio.create_task(self._collect(stop), name="reply collector"),
                          *start_in_process(settings, store, stop)]
            started = time.time()
            await self._await_fleet(since=started)
            await self._drive()
            await self._await_replies(timeout_s=120)
            replayed = totals_from_replies(self.replies, self.plan.cost)
            stored = await self._await_sink(store, replayed)
            stop.set()
            for task, outcome in zip(background, await asyncio.gather(
                    *background, return_exceptions=True), strict=True):
                if isinstance(outcome, BaseException):
                    self.say(f"WARNING: {task.get_name()} failed: {outcome!r}")
            self.say("\nper-tenant totals, replayed vs ClickHouse "
                     f"({store.backend}, run {self.run_id}):")
            self.say(totals_table(replayed, stored))
            await write_report(settings, store, self.say, since=started - 60,
                               html=self.options.html)
            return replayed == stored
        finally:
            stop.set()
            await store.close()
            if self.options.keep_running:
                self.say("stack left running; `tokenweir down` stops it")
            else:
                down(settings, self.say)

    async def _model_dir(self) -> Path | None:
        """transformers: the tiny local model (built once per state directory)."""
        if self.options.engine != "transformers":
            return None
        from workers.tinymodel import make_tiny_model

        directory = (self.settings.state_dir / "tiny-model").resolve()
        if not (directory / "config.json").exists():
            self.say(f"building the tiny model in {directory}")
            await asyncio.to_thread(make_tiny_model, directory)
        return directory

    async def _await_fleet(self, since: float, timeout_s: float = 90.0) -> None:
        """Until a worker beats ready: requests before that would find no capacity."""
        consumer = AIOKafkaConsumer(HEARTBEATS, bootstrap_servers=self.settings.bootstrap,
                                    auto_offset_reset="earliest", enable_auto_commit=False)
        await consumer.start()
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        with contextlib.suppress(StreamsError):
                            beat = decode(record.value, _BEAT)
                            if beat.engine_state == "ready" and beat.sent_at >= since:
                                self.say(f"fleet ready: {beat.worker} ({beat.engine})")
                                # The admission agent follows the same beats.
                                await asyncio.sleep(2.0)
                                return
        finally:
            await consumer.stop()
        raise InfraError(f"no worker became ready within {timeout_s:.0f}s; see "
                         f"{self.settings.state_dir / 'logs'}")

    async def _drive(self) -> None:
        sink = KafkaEventSink(self.settings.bootstrap, linger_ms=5, client_id="demo")
        await sink.start()
        planned = self.plan.requests
        bar = tqdm(total=len(planned), unit="req", desc="replay", file=sys.stderr,
                   dynamic_ncols=True, mininterval=0.5)
        started = time.monotonic()
        try:
            for p in planned:
                delay = p.wall_s - (time.monotonic() - started)
                if delay > 0.005:
                    await sink.flush()
                    await asyncio.sleep(delay)
                request = p.request.model_copy(update={"submitted_at": time.time()})
                await sink.send(REQUESTS, request, key=request.tenant)
                bar.update(1)
                bar.set_postfix(answered=len(self.replies), refresh=False)
            await sink.flush()
        finally:
            bar.close()
            await sink.stop()

    async def _collect(self, stop: asyncio.Event) -> None:
        prefix = f"demo-{self.run_id}-"

        def take(reply: Reply) -> None:
            if reply.request_id.startswith(prefix):
                self.replies.setdefault(reply.request_id, reply)

        await follow_replies(self.settings.bootstrap, stop, take)

    async def _await_replies(self, timeout_s: float) -> None:
        want = len(self.plan.requests)
        deadline = time.monotonic() + timeout_s
        while len(self.replies) < want and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        if len(self.replies) < want:
            self.say(f"WARNING: {want - len(self.replies)} of {want} requests unanswered "
                     f"after {timeout_s:.0f}s")

    async def _await_sink(self, store: ClickHouseStore, replayed: dict[str, TenantTotals],
                          timeout_s: float = 60.0) -> dict[str, TenantTotals]:
        """ClickHouse's totals once the sink has written every reply and every usage event
        (or the timeout). Both counts: the two topics reach the sink independently."""
        db = self.settings.clickhouse_database
        requests = sum(t.requests for t in replayed.values())
        served = sum(t.served for t in replayed.values())
        deadline = time.monotonic() + timeout_s
        while True:
            stored = await totals_from_clickhouse(store, db, self.run_id)
            done = (sum(t.requests for t in stored.values()) >= requests
                    and sum(t.served for t in stored.values()) >= served)
            if done or time.monotonic() > deadline:
                return stored
            await asyncio.sleep(1.0)


async def run_demo(settings: Settings, say: Say, options: DemoOptions) -> bool:
    # aiokafka warns while the fresh broker elects group coordinators; the sink
    # retries on its own and the demo's output is the report, not client chatter.
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    if not options.trace.sample or not settings.models:
        raise InfraError("the demo needs a model and a non-empty sample")
    try:
        demo = Demo(settings, say, options)
    except OSError as exc:  # the trace files: missing or unreadable
        raise InfraError(f"demo trace: {exc}") from exc
    if not demo.plan.requests:
        raise InfraError(f"the {options.trace.trace} trace slice holds no requests "
                         f"(start {options.trace.start_s:g}s, duration "
                         f"{options.trace.duration_s:g}s, sample {options.trace.sample:g})")
    say(f"demo run {demo.run_id}: {len(demo.plan.requests)} requests from "
        f"{len(demo.plan.tenants)} tenants of the {options.trace.trace} trace over "
        f"{demo.plan.wall_s:.0f}s (speed-up {options.trace.speedup:g}, "
        f"sample {options.trace.sample:g}); replica capacity "
        f"{demo.plan.cost.capacity_mu_per_min:.0f} MU/min")
    return await demo.run()


def start_services(settings: Settings, options: DemoOptions, model_dir: Path | None = None
                   ) -> list[str]:
    """Start the agents and the local actuator (which starts the workers); their names."""
    run_dir, logs = settings.run_dir(), settings.state_dir / "logs"
    env = {**os.environ, **settings.to_env()}
    engine = ["--engine", options.engine, *(["--model-dir", str(model_dir)] if model_dir else [])]
    services = {
        "agent-admission": _cli("agent", "admission"),
        "autoscaler": _cli("autoscaler"),
        "health-agent": _cli("health-agent"),
        "alerter": _cli("alerter"),
        # Drains are short: the demo scales down within a minute of a burst.
        "actuator": _cli("actuator", "--kind", "local", *engine, "--drain-timeout", "10"),
    }
    for name, argv in services.items():
        procs.spawn(run_dir, name, argv, log_path=logs / f"{name}.log", env=env)
    return list(services)


def start_in_process(settings: Settings, store: ClickHouseStore, stop: asyncio.Event
                     ) -> list[asyncio.Task[None]]:
    """The ClickHouse sink, as a task of this process.

    Embedded chDB admits one process per data directory, so the sink runs
    where the totals and the report are read (with the server it could run
    anywhere; one code path for both).
    """
    return [asyncio.create_task(_sink(settings, store, stop), name="sink")]


async def _sink(settings: Settings, store: ClickHouseStore, stop: asyncio.Event) -> None:
    from agents.sink import ClickHouseSink

    dlq = KafkaEventSink(settings.bootstrap, client_id="tokenweir-sink")
    await dlq.start()
    try:
        await ClickHouseSink(bootstrap=settings.bootstrap, store=store,
                             database=settings.clickhouse_database, dead_letters=dlq).run(stop)
    finally:
        await dlq.stop()


async def write_report(settings: Settings, store: ClickHouseStore, say: Say, *, since: float,
                       html: Path) -> None:
    """The report over this run's minutes, printed and written as HTML."""
    from infra.report import collect, render_html, render_text

    report = await collect(store, settings.clickhouse_database,
                           datetime.fromtimestamp(since, UTC))
    say("\n" + render_text(report))
    # Plotting and writing block; the stack's other tasks are already stopped.
    say(f"html report: {await asyncio.to_thread(_write_html, render_html, report, html)}")


def _write_html(render: Callable[[Any], str], report: Any, html: Path) -> Path:
    try:
        html.write_text(render(report))
    except OSError as exc:
        raise InfraError(f"--html {html}: {exc.strerror}") from exc
    return html.resolve()
