"""The local process actuator: ``tokenweir worker`` processes per model, as ScaleDecisions say.

Processes are named ``worker-<model>-<n>`` (tracked by :mod:`infra.procs`) and the
same name is the worker's ``--worker-id``, so that heartbeats and HealthEvents name the
process. Scale up spawns the lowest free indices; scale down SIGTERMs the newest
processes, which drain (finish what they hold, leave the group) before exiting. A
process that died is respawned under its name; one the health agent calls
``unhealthy`` is killed (SIGKILL) and respawned under its name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from infra import procs
from infra.actuators.base import follow_decisions
from schemas.config import Settings
from schemas.events import HealthEvent, ScaleDecision

log = logging.getLogger(__name__)


class LocalActuatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: str = "sim"
    time_scale: Annotated[float, Field(gt=0)] = 1.0  # sim: wall s per simulated s
    drain_timeout_s: Annotated[float, Field(ge=0)] = 30.0  # a stopped worker's drain
    max_batch: Annotated[int, Field(ge=1)] = 64
    reconcile_s: Annotated[float, Field(gt=0)] = 1.0  # s between checks for dead workers
    model_dir: Path | None = None  # transformers/vllm: the model directory workers serve


def worker_name(model: str, index: int) -> str:
    return f"worker-{model}-{index}"


def owned_model(name: str, models: list[str]) -> str | None:
    """The model a process name ``worker-<model>-<n>`` belongs to (longest match)."""
    for model in sorted(models, key=len, reverse=True):
        prefix = f"worker-{model}-"
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return model
    return None


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    start: list[str] = []  # process names to spawn
    stop: list[str] = []  # process names to drain (newest first)


def plan(model: str, desired: int, running: Mapping[str, float], busy: set[str]) -> Plan:
    """Processes to start or stop so that ``model`` has ``desired`` running. Pure.

    ``running``: this model's live processes, name -> started at (s), not being stopped;
    ``busy``: names still in use (draining or being killed), not to be reused yet.
    """
    if len(running) > desired:
        newest = sorted(running, key=lambda n: (running[n], n), reverse=True)
        return Plan(stop=newest[:len(running) - desired])
    taken = set(running) | busy
    start: list[str] = []
    index = 0
    while len(running) + len(start) < desired:
        name = worker_name(model, index)
        if name not in taken:
            start.append(name)
        index += 1
    return Plan(start=start)


def restart_for(event: HealthEvent, started: Mapping[str, float]) -> str | None:
    """The process to kill and respawn for ``event``, if it is ours and about this incarnation."""
    if event.state != "unhealthy" or event.worker not in started:
        return None
    if event.at < started[event.worker]:
        return None  # about the process that ran under this name before
    return event.worker


class LocalActuator:
    def __init__(self, settings: Settings, config: LocalActuatorConfig,
                 models: list[str] | None = None) -> None:
        self.settings = settings
        self.config = config
        self.models = models or list(settings.models)
        self.run_dir = settings.run_dir()
        self.desired: dict[str, int] = {}
        self.started: dict[str, float] = {}  # name -> started at (s), running, ours
        self._popen: dict[str, subprocess.Popen[bytes]] = {}
        self._busy: dict[str, asyncio.Task[None]] = {}  # name -> its drain or kill
        self._handled_health: set[str] = set()
        self.log: list[str] = []  # what was done, for operators and tests

    def adopt(self) -> None:
        """Processes of a previous actuator run (pid files) are ours again."""
        for name, _pid in procs.tracked(self.run_dir).items():
            if owned_model(name, self.models) is not None:
                pidfile = self.run_dir / f"{name}.pid"
                with contextlib.suppress(OSError):
                    self.started[name] = pidfile.stat().st_mtime

    def _argv(self, model: str, name: str) -> list[str]:
        c = self.config
        return [sys.executable, "-m", "infra.cli", "worker", "--model", model,
                "--engine", c.engine, "--worker-id", name, "--time-scale", str(c.time_scale),
                "--drain-timeout", str(c.drain_timeout_s), "--max-batch", str(c.max_batch),
                *(["--model-dir", str(c.model_dir)] if c.model_dir else [])]

    def _spawn(self, model: str, name: str) -> None:
        env = {**os.environ, **self.settings.to_env()}
        logs = self.settings.state_dir / "logs"
        self._popen[name] = procs.spawn(self.run_dir, name, self._argv(model, name),
                                        log_path=logs / f"{name}.log", env=env)
        self.started[name] = time.time()
        self._note(f"spawned {name}")

    def _note(self, what: str) -> None:
        log.warning("actuator: %s", what)
        self.log.append(f"{time.time():.1f} {what}")

    async def apply(self, decision: ScaleDecision) -> None:
        if decision.model not in self.models:
            return
        self.desired[decision.model] = decision.desired
        self._note(f"{decision.model}: desired {decision.desired} ({decision.reason})")
        await self.reconcile()

    async def reconcile(self) -> None:
        self._reap()
        for model, desired in self.desired.items():
            running = {n: t for n, t in self.started.items()
                       if owned_model(n, self.models) == model and n not in self._busy}
            step = plan(model, desired, running, set(self._busy))
            for name in step.start:
                self._spawn(model, name)
            for name in step.stop:
                self._busy[name] = asyncio.create_task(self._drain(name))

    def _reap(self) -> None:
        for name in list(self.started):
            if name in self._busy:
                continue
            popen = self._popen.get(name)
            if popen is not None:
                popen.poll()  # reaps an exited child, so it is not a zombie
            if procs.running(self.run_dir, name) is None:
                del self.started[name]
                self._popen.pop(name, None)
                self._note(f"{name} exited; respawned if still wanted")
        for name in [n for n, task in self._busy.items() if task.done()]:
            self._busy.pop(name).result()

    async def _drain(self, name: str) -> None:
        self._note(f"draining {name}")
        await asyncio.to_thread(procs.stop, self.run_dir, name,
                                timeout_s=self.config.drain_timeout_s + 15.0)
        self.started.pop(name, None)
        self._popen.pop(name, None)
        self._note(f"{name} stopped")

    async def on_health(self, event: HealthEvent) -> None:
        if event.event_id in self._handled_health:
            return
        name = restart_for(event, self.started)
        if name is None or name in self._busy:
            return
        self._handled_health.add(event.event_id)
        model = owned_model(name, self.models)
        if model is None:
            return
        self._note(f"{name} unhealthy ({event.reason}): kill -9 and respawn")
        await self._kill9(name)
        self._spawn(model, name)

    async def _kill9(self, name: str) -> None:
        pid = procs.running(self.run_dir, name)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            popen = self._popen.get(name)
            while procs.alive(pid):
                if popen is not None:
                    popen.poll()
                await asyncio.sleep(0.05)
            procs.running(self.run_dir, name)  # removes the stale pid file
        self.started.pop(name, None)
        self._popen.pop(name, None)

    async def stop_all(self) -> None:
        """Drain every worker this actuator runs (used when the actuator itself stops)."""
        for name in list(self.started):
            if name not in self._busy:
                self._busy[name] = asyncio.create_task(self._drain(name))
        await asyncio.gather(*self._busy.values(), return_exceptions=True)


async def run_local(settings: Settings, config: LocalActuatorConfig, stop: asyncio.Event, *,
                    models: list[str] | None = None, stop_workers: bool = False) -> LocalActuator:
    actuator = LocalActuator(settings, config, models)
    actuator.adopt()
    try:
        await follow_decisions(settings.bootstrap, stop, actuator.apply,
                               on_health=actuator.on_health, on_idle=actuator.reconcile,
                               idle_s=config.reconcile_s)
    finally:
        if stop_workers:
            await actuator.stop_all()
    return actuator
