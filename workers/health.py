"""Worker health: heartbeats, black-box probes and ``/livez`` ``/readyz`` on a thread of their own.

Why a thread: the engine and the Kafka consumer live on the worker's main
event loop, which request work can hold (a long batch step, CPU-heavy
preprocessing that slipped onto the loop, a GIL-bound library call). Beats
sent from that loop would stop exactly when they matter, and a probe timed
there could not time out while the loop is stuck. So a :class:`HealthMonitor`
runs its own event loop in a daemon thread with its own Kafka producer for
``tw.heartbeats``, and the HTTP endpoint on that loop.

What crosses the threads, and how:

- the main loop hands a :class:`Snapshot` of the worker (shards, held
  requests, the engine's cumulative token count, state) every beat
  interval; the monitor keeps the latest (an immutable object swapped in one
  assignment). A blocked main loop leaves it stale: no tokens move and
  :attr:`Snapshot.taken_at` ages, which is what a hang looks like from outside;
- the main loop marks each finished request (one float assignment);
- a probe is the worker's coroutine submitted to the main loop with
  :func:`asyncio.run_coroutine_threadsafe`; its timeout is measured on the
  health loop, so a hung engine or a blocked main loop shows as a probe
  timeout, and the probe is cancelled on the main loop when it gets there.

Probes: when neither a real request nor a probe finished within
``probe_interval_s``, one minimal request (one output token) goes through
the engine at ``probe_priority`` (default :data:`PROBE_PRIORITY`, above every
request class, so a saturated engine still answers it at once). Its outcome
rides on every following beat until the next probe (the health agent tells
new results by ``ProbeResult.at``).

Liveness (``/livez``, for a Kubernetes liveness probe) fails when the worker
is hung: requests held and no token produced for ``live_stall_s``, no fresh
snapshot from the main loop for ``live_stall_s``, or the last
``live_probe_failures`` probes failed. Readiness (``/readyz``) also needs the
engine ready and the last probe (if any) ok. Both answer from this state and
never touch the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.events import ProbeResult, WorkerHeartbeat
from streams import StreamsError
from streams.sink import EventSink
from streams.topics import HEARTBEATS
from workers import WorkersError
from workers.engines.base import PROBE_PRIORITY, Generation

log = logging.getLogger(__name__)

WorkerState = Literal["starting", "ready", "draining", "failed"]
BeatSinkFactory = Callable[[], AbstractAsyncContextManager[EventSink]]
_START_TIMEOUT_S = 30.0  # producer connection and port bind on the health thread
_STOP_TIMEOUT_S = 10.0


class WorkerHealthConfig(BaseModel):
    """How a worker beats and probes. Invalid values raise :class:`pydantic.ValidationError`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    heartbeat_s: Annotated[float, Field(gt=0)] = 1.0  # s between beats
    # s without a finished request or probe before the next probe; None: never probe.
    probe_interval_s: Annotated[float, Field(gt=0)] | None = 2.0
    probe_timeout_s: Annotated[float, Field(gt=0)] = 3.0  # s, timed on the health thread
    probe_priority: int = PROBE_PRIORITY  # engine priority, lower is more urgent
    live_stall_s: Annotated[float, Field(gt=0)] = 30.0  # s held without a token: not live
    live_probe_failures: Annotated[int, Field(ge=1)] = 3  # consecutive failed probes: not live
    port: Annotated[int, Field(ge=0, le=65535)] = 0  # /livez and /readyz; 0: no endpoint
    host: str = "0.0.0.0"


@dataclass(frozen=True)
class Snapshot:
    """The worker as its main loop last saw it."""

    taken_at: float  # time.monotonic() s
    state: WorkerState
    shards: tuple[int, ...]
    in_flight: int  # requests held (preprocessing, queued or running in the engine)
    in_flight_mu: float  # MU
    queued: int  # held and waiting inside the engine
    tokens_generated: int  # the engine's output tokens since it started (monotonic)
    capacity_mu_per_min: float  # MU/min


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str


class HealthMonitor:
    """Beats, probes and the HTTP endpoint of one worker, on a daemon thread (see module doc).

    ``probe`` is a coroutine function of the worker, run on the main loop;
    ``beat_sink`` opens the sink beats go to, inside the health thread (an
    aiokafka producer belongs to the loop that started it).
    """

    def __init__(self, *, worker_id: str, model: str, engine: str, config: WorkerHealthConfig,
                 beat_sink: BeatSinkFactory, probe: Callable[[], Coroutine[Any, Any, Generation]],
                 initial: Snapshot) -> None:
        self.worker_id = worker_id
        self.model = model
        self.engine = engine
        self.config = config
        self._beat_sink = beat_sink
        self._probe = probe
        self._snapshot = initial
        self._tokens_at_beat = initial.tokens_generated
        self._seq = 0
        self._last_finished = time.monotonic()  # a real request or a probe
        self._progress_at = time.monotonic()  # last beat with tokens moving or nothing held
        self.last_probe: ProbeResult | None = None
        self.probe_failures = 0  # consecutive
        self.probes_sent = 0
        self._main_loop: asyncio.AbstractEventLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: EventSink | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self.port: int | None = None  # the endpoint's bound port once started

    # -- called from the main loop ------------------------------------------------------
    def update(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot  # one assignment: the health thread sees old or new

    def request_finished(self) -> None:
        self._last_finished = time.monotonic()

    async def start(self) -> None:
        """Start the thread; returns once its producer and endpoint are up (or raises)."""
        self._main_loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._thread_main, name=f"health-{self.worker_id}",
                                        daemon=True)
        self._thread.start()
        started = await asyncio.to_thread(self._started.wait, _START_TIMEOUT_S)
        if self._start_error is not None:
            raise WorkersError(f"health thread failed to start: {self._start_error}") \
                from self._start_error
        if not started:
            raise WorkersError(f"health thread not up within {_START_TIMEOUT_S:.0f}s")

    async def beat_now(self, snapshot: Snapshot) -> None:
        """Send a beat of ``snapshot`` at once and wait until the broker has it (drain)."""
        self.update(snapshot)
        await self._on_health_loop(self._send_beat(flush=True))

    async def stop(self) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop ended meanwhile
                loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, _STOP_TIMEOUT_S)

    async def _on_health_loop(self, coro: Coroutine[Any, Any, None]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            coro.close()
            raise WorkersError("the health thread is not running")
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    # -- state, for the endpoint and tests -------------------------------------------------
    def liveness(self, now: float | None = None) -> Verdict:
        now = time.monotonic() if now is None else now
        limit = self.config.live_stall_s
        if self._snapshot.in_flight > 0 and now - self._progress_at >= limit:
            return Verdict(False, f"{self._snapshot.in_flight} requests held and no token "
                                  f"for {now - self._progress_at:.1f}s")
        if now - self._snapshot.taken_at >= limit:
            return Verdict(False, f"main loop silent for {now - self._snapshot.taken_at:.1f}s")
        if self.probe_failures >= self.config.live_probe_failures:
            return Verdict(False, f"last {self.probe_failures} probes failed")
        return Verdict(True, "live")

    def readiness(self, now: float | None = None) -> Verdict:
        live = self.liveness(now)
        if not live.ok:
            return live
        if self._snapshot.state != "ready":
            return Verdict(False, f"worker {self._snapshot.state}")
        if self.last_probe is not None and not self.last_probe.ok:
            return Verdict(False, f"last probe failed: {self.last_probe.error}")
        return Verdict(True, "ready")

    # -- the health thread ----------------------------------------------------------------
    def _thread_main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start(), or logged once running
            if not self._started.is_set():
                self._start_error = exc
                self._started.set()
            else:
                log.exception("worker %s: health thread failed", self.worker_id)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        async with contextlib.AsyncExitStack() as stack:
            self._sink = await stack.enter_async_context(self._beat_sink())
            if self.config.port:
                await stack.enter_async_context(self._endpoint())
            tasks = [asyncio.create_task(self._beat_forever(), name="health-beats")]
            if self.config.probe_interval_s is not None:
                tasks.append(asyncio.create_task(self._probe_forever(), name="health-probes"))
            self._started.set()
            try:
                await self._stopping.wait()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    # -- beats ----------------------------------------------------------------------------
    async def _beat_forever(self) -> None:
        while True:
            try:
                await self._send_beat(flush=True)
            except StreamsError as exc:
                # The agent will see the silence; the next beat tries again.
                log.warning("worker %s: heartbeat not delivered: %s", self.worker_id, exc)
            await asyncio.sleep(self.config.heartbeat_s)

    def _next_beat(self) -> WorkerHeartbeat:
        snap = self._snapshot
        tokens = max(0, snap.tokens_generated - self._tokens_at_beat)
        self._tokens_at_beat = max(self._tokens_at_beat, snap.tokens_generated)
        if tokens > 0 or snap.in_flight == 0:
            self._progress_at = time.monotonic()
        self._seq += 1
        return WorkerHeartbeat(
            worker=self.worker_id, model=self.model, engine=self.engine, seq=self._seq,
            shards=list(snap.shards), engine_state=snap.state, in_flight=snap.in_flight,
            in_flight_mu=snap.in_flight_mu, queued=snap.queued,
            capacity_mu_per_min=snap.capacity_mu_per_min, tokens_since_last=tokens,
            probe=self.last_probe)

    async def _send_beat(self, *, flush: bool) -> None:
        if self._sink is None:
            raise WorkersError("heartbeat sink not started")
        await self._sink.send(HEARTBEATS, self._next_beat(), key=self.worker_id)
        if flush:
            await self._sink.flush()

    # -- probes ---------------------------------------------------------------------------
    async def _probe_forever(self) -> None:
        interval = self.config.probe_interval_s or 0.0
        while True:
            idle = time.monotonic() - self._last_finished
            if idle < interval:
                await asyncio.sleep(interval - idle)
                continue
            if self._snapshot.state != "ready":  # starting or draining: nothing to prove
                await asyncio.sleep(interval)
                continue
            self._record(await self._probe_once())
            self._last_finished = time.monotonic()

    async def _probe_once(self) -> ProbeResult:
        if self._main_loop is None:
            raise WorkersError("health monitor not started")
        started, at = time.monotonic(), time.time()
        self.probes_sent += 1
        try:
            future = asyncio.run_coroutine_threadsafe(self._probe(), self._main_loop)
        except RuntimeError as exc:  # the main loop is closed
            return ProbeResult(ok=False, latency_s=0.0, at=at, error=f"main loop gone: {exc}")
        try:
            async with asyncio.timeout(self.config.probe_timeout_s):
                generation = await asyncio.wrap_future(future)
        except TimeoutError:
            future.cancel()  # reaches the main loop whenever it runs again
            return ProbeResult(ok=False, latency_s=time.monotonic() - started, at=time.time(),
                               error=f"timeout after {self.config.probe_timeout_s:g}s")
        except Exception as exc:  # whatever the engine raised, the probe failed
            return ProbeResult(ok=False, latency_s=time.monotonic() - started, at=time.time(),
                               error=f"{type(exc).__name__}: {exc}"[:1024])
        latency = time.monotonic() - started
        if generation.finish_reason == "abort" or not generation.token_ids:
            return ProbeResult(ok=False, latency_s=latency, at=time.time(),
                               error=f"probe ended {generation.finish_reason} without a token")
        return ProbeResult(ok=True, latency_s=latency, at=time.time())

    def _record(self, result: ProbeResult) -> None:
        self.last_probe = result
        if result.ok:
            self.probe_failures = 0
            self._progress_at = time.monotonic()  # the engine works; held requests are elsewhere
        else:
            self.probe_failures += 1
            log.warning("worker %s: probe failed (%d in a row): %s", self.worker_id,
                        self.probe_failures, result.error)

    # -- HTTP -----------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _endpoint(self) -> AsyncIterator[None]:
        from aiohttp import web

        def answer(verdict: Verdict) -> web.Response:
            body = {"ok": verdict.ok, "reason": verdict.reason, "worker": self.worker_id,
                    "probe": self.last_probe.model_dump() if self.last_probe else None}
            return web.Response(status=200 if verdict.ok else 503, text=json.dumps(body),
                                content_type="application/json")

        async def livez(_: web.Request) -> web.Response:
            return answer(self.liveness())

        async def readyz(_: web.Request) -> web.Response:
            return answer(self.readiness())

        app = web.Application()
        app.router.add_get("/livez", livez)
        app.router.add_get("/readyz", readyz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.config.host, self.config.port)
            await site.start()
            self.port = self.config.port
            yield
        finally:
            await runner.cleanup()
