"""The ``tokenweir`` command."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import ValidationError

from infra import InfraError
from schemas.config import Settings
from schemas.errors import SchemaError
from workers.engines import ENGINE_NAMES

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
    """Run Faust agents (NAMES: admission or passthrough) in this process."""
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
def worker(model: str, engine: str, worker_id: str | None, model_dir: Path | None,
           max_batch: int, max_in_flight: int | None, time_scale: float,
           drain_timeout_s: float) -> None:
    """Serve one model's shards with an engine until SIGTERM (then drain)."""
    settings = _settings()
    if model not in settings.models:
        raise click.ClickException(f"model {model!r} is not configured: {settings.models}")
    _run(_serve(settings, model, engine, worker_id, model_dir, max_batch=max_batch,
                max_in_flight=max_in_flight, time_scale=time_scale,
                drain_timeout_s=drain_timeout_s))


async def _serve(settings: Settings, model: str, engine_name: str, worker_id: str | None,
                 model_dir: Path | None = None, *, max_batch: int = 64,
                 max_in_flight: int | None = None, time_scale: float = 1.0,
                 drain_timeout_s: float = 30.0) -> None:
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
                             max_batch=max_batch, time_scale=time_scale)
        # Load weights before joining the group: a bad model fails here, not on traffic.
        if not await engine.health():
            await engine.close()
            raise InfraError(f"engine {engine_name} for {model} is not healthy after start")
    except WorkersError as exc:
        raise InfraError(str(exc)) from exc
    sink = KafkaEventSink(settings.bootstrap, client_id=f"worker-{model}")
    await sink.start()
    try:
        await ShardWorker(bootstrap=settings.bootstrap, model=model, engine=engine,
                          sink=sink, worker_id=worker_id, cost=cost, max_batch=max_batch,
                          max_in_flight=max_in_flight,
                          drain_timeout_s=drain_timeout_s).run(stop)
    except WorkersError as exc:
        raise InfraError(str(exc)) from exc
    finally:
        await engine.close()
        await sink.stop()


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
@click.option("--requests", "n_requests", type=int, default=6, show_default=True)
@click.option("--keep-running", is_flag=True, help="Leave the stack up afterwards.")
def demo(n_requests: int, keep_running: bool) -> None:
    """The main job: bring the stack up and carry requests end to end."""
    from infra.demo import run_demo

    _run(run_demo(_settings(), _say, n_requests=n_requests, keep_running=keep_running))




@main.command()
@click.option("--trace", "trace_path", type=click.Path(path_type=Path, exists=True),
              required=True, help="azure2023 directory (code + conversation merged).")
@click.option("--policy", type=click.Choice(["all", "tokenweir", "kpa", "keda-lag", "oracle",
                                             "static-peak"]), default="all", show_default=True)
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
    from sim.simulator import POLICIES, SimConfig, TokenweirScaler, Workload, plot, table
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


if __name__ == "__main__":
    main()
