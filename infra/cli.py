"""The ``tokenweir`` command."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from pydantic import ValidationError

from infra import InfraError
from schemas.config import Settings
from schemas.errors import SchemaError
from sim import POLICIES
from workers.engines import ENGINE_NAMES

if TYPE_CHECKING:
    from workers.engines.sim import SimFaults
    from workers.health import WorkerHealthConfig

T = TypeVar("T")


def _say(msg: str) -> None:
    click.echo(msg, err=False)


def _settings() -> Settings:
    try:
        return Settings()
    except (ValidationError, SchemaError) as exc:
        raise click.ClickException(f"configuration: {exc}") from exc


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except InfraError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="Where the local stack keeps data, logs and pid files "
                   "(env TOKENWEIR_STATE_DIR, default .tokenweir).")
def main(state_dir: Path | None) -> None:
    """tokenweir: a Kafka-native control plane for multi-tenant LLM inference."""
    if state_dir is not None:
        # Environment, so that processes we spawn see the same stack.
        os.environ["TOKENWEIR_STATE_DIR"] = str(state_dir)


@main.command()
def up() -> None:
    """Start Kafka (and the ClickHouse server when configured); provision topics and tables."""
    from infra.stack import up as stack_up

    _run(stack_up(_settings(), _say))


@main.command()
def down() -> None:
    """Stop everything this state directory started."""
    from infra.stack import down as stack_down

    try:
        stack_down(_settings(), _say)
    except InfraError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(as_json: bool) -> None:
    """What runs where, broker reachability, topics and consumer lag."""
    from infra.stack import status as stack_status

    report = _run(stack_status(_settings()))
    if as_json:
        click.echo(report.model_dump_json(indent=2))
        return
    for name, pid in report.processes.items():
        click.echo(f"process   {name:<24} pid {pid}")
    if not report.processes:
        click.echo("process   (none started from this state dir)")
    state = "reachable" if report.broker_reachable else f"UNREACHABLE ({report.broker_error})"
    click.echo(f"broker    {report.broker:<24} {state}")
    for t in report.topics:
        have = "missing" if t.partitions is None else f"{t.partitions} partitions"
        flag = "" if t.partitions == t.expected else f"  (expected {t.expected})"
        click.echo(f"topic     {t.name:<24} {have}{flag}")
    for g in report.consumer_lag:
        click.echo(f"group     {g.group:<24} lag {g.lag}")
    if not report.broker_reachable:
        sys.exit(1)


@main.command()
@click.option("--tenant", required=True)
@click.option("--model", default=None, help="Default: the first configured model.")
@click.option("--prompt", required=True)
@click.option("--max-tokens", type=int, default=64)
@click.option("--session-key", default=None)
@click.option("--timeout", "timeout_s", type=float, default=60.0)
def submit(tenant: str, model: str | None, prompt: str, max_tokens: int,
           session_key: str | None, timeout_s: float) -> None:
    """Send one request and print its result (or rejection) as JSON."""
    from schemas.events import InferenceRequest
    from streams import StreamsError
    from streams.client import TokenweirClient

    settings = _settings()
    try:
        request = InferenceRequest(tenant=tenant, model=model or settings.models[0],
                                   prompt=prompt, max_tokens=max_tokens,
                                   session_key=session_key)
    except ValidationError as exc:
        raise click.ClickException(f"invalid request: {exc}") from exc

    async def go() -> str:
        async with TokenweirClient(settings.bootstrap) as client:
            reply = await client.submit(request, timeout_s=timeout_s)
        return reply.model_dump_json(indent=2)

    try:
        click.echo(_run(go()))
    except StreamsError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per tenant.")
@click.option("--watch", "watch_s", type=float, default=None,
              help="Refresh every this many seconds until interrupted.")
def tenants(as_json: bool, watch_s: float | None) -> None:
    """Live usage per tenant against its limit, burst and reservation."""
    import time

    from infra.tenants import latest_usage, table

    settings = _settings()
    while True:
        snapshots = _run(latest_usage(settings.bootstrap))
        if as_json:
            for snap in sorted(snapshots.values(), key=lambda s: s.tenant):
                click.echo(snap.model_dump_json())
        elif snapshots:
            click.echo("\n".join(table(snapshots)))
        else:
            click.echo("no tenant usage yet (the admission agent publishes it every 2 s)")
        if watch_s is None:
            return
        time.sleep(watch_s)
        click.echo()


@main.group()
def schemas() -> None:
    """Event contracts."""


@schemas.command("export")
@click.argument("directory", type=click.Path(path_type=Path))
def schemas_export(directory: Path) -> None:
    """Write one JSON Schema file per event type into DIRECTORY."""
    from schemas.export import export

    for path in export(directory):
        click.echo(str(path))


@main.command()
@click.argument("names", nargs=-1, required=True)
@click.option("--loglevel", default="WARNING")
def agent(names: tuple[str, ...], loglevel: str) -> None:
    """Run an agent (NAME: admission or passthrough) in this process."""
    from agents import AgentsError
    from agents.runner import run

    try:
        run(_settings(), list(names), loglevel=loglevel)
    except AgentsError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option("--model", required=True)
@click.option("--engine", type=click.Choice(ENGINE_NAMES), default="echo")
@click.option("--worker-id", default=None)
@click.option("--model-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="transformers: the Hugging Face model directory to serve.")
@click.option("--max-batch", type=click.IntRange(min=1), default=64, show_default=True,
              help="The engine's batch size.")
@click.option("--max-in-flight", type=click.IntRange(min=1), default=None,
              help="Requests held at once, running or queued in the engine "
                   "[default: twice --max-batch].")
@click.option("--time-scale", type=float, default=1.0, show_default=True,
              help="sim: wall seconds per simulated second.")
@click.option("--drain-timeout", "drain_timeout_s", type=click.FloatRange(min=0), default=30.0,
              show_default=True,
              help="On SIGTERM, seconds in-flight requests get to finish; the rest are "
                   "left uncommitted for another worker.")
@click.option("--health-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Serve /livez and /readyz on this port (0: off).")
@click.option("--probe-interval", "probe_interval_s", type=click.FloatRange(min=0), default=2.0,
              show_default=True,
              help="Probe the engine after this many seconds without a finished request "
                   "(0: never).")
@click.option("--probe-timeout", "probe_timeout_s", type=click.FloatRange(min=0.01),
              default=3.0, show_default=True, help="Seconds before a probe counts as failed.")
@click.option("--probe-priority", type=click.Choice(["high", "normal"]), default="high",
              show_default=True,
              help="high: ahead of every request; normal: queued like a normal request "
                   "(to show what priority prevents).")
@click.option("--session-timeout", "session_timeout_s", type=click.FloatRange(6, 300),
              default=10.0, show_default=True,
              help="Seconds before the group moves a dead worker's shards.")
@click.option("--preprocess-pool", type=click.IntRange(0, 64), default=0, show_default=True,
              help="Processes preprocessing request images before the engine (0: none).")
@click.option("--fault", "fault_spec", default=None,
              help="sim: faults to inject, e.g. hang-after:30 (seconds after the engine "
                   "starts); SIGUSR1 also hangs a sim worker at once.")
def worker(model: str, engine: str, worker_id: str | None, model_dir: Path | None,
           max_batch: int, max_in_flight: int | None, time_scale: float,
           drain_timeout_s: float, health_port: int, probe_interval_s: float,
           probe_timeout_s: float, probe_priority: str, session_timeout_s: float,
           preprocess_pool: int, fault_spec: str | None) -> None:
    """Serve one model's shards with an engine until SIGTERM (then drain)."""
    from workers import WorkersError
    from workers.engines.base import PROBE_PRIORITY, REQUEST_PRIORITY
    from workers.engines.sim import parse_faults
    from workers.health import WorkerHealthConfig

    settings = _settings()
    if model not in settings.models:
        raise click.ClickException(f"model {model!r} is not configured: {settings.models}")
    try:
        faults = parse_faults(fault_spec) if fault_spec else None
        health = WorkerHealthConfig(
            port=health_port, probe_interval_s=probe_interval_s or None,
            probe_timeout_s=probe_timeout_s,
            probe_priority=PROBE_PRIORITY if probe_priority == "high"
            else REQUEST_PRIORITY["normal"])
    except (WorkersError, ValidationError) as exc:
        raise click.ClickException(str(exc)) from exc
    _run(_serve(settings, model, engine, worker_id, model_dir, max_batch=max_batch,
                max_in_flight=max_in_flight, time_scale=time_scale,
                drain_timeout_s=drain_timeout_s, health=health, faults=faults,
                session_timeout_s=session_timeout_s, preprocess_pool=preprocess_pool))


async def _serve(settings: Settings, model: str, engine_name: str, worker_id: str | None,
                 model_dir: Path | None = None, *, max_batch: int = 64,
                 max_in_flight: int | None = None, time_scale: float = 1.0,
                 drain_timeout_s: float = 30.0, health: WorkerHealthConfig | None = None,
                 faults: SimFaults | None = None,
                 session_timeout_s: float = 10.0, preprocess_pool: int = 0) -> None:
    from schemas.cost import CostModel
    from schemas.tenancy import load_config
    from streams.sink import KafkaEventSink
    from workers import WorkersError
    from workers.engines import make_engine
    from workers.worker import ShardWorker

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    config = load_config(settings.control_config) if settings.control_config else None
    cost = config.cost(model) if config else CostModel()
    try:
        engine = make_engine(engine_name, model=model, cost=cost, model_dir=model_dir,
                             max_batch=max_batch, time_scale=time_scale, faults=faults)
        # Load weights before joining the group: a bad model fails here, not on traffic.
        if not await engine.health():
            await engine.close()
            raise InfraError(f"engine {engine_name} for {model} is not healthy after start")
    except WorkersError as exc:
        raise InfraError(str(exc)) from exc
    hang_now = getattr(engine, "hang_now", None)
    if hang_now is not None:  # the sim engine's fault trigger, for tests and benchmarks
        loop.add_signal_handler(signal.SIGUSR1, hang_now)
    sink = KafkaEventSink(settings.bootstrap, client_id=f"worker-{model}")
    await sink.start()
    preprocessor = None
    if preprocess_pool:
        from workers.preprocess import ImagePreprocessor, PreprocessConfig

        preprocessor = ImagePreprocessor(PreprocessConfig(pool_size=preprocess_pool))
        await preprocessor.start()
    try:
        await ShardWorker(bootstrap=settings.bootstrap, model=model, engine=engine,
                          sink=sink, worker_id=worker_id, cost=cost, max_batch=max_batch,
                          max_in_flight=max_in_flight, drain_timeout_s=drain_timeout_s,
                          health=health, session_timeout_s=session_timeout_s,
                          preprocessor=preprocessor).run(stop)
    except WorkersError as exc:
        raise InfraError(str(exc)) from exc
    finally:
        await engine.close()
        await sink.stop()
        if preprocessor is not None:
            await preprocessor.close()


@main.command()
@click.option("--engine", "engine_name", type=click.Choice(ENGINE_NAMES), default="sim",
              show_default=True)
@click.option("--model", required=True)
@click.option("--write", "write_path", type=click.Path(path_type=Path), default=None,
              help="Update the [models.MODEL] entry of this TOML file (default: print it).")
@click.option("--inputs", default="128,512,2048", show_default=True, help="Prompt lengths.")
@click.option("--outputs", default="16,64,256", show_default=True, help="Output lengths.")
@click.option("--images", default="", help="Image counts to time too (fits γ).")
@click.option("--requests", "n_requests", type=int, default=256, show_default=True,
              help="Completions timed per grid point.")
@click.option("--max-batch", type=int, default=64, show_default=True,
              help="Engine batch size; twice this many requests are kept in flight.")
@click.option("--time-scale", type=float, default=0.1, show_default=True,
              help="sim: wall seconds per simulated second.")
@click.option("--seed", type=int, default=0)
@click.option("--model-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="transformers: the Hugging Face model directory to time.")
def calibrate(engine_name: str, model: str, write_path: Path | None, inputs: str, outputs: str,
              images: str, n_requests: int, max_batch: int, time_scale: float, seed: int,
              model_dir: Path | None) -> None:
    """Fit a model's α, β (γ with --images) and capacity C by driving an engine at saturation."""
    from schemas.cost import CostModel
    from workers import WorkersError
    from workers.calibrate import (
        CalibrationGrid,
        existing_cost,
        format_point,
        format_report,
        parse_counts,
        run_calibration,
        toml_entry,
        write_model_entry,
    )

    settings = _settings()
    try:
        # β anchors the MU scale: take it from the entry being replaced, else
        # from the control-plane configuration, else the defaults.
        sources = [p for p in (write_path, settings.control_config) if p is not None]
        anchor = next((c for c in (existing_cost(p, model) for p in sources) if c), CostModel())
        grid = CalibrationGrid(input_tokens=parse_counts(inputs, what="--inputs"),
                               output_tokens=parse_counts(outputs, what="--outputs"),
                               images=parse_counts(images, what="--images"),
                               requests_per_point=n_requests, concurrency=2 * max_batch)
        _say(f"calibrating {engine_name} for {model}: {len(grid.shapes())} grid points, "
             f"{n_requests} timed requests each, {grid.concurrency} in flight")
        result = asyncio.run(run_calibration(
            engine_name, model=model, grid=grid, anchor=anchor, seed=seed, max_batch=max_batch,
            time_scale=time_scale, model_dir=model_dir,
            on_point=lambda m: _say(format_point(m))))
        _say(format_report(result))
        if write_path is None:
            _say("\n" + toml_entry(model, result.cost_model()).rstrip())
        else:
            write_model_entry(write_path, model, result.cost_model())
            _say(f"wrote [models.{model}] to {write_path}")
    except (WorkersError, ValidationError) as exc:
        raise click.ClickException(str(exc)) from exc


@main.group()
def model() -> None:
    """Local model directories for the transformers engine."""


@model.command("make-tiny")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the random weights.")
@click.option("--vocab-size", type=int, default=1024, show_default=True)
@click.option("--hidden-size", type=int, default=64, show_default=True)
@click.option("--layers", type=int, default=2, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace what DIRECTORY holds.")
def model_make_tiny(directory: Path, seed: int, vocab_size: int, hidden_size: int, layers: int,
                    overwrite: bool) -> None:
    """Build a tiny Llama-style model (random weights, locally trained tokenizer) in DIRECTORY."""
    from workers import WorkersError
    from workers.tinymodel import TinyModelSpec, make_tiny_model

    try:
        spec = TinyModelSpec(seed=seed, vocab_size=vocab_size, hidden_size=hidden_size,
                             num_layers=layers)
        built = make_tiny_model(directory, spec, overwrite=overwrite)
    except (WorkersError, ValidationError) as exc:
        raise click.ClickException(str(exc)) from exc
    _say(f"wrote {built.directory}: {built.parameters} parameters, vocabulary of "
         f"{built.vocab_size} tokens ({', '.join(built.files)})")


@main.command()
@click.option("--start", "start_s", type=float, default=78000.0, show_default=True,
              help="Trace second the slice starts at (78000 s holds the day's peak).")
@click.option("--duration", "duration_s", type=float, default=1200.0, show_default=True)
@click.option("--speedup", type=float, default=4.0, show_default=True)
@click.option("--kill-agent-at", "kill_at_s", type=float, default=None,
              help="kill -9 the admission agent this many wall seconds in, then restart it.")
def replay(start_s: float, duration_s: float, speedup: float, kill_at_s: float | None) -> None:
    """Replay the ServeGen trace (one tenant per client) through the real admission agent."""
    from infra.replay import Replay, replay_settings
    from infra.stack import down as stack_down
    from infra.stack import up as stack_up

    base = _settings()
    settings = replay_settings(base.state_dir / "replay", base)
    # A replay starts from nothing: request ids repeat between runs, and old
    # tables or committed offsets would be read back as this run's state.
    stack_down(settings, _say)
    shutil.rmtree(settings.state_dir, ignore_errors=True)

    async def go() -> str:
        await stack_up(settings, _say)
        try:
            job = Replay(settings, _say, start_s=start_s, duration_s=duration_s,
                         speedup=speedup, kill_at_s=kill_at_s)
            _say(f"replaying {len(job.planned)} requests from {len(job.tenants)} tenants "
                 f"over {job.planned[-1].wall_s:.0f}s")
            report = await job.run()
        finally:
            stack_down(settings, _say)
        return report.model_dump_json()

    result = _run(go())
    click.echo(result)


@main.command()
@click.option("--trace", "trace_name", type=click.Choice(["servegen", "azure"]),
              default="servegen", show_default=True, help="Which trace under ../shared/traces.")
@click.option("--start", "start_s", type=float, default=0.0, show_default=True,
              help="Trace second the slice starts at.")
@click.option("--duration", "duration_s", type=float, default=86400.0, show_default=True,
              help="Trace seconds replayed.")
@click.option("--speedup", type=float, default=720.0, show_default=True,
              help="Trace seconds per wall second.")
@click.option("--sample", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.002,
              show_default=True, help="Share of the trace's requests replayed.")
@click.option("--tenants", "n_tenants", type=click.IntRange(1, 64), default=6, show_default=True,
              help="Replay the busiest N tenants of the slice.")
@click.option("--engine", type=click.Choice(["sim", "transformers"]), default="sim",
              show_default=True, help="Workers' engine (transformers: a tiny local model).")
@click.option("--html", "html_path", type=click.Path(path_type=Path, dir_okay=False),
              default=Path("tokenweir-report.html"), show_default=True)
@click.option("--keep-running", is_flag=True, help="Leave the stack up afterwards.")
def demo(trace_name: str, start_s: float, duration_s: float, speedup: float, sample: float,
         n_tenants: int, engine: str, html_path: Path, keep_running: bool) -> None:
    """The main job: the whole stack on a replayed trace, then the report."""
    from infra.demo import DemoOptions, run_demo
    from infra.demo_trace import DemoTrace

    try:
        options = DemoOptions(
            trace=DemoTrace(trace=trace_name, start_s=start_s, duration_s=duration_s,  # type: ignore[arg-type]
                            speedup=speedup, sample=sample, tenants=n_tenants),
            engine=engine, html=html_path, keep_running=keep_running)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise click.ClickException(f"demo options: {exc}") from exc
    if not _run(run_demo(_settings(), _say, options)):
        raise click.ClickException("ClickHouse totals differ from the replayed ones")


@main.command()
@click.option("--trace", "trace_path", type=click.Path(path_type=Path, exists=True),
              required=True, help="azure2023 directory (code + conversation merged).")
@click.option("--policy", type=click.Choice(["all", *POLICIES]),
              default="all", show_default=True)
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=Path("simulate.png"),
              show_default=True, help="PNG of demand and replicas over time.")
@click.option("--target-utilisation", type=click.FloatRange(0.05, 1.0), default=None,
              help="Override tokenweir's target utilisation (trade GPU-hours for SLO).")
def simulate(trace_path: Path, policy: str, plot_path: Path,
             target_utilisation: float | None) -> None:
    """Replay a trace through a scaling policy; print GPU-hours and SLO attainment."""
    from agents.scaling import ScalingConfig
    from bench.traces import azure_requests
    from schemas.cost import CostModel
    from sim.simulator import SimConfig, TokenweirScaler, Workload, plot, table
    from sim.simulator import simulate as run_policy

    cfg = SimConfig()
    work = Workload.build(azure_requests(directory=trace_path), CostModel(), cfg)
    # The oracle and static-peak rows give the table its ratios, so they always run.
    names = POLICIES if policy == "all" else tuple(dict.fromkeys(
        (policy, "oracle", "static-peak")))
    scaling = ScalingConfig(capacity_mu_per_min=cfg.capacity_mu_per_min,
                            startup_s=cfg.startup_s, min_replicas=cfg.min_replicas,
                            max_replicas=cfg.max_replicas)
    if target_utilisation is not None:
        scaling = scaling.model_copy(update={"target_utilisation": target_utilisation})
    results = [run_policy(work, name, cfg, scaler=TokenweirScaler(cfg, scaling)
                          if name == "tokenweir" else None) for name in names]
    _say(table(results, cfg))
    plot(work, results, cfg, str(plot_path))
    _say(f"plot: {plot_path}")


@main.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing new alerts until interrupted.")
@click.option("--json", "as_json", is_flag=True, help="One Alert JSON object per line.")
def alerts(follow: bool, as_json: bool) -> None:
    """Print the alerts on tw.alerts (oldest first)."""
    from infra.alerts import format_alert, tail_alerts
    from schemas.events import Alert

    def show(alert: Alert) -> None:
        click.echo(alert.model_dump_json() if as_json else format_alert(alert))

    settings = _settings()
    try:
        skipped = _run(tail_alerts(settings.bootstrap, show, follow=follow))
    except KeyboardInterrupt:
        return
    if skipped:
        click.echo(f"({skipped} records on tw.alerts were not alerts)", err=True)


@main.command()
@click.option("--rules", "rules_path", type=click.Path(path_type=Path, dir_okay=False),
              default=None, help="Alert rules (TOML). Default: agents/default_alerts.toml.")
@click.option("--lag-interval", "lag_interval_s", type=click.FloatRange(min=0.1), default=10.0,
              show_default=True, help="Seconds between consumer lag polls.")
def alerter(rules_path: Path | None, lag_interval_s: float) -> None:
    """Evaluate alert rules over the streams and publish Alerts to tw.alerts until SIGTERM."""
    from agents import AgentsError
    from agents.alerts_agent import serve

    settings = _settings()
    try:
        _run(serve(settings, rules_path, lag_interval_s=lag_interval_s, say=_say))
    except AgentsError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command("report")
@click.option("--since", default=None,
              help="A duration back from now (90s, 15m, 2h, 7d) or an ISO timestamp (UTC unless "
                   "it names a zone) [default: every stored row].")
@click.option("--html", "html_path", type=click.Path(path_type=Path, dir_okay=False),
              default=None, help="Also write a self-contained HTML page with plots here.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def report_command(since: str | None, html_path: Path | None, as_json: bool) -> None:
    """Usage, rejections, latency, replicas against demand, and alerts, from ClickHouse."""
    from datetime import UTC, datetime

    from infra.report import collect, parse_since, render_html, render_text
    from infra.stack import clickhouse_store

    settings = _settings()
    try:
        start = parse_since(since, datetime.now(UTC))
    except InfraError as exc:
        raise click.ClickException(str(exc)) from exc

    async def go() -> Any:
        store = clickhouse_store(settings)
        try:
            return await collect(store, settings.clickhouse_database, start)
        finally:
            await store.close()

    figures = _run(go())
    click.echo(figures.model_dump_json(indent=2) if as_json else render_text(figures), nl=False)
    if html_path is not None:
        try:
            html_path.write_text(render_html(figures))
        except OSError as exc:
            raise click.ClickException(f"--html {html_path}: {exc.strerror}") from exc
        if not as_json:
            _say(f"html: {html_path}")


@main.command("sink")
@click.option("--batch-max-records", type=click.IntRange(min=1), default=None,
              help="Records per insert at most (env TOKENWEIR_SINK_BATCH_MAX_RECORDS).")
@click.option("--batch-max-wait", "batch_max_wait_s", type=click.FloatRange(min=0.001),
              default=None, help="Seconds a batch waits to fill (TOKENWEIR_SINK_BATCH_MAX_WAIT_S).")
def sink_command(batch_max_records: int | None, batch_max_wait_s: float | None) -> None:
    """Write usage, replies, scale decisions, health events and alerts to ClickHouse."""
    from agents.sink import SinkConfig, run_sink

    overrides = {k: v for k, v in (("batch_max_records", batch_max_records),
                                   ("batch_max_wait_s", batch_max_wait_s)) if v is not None}
    try:
        config = SinkConfig(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise click.ClickException(f"sink configuration: {exc}") from exc
    from agents import AgentsError
    from streams import StreamsError

    try:
        _run(run_sink(_settings(), config))
    except (AgentsError, StreamsError) as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option("--no-demand", is_flag=True, help="Do not publish DemandWindows (decide only).")
@click.option("--no-decide", is_flag=True, help="Do not decide (publish DemandWindows only).")
def autoscaler(no_demand: bool, no_decide: bool) -> None:
    """Demand windows to tw.demand and ScaleDecisions to tw.scale (the [scaling] section)."""
    from agents import AgentsError
    from agents.autoscaler import run as run_autoscaler

    try:
        _run(run_autoscaler(_settings(), demand=not no_demand, decide=not no_decide))
    except (AgentsError, SchemaError) as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option("--kind", type=click.Choice(["local", "kubernetes"]), required=True)
@click.option("--model", "models", multiple=True,
              help="local: models to run workers for (default: every configured model).")
@click.option("--engine", type=click.Choice(ENGINE_NAMES), default="sim", show_default=True,
              help="local: the workers' engine.")
@click.option("--time-scale", type=float, default=1.0, show_default=True,
              help="local, sim engine: wall seconds per simulated second.")
@click.option("--drain-timeout", "drain_timeout_s", type=click.FloatRange(min=0), default=30.0,
              show_default=True, help="local: seconds a stopped worker gets to drain.")
@click.option("--target", "targets", multiple=True,
              help="kubernetes: MODEL=deployment|statefulset/NAMESPACE/NAME (repeatable).")
@click.option("--model-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="local, transformers/vllm engines: the model directory workers serve.")
@click.option("--kubeconfig", default=None, help="kubernetes: kubeconfig file.")
@click.option("--context", default=None, help="kubernetes: kubeconfig context.")
@click.option("--in-cluster", is_flag=True, help="kubernetes: use the pod's service account.")
def actuator(kind: str, models: tuple[str, ...], engine: str, time_scale: float,
             drain_timeout_s: float, targets: tuple[str, ...], model_dir: Path | None,
             kubeconfig: str | None,
             context: str | None, in_cluster: bool) -> None:
    """Apply ScaleDecisions from tw.scale: local worker processes or a Kubernetes scale."""
    settings = _settings()
    # Workers are spawned with their own working directory in mind: pass an absolute path.
    model_dir = model_dir.resolve() if model_dir else None
    stop = asyncio.Event()

    async def go() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if kind == "local":
            from infra.actuators.local import LocalActuatorConfig, run_local

            unknown = sorted(set(models) - set(settings.models))
            if unknown:
                raise InfraError(f"models not configured: {unknown}")
            config = LocalActuatorConfig(engine=engine, time_scale=time_scale,
                                         drain_timeout_s=drain_timeout_s,
                                         model_dir=model_dir)
            await run_local(settings, config, stop, models=list(models) or None,
                            stop_workers=True)
        else:
            from infra.actuators.kubernetes import api_client, parse_target, run_kubernetes

            if not targets:
                raise InfraError("--kind kubernetes needs at least one --target")
            mapping = dict(parse_target(t) for t in targets)
            api = api_client(kubeconfig=kubeconfig, context=context, in_cluster=in_cluster)
            await run_kubernetes(settings, mapping, stop, api=api)

    try:
        _run(go())
    except ValidationError as exc:
        raise click.ClickException(f"actuator configuration: {exc}") from exc


@main.command("health-agent")
@click.option("--tick", "tick_s", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between judgements of every worker.")
@click.option("--stall-unhealthy", "stall_unhealthy_s", type=click.FloatRange(min=0.1),
              default=None, help="Seconds of requests in flight without a token before a "
                                 "worker is unhealthy [default: HealthConfig's].")
def health_agent(tick_s: float, stall_unhealthy_s: float | None) -> None:
    """Judge workers from tw.heartbeats; publish health transitions on tw.health."""
    from agents import AgentsError
    from agents.health import HealthConfig
    from agents.health_agent import run_health_agent

    settings = _settings()
    try:
        config = HealthConfig(**({} if stall_unhealthy_s is None
                                 else {"stall_unhealthy_s": stall_unhealthy_s}))
    except ValidationError as exc:
        raise click.ClickException(str(exc)) from exc

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_health_agent(settings.bootstrap, config=config, tick_s=tick_s, stop=stop)

    try:
        _run(go())
    except AgentsError as exc:
        raise click.ClickException(str(exc)) from exc


if __name__ == "__main__":
    main()
