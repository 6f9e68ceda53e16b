"""Simulated engine: continuous batching whose speed follows the model-unit cost model.

Used by load tests, the demo and the trace simulator, and as the reference
engine for ``tokenweir calibrate``: calibrating a ``SimEngine`` must give
back the cost model it was built with.

Work and time
-------------
A request carries ``mu = α·input_tokens + β·output_tokens + γ·images`` MU of
work (:class:`schemas.cost.CostModel`; the simulator has no prefix cache, so
``cached_tokens`` is always 0). The engine runs in steps, as vLLM does. In one
step every running request either prefills a chunk of at most
``prefill_chunk`` prompt tokens (α per token, plus γ per image with its first
chunk, plus β for the first output token with its last chunk) or decodes one
token (β). A step with ``n`` requests running and ``W`` MU of work lasts::

    step_s = slowdown · W / thr(n)        (simulated seconds)
    thr(n) = R · n·(B + k) / (B·(n + k))  (MU per second), R = C / 60

with C = ``capacity_mu_per_min``, B = ``max_batch`` and k = ``knee``.
``thr(n)`` grows with n and equals R at n = B: a saturated engine retires
exactly C MU per minute whatever its mix of prefill and decode, so a stream
of identical requests of ``mu`` MU each completes at ``C / mu`` requests per
minute (the relation calibration inverts). A request's own speed ``thr(n)/n``
falls as the batch grows: that is the slowdown with batch size. k shapes it:
small k saturates early (compute bound), large k keeps throughput nearly
linear in n (memory-bound decode); with the default k = B a request alone
decodes about twice as fast as in a full batch.

Time: simulated seconds run ``1 / time_scale`` times faster than wall
seconds (``time_scale=0.01``: a 100 s simulation takes 1 s). Steps are
scheduled on absolute wall deadlines, so timer overshoot does not accumulate,
and a run of identical decode steps is slept as one "macro step", so short
steps cost no more than long ones. ``Generation.ttft_s``/``tpot_s`` are in
simulated seconds.

Determinism: scheduling is a pure function of arrivals (:class:`SimScheduler`
does no I/O and has no clock of its own). Output tokens are a function of the
engine seed, the model, the prompt and, when sampling (temperature > 0), the
request's sampling seed or else its id; greedy output depends on the prompt
alone, and a shorter ``max_tokens`` gives a prefix of a longer one. Output
stops at ``max_tokens`` ("length") unless ``eos_probability`` > 0 draws an
earlier end of sequence ("stop").

Faults (:class:`SimFaults`, at construction or at any time by :meth:`SimEngine.inject`):
a silent hang (no step ever finishes again, ``health()`` stays True and only
the frozen ``tokens_generated`` gives it away), after a number of completions,
``hang_after_s`` wall seconds after the engine started, or now
(:meth:`SimEngine.hang_now`); a crash (every held and later request fails
with :class:`workers.EngineError`, ``health()`` is False) and a slowdown
factor on every step. :func:`parse_faults` reads them from the worker's
``--fault`` option.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import logging
import math
import random
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.cost import CostModel
from schemas.events import InferenceRequest
from workers import EngineError
from workers.engines.base import EngineState, EngineStats, Generation

log = logging.getLogger(__name__)

VOCAB_SIZE = 32_000
_WORDS = (
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "on", "was", "be",
    "by", "at", "this", "from", "or", "an", "are", "which", "not", "but", "have", "one", "all",
    "can", "its", "more", "new", "model",
)
# A macro step sleeps at most this long (wall) so that stats(), read by every
# heartbeat, never shows progress older than this.
_MAX_MACRO_STEP_WALL_S = 0.1
# Further behind schedule than this (the event loop was blocked, or the steps
# are too short for this CPU), the clock is re-anchored instead of running
# steps back to back to catch up: a burst of catch-up steps would finish
# requests before they could have arrived.
_MAX_LAG_WALL_S = 0.1


class SimFaults(BaseModel):
    """Faults to inject; request counts are completions (stop or length) since start."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # After this many completions no step finishes again; health() stays True.
    hang_after_requests: Annotated[int, Field(ge=0)] | None = None
    # After this many completions every held and later request raises EngineError.
    crash_after_requests: Annotated[int, Field(ge=0)] | None = None
    slowdown: Annotated[float, Field(gt=0)] = 1.0  # step-time multiplier
    slowdown_after_requests: Annotated[int, Field(ge=0)] = 0
    # Wall seconds after the engine starts (its first request) at which it hangs silently.
    hang_after_s: Annotated[float, Field(ge=0)] | None = None


_FAULT_KEYS = {"hang-after": "hang_after_s", "hang-after-requests": "hang_after_requests",
               "crash-after-requests": "crash_after_requests", "slowdown": "slowdown",
               "slowdown-after-requests": "slowdown_after_requests"}


def parse_faults(spec: str) -> SimFaults:
    """``"hang-after:30"``, ``"slowdown:2,slowdown-after-requests:10"``...: comma-separated
    ``name:value`` pairs, names those of :class:`SimFaults` with dashes (``hang-after`` is
    ``hang_after_s``). Raises :class:`workers.EngineError`."""
    fields: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition(":")
        if not sep or name not in _FAULT_KEYS:
            raise EngineError(f"fault {part!r}: use NAME:VALUE with NAME one of "
                              f"{', '.join(_FAULT_KEYS)}")
        fields[_FAULT_KEYS[name]] = value
    try:
        return SimFaults.model_validate(fields, strict=False)
    except ValueError as exc:
        raise EngineError(f"fault {spec!r}: {exc}") from exc


@dataclass(eq=False)
class SimJob:
    """One request inside the scheduler."""

    request_id: str
    priority: int  # lower is more urgent
    seq: int  # arrival order: breaks priority ties
    arrived_at: float  # simulated s
    input_tokens: int
    images: int
    output_tokens: int  # what this request will produce (≤ max_tokens)
    prefill_left: int  # prompt tokens not prefilled yet
    produced: int = 0  # output tokens so far
    first_token_at: float | None = None  # simulated s
    finished_at: float | None = None  # simulated s
    done: bool = False  # finished or aborted; dropped from the waiting heap lazily

    @property
    def prefilling(self) -> bool:
        return self.produced == 0

    @property
    def ttft_s(self) -> float:
        if self.first_token_at is None:
            return 0.0
        return max(0.0, self.first_token_at - self.arrived_at)

    @property
    def tpot_s(self) -> float:
        if self.first_token_at is None or self.finished_at is None or self.produced < 2:
            return 0.0
        return (self.finished_at - self.first_token_at) / (self.produced - 1)


@dataclass(frozen=True)
class StepPlan:
    steps: int  # identical steps ahead before the batch changes
    step_s: float  # simulated s per step


class SimScheduler:
    """Continuous batching in simulated time: pure, deterministic, no clock of its own.

    Drive it with :meth:`submit`/:meth:`abort` between steps, and
    :meth:`plan` then :meth:`advance` to run steps; the trace simulator can
    drive it directly in virtual time.
    """

    def __init__(self, cost: CostModel, *, max_batch: int, knee: float | None = None,
                 prefill_chunk: int = 512, faults: SimFaults | None = None) -> None:
        if max_batch < 1:
            raise EngineError(f"max_batch must be at least 1, not {max_batch}")
        if knee is not None and not knee > 0:
            raise EngineError(f"knee must be positive, not {knee}")
        if prefill_chunk < 1:
            raise EngineError(f"prefill_chunk must be at least 1 token, not {prefill_chunk}")
        self.cost = cost
        self.max_batch = max_batch
        self.knee = float(knee) if knee is not None else float(max_batch)
        self.prefill_chunk = prefill_chunk
        self.faults = faults or SimFaults()
        self.now = 0.0  # simulated s at the last step boundary
        self.running: list[SimJob] = []
        self.waiting = 0  # requests queued (live entries of the heap)
        self.tokens_generated = 0
        self.requests_completed = 0
        self._heap: list[tuple[int, int, SimJob]] = []
        self._jobs: dict[str, SimJob] = {}
        self._seq = 0

    # -- state -----------------------------------------------------------------
    @property
    def hung(self) -> bool:
        n = self.faults.hang_after_requests
        return n is not None and self.requests_completed >= n

    @property
    def crashed(self) -> bool:
        n = self.faults.crash_after_requests
        return n is not None and self.requests_completed >= n

    @property
    def slowdown(self) -> float:
        if self.requests_completed >= self.faults.slowdown_after_requests:
            return self.faults.slowdown
        return 1.0

    def throughput(self, n: int) -> float:
        """MU per simulated second retired with ``n`` requests running (R at n = max_batch)."""
        b, k = self.max_batch, self.knee
        return self.cost.capacity_mu_per_min / 60.0 * n * (b + k) / (b * (n + k))

    # -- inputs ----------------------------------------------------------------
    def submit(self, request_id: str, *, priority: int, input_tokens: int, images: int,
               output_tokens: int, at: float) -> SimJob:
        if request_id in self._jobs:
            raise EngineError(f"request {request_id!r} is already held by the engine")
        if output_tokens < 1 or input_tokens < 0 or images < 0:
            raise EngineError(f"request {request_id!r}: needs ≥1 output token and no negatives")
        self._seq += 1
        job = SimJob(request_id=request_id, priority=priority, seq=self._seq, arrived_at=at,
                     input_tokens=input_tokens, images=images, output_tokens=output_tokens,
                     prefill_left=input_tokens)
        self._jobs[request_id] = job
        self._push(job)
        return job

    def abort(self, request_id: str) -> SimJob | None:
        """Remove a queued or running request; None when it is not held."""
        job = self._jobs.pop(request_id, None)
        if job is None:
            return None
        job.done = True
        job.finished_at = self.now
        if job in self.running:
            self.running.remove(job)
        else:
            self.waiting -= 1
        return job

    def idle_until(self, t: float) -> None:
        """Let simulated time pass with no step (idle or hung)."""
        self.now = max(self.now, t)

    # -- steps -----------------------------------------------------------------
    def plan(self, *, max_s: float = math.inf) -> StepPlan | None:
        """Admit what fits at this boundary; the identical steps ahead, None if none can run.

        ``max_s`` caps the simulated time planned at once (at least one step).
        """
        if self.hung or self.crashed:
            return None
        self._admit()
        if not self.running:
            return None
        step_s = self.slowdown * self._step_work() / self.throughput(len(self.running))
        if any(job.prefilling for job in self.running):
            steps = 1  # a prefill changes the batch's work: replan after it
        else:
            steps = min(job.output_tokens - job.produced for job in self.running)
        if step_s > 0 and max_s < steps * step_s:
            steps = max(1, int(max_s / step_s))
        return StepPlan(steps=steps, step_s=step_s)

    def advance(self, plan: StepPlan, steps: int) -> list[SimJob]:
        """Run ``steps`` (≤ ``plan.steps``) steps of ``plan``; the requests that finished.

        Nothing may be submitted or aborted between :meth:`plan` and this call.
        """
        steps = min(steps, plan.steps)
        if steps <= 0:
            return []
        self.now += steps * plan.step_s
        for job in self.running:
            if not job.prefilling:
                job.produced += steps
                self.tokens_generated += steps
                continue
            # Prefilling jobs only ever get single-step plans.
            job.prefill_left -= min(self.prefill_chunk, job.prefill_left)
            if job.prefill_left == 0:
                job.produced = 1
                job.first_token_at = self.now
                self.tokens_generated += 1
        finished = [job for job in self.running if job.produced >= job.output_tokens]
        for job in finished:
            job.done = True
            job.finished_at = self.now
            self.running.remove(job)
            del self._jobs[job.request_id]
        self.requests_completed += len(finished)
        return finished

    # -- internals -------------------------------------------------------------
    def _step_work(self) -> float:
        cost, work = self.cost, 0.0
        for job in self.running:
            if not job.prefilling:
                work += cost.beta
                continue
            chunk = min(self.prefill_chunk, job.prefill_left)
            work += cost.alpha * chunk
            if job.prefill_left == job.input_tokens:
                work += cost.gamma * job.images
            if chunk == job.prefill_left:
                work += cost.beta  # the last prefill chunk yields the first token
        return work

    def _push(self, job: SimJob) -> None:
        heapq.heappush(self._heap, (job.priority, job.seq, job))
        self.waiting += 1

    def _head(self) -> SimJob | None:
        while self._heap and self._heap[0][2].done:
            heapq.heappop(self._heap)
        return self._heap[0][2] if self._heap else None

    def _pop(self) -> SimJob:
        job = heapq.heappop(self._heap)[2]
        self.waiting -= 1
        return job

    def _admit(self) -> None:
        while len(self.running) < self.max_batch and self._head() is not None:
            self.running.append(self._pop())
        # Priority preemption, as vLLM's priority policy does: a more urgent
        # request displaces the least urgent running one, which keeps its
        # progress and resumes first among its own priority.
        while self.running and (head := self._head()) is not None:
            victim = max(self.running, key=lambda job: (job.priority, job.seq))
            if head.priority >= victim.priority:
                break
            self.running.remove(victim)
            self.running.append(self._pop())
            self._push(victim)


@dataclass
class _Held:
    request: InferenceRequest
    future: asyncio.Future[Generation]
    key: int  # seeds this request's token stream


@dataclass(frozen=True)
class _Arrival:
    request_id: str
    priority: int
    input_tokens: int
    images: int
    output_tokens: int
    wall: float  # loop time it arrived


class SimEngine:
    """The :class:`workers.engines.base.Engine` over a :class:`SimScheduler` (see module doc)."""

    name = "sim"
    supports_images = True

    def __init__(self, cost: CostModel, *, seed: int = 0, max_batch: int = 64,
                 time_scale: float = 1.0, faults: SimFaults | None = None,
                 knee: float | None = None, prefill_chunk: int = 512,
                 eos_probability: float = 0.0) -> None:
        if not time_scale > 0:
            raise EngineError(f"time_scale must be positive, not {time_scale}")
        if not 0.0 <= eos_probability < 1.0:
            raise EngineError(f"eos_probability must be in [0, 1), not {eos_probability}")
        self.time_scale = time_scale
        self._core = SimScheduler(cost, max_batch=max_batch, knee=knee,
                                  prefill_chunk=prefill_chunk, faults=faults)
        self._seed = seed
        self._eos = eos_probability
        self._held: dict[str, _Held] = {}
        # Submissions and aborts reach the scheduler only at step boundaries,
        # from its own task, so that a plan and its advance see one batch.
        self._arrivals: list[_Arrival] = []
        self._aborts: list[str] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._broken: str | None = None
        self._closed = False
        self._anchor_wall = 0.0  # loop time ...
        self._anchor_sim = 0.0  # ... that maps to this simulated time

    # -- Engine ----------------------------------------------------------------
    async def generate(self, request: InferenceRequest, *, priority: int = 0) -> Generation:
        if self._closed:
            raise EngineError("sim engine is closed")
        if self._broken is not None:
            raise EngineError(self._broken)
        if self._core.crashed:
            raise EngineError("sim engine crashed (injected fault)")
        rid = request.request_id
        if rid in self._held:
            raise EngineError(f"request {rid!r} is already held by the engine")
        loop = asyncio.get_running_loop()
        self._start(loop)
        key = self._stream_key(request)
        future: asyncio.Future[Generation] = loop.create_future()
        self._held[rid] = _Held(request, future, key)
        self._arrivals.append(_Arrival(
            request_id=rid, priority=priority, input_tokens=len(request.prompt_text().split()),
            images=len(request.images),
            output_tokens=self._output_length(random.Random(key), request.max_tokens),
            wall=loop.time()))
        self._wake.set()
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The caller gave up: free the slot as an abort would.
            if self._held.pop(rid, None) is not None:
                self._aborts.append(rid)
                self._wake.set()
            raise

    async def abort(self, request_id: str) -> bool:
        if request_id not in self._held:
            return False
        self._aborts.append(request_id)
        self._wake.set()
        return True

    async def health(self) -> bool:
        return self._state() == "ready"

    def stats(self) -> EngineStats:
        return EngineStats(state=self._state(), running=len(self._core.running),
                           waiting=self._core.waiting + len(self._arrivals),
                           tokens_generated=self._core.tokens_generated,
                           requests_completed=self._core.requests_completed)

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._fail_all("sim engine closed")

    # -- faults ----------------------------------------------------------------
    def hang_now(self) -> None:
        """Hang silently from the next step boundary: requests in flight stall, probes too."""
        log.warning("sim engine: silent hang injected")
        self.inject(self._core.faults.model_copy(
            update={"hang_after_requests": self._core.requests_completed, "hang_after_s": None}))

    def inject(self, faults: SimFaults) -> None:
        """Replace the active faults (``SimFaults()`` clears them; a hang resumes)."""
        if self._task is not None and self._core.hung:
            # Simulated time went on through the hang, as wall time did.
            self._core.idle_until(self._sim_at(self._task.get_loop().time()))
        self._core.faults = faults
        self._wake.set()

    # -- scheduler task --------------------------------------------------------
    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is None:
            self._anchor_wall, self._anchor_sim = loop.time(), self._core.now
            self._task = loop.create_task(self._run(), name="sim-engine")
            if self._core.faults.hang_after_s is not None:
                loop.call_later(self._core.faults.hang_after_s, self.hang_now)

    async def _run(self) -> None:
        try:
            await self._schedule_forever()
        except Exception as exc:  # a bug must not leave callers waiting forever
            log.exception("sim engine scheduler failed")
            self._broken = f"sim engine scheduler failed: {exc!r}"
            self._fail_all(self._broken)

    async def _schedule_forever(self) -> None:
        loop = asyncio.get_running_loop()
        core = self._core
        while True:
            self._wake.clear()
            if not core.running and not core.waiting:
                # Simulated time passed while idle, up to the first arrival:
                # not to this wake-up, whose latency would count 1/time_scale
                # times over in that request's TTFT.
                woken_at = self._sim_at(loop.time())
                core.idle_until(min([woken_at, *(self._sim_at(a.wall) for a in self._arrivals)]))
            self._take_pending()
            if core.crashed:
                # Permanent, like a dead process: clearing the fault does not revive it.
                self._broken = "sim engine crashed (injected fault)"
                self._fail_all(self._broken)
                return
            plan = core.plan(max_s=_MAX_MACRO_STEP_WALL_S / self.time_scale)
            if plan is None:  # idle, or hung
                await self._wake.wait()
                continue
            start = core.now
            woke = await self._sleep_until(loop, self._wall_at(start + plan.steps * plan.step_s))
            steps = plan.steps
            if woke and plan.step_s > 0:
                # New input (arrival, abort, fault) is taken at the next step
                # boundary, as a real engine does: finish the step in progress
                # and stop the macro step there.
                elapsed = self._sim_at(loop.time()) - start
                steps = min(plan.steps, int(elapsed / plan.step_s) + 1)
                delay = self._wall_at(start + steps * plan.step_s) - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            for job in core.advance(plan, steps):
                self._deliver(job)
            if loop.time() - self._wall_at(core.now) > _MAX_LAG_WALL_S:
                self._anchor_wall, self._anchor_sim = loop.time(), core.now

    async def _sleep_until(self, loop: asyncio.AbstractEventLoop, wall: float) -> bool:
        """Sleep until ``wall`` (loop time); True when woken earlier by new input."""
        delay = wall - loop.time()
        if delay <= 0:
            await asyncio.sleep(0)  # behind schedule: still let callers run
            return False
        try:
            async with asyncio.timeout(delay):
                await self._wake.wait()
        except TimeoutError:
            return False
        return True

    def _take_pending(self) -> None:
        # Aborts first: a cancelled request's id may already be resubmitted.
        for rid in self._aborts:
            job = self._core.abort(rid)
            if job is not None:
                self._deliver(job, aborted=True)
                continue
            for i, arrival in enumerate(self._arrivals):
                if arrival.request_id == rid:
                    del self._arrivals[i]
                    self._finish(rid, produced=0, reason="abort", ttft_s=0.0, tpot_s=0.0)
                    break
        self._aborts.clear()
        for a in self._arrivals:
            try:
                self._core.submit(a.request_id, priority=a.priority, input_tokens=a.input_tokens,
                                  images=a.images, output_tokens=a.output_tokens,
                                  at=self._sim_at(a.wall))
            except EngineError as exc:
                held = self._held.pop(a.request_id, None)
                if held is not None and not held.future.done():
                    held.future.set_exception(exc)
        self._arrivals.clear()

    # -- results ---------------------------------------------------------------
    def _deliver(self, job: SimJob, *, aborted: bool = False) -> None:
        held = self._held.get(job.request_id)
        if held is None:
            return
        reason: Literal["stop", "length", "abort"]
        if aborted:
            reason = "abort"
        else:
            reason = "stop" if job.output_tokens < held.request.max_tokens else "length"
        self._finish(job.request_id, produced=job.produced, reason=reason,
                     ttft_s=job.ttft_s, tpot_s=job.tpot_s, input_tokens=job.input_tokens)

    def _finish(self, request_id: str, *, produced: int, reason: Literal["stop", "length", "abort"],
                ttft_s: float, tpot_s: float, input_tokens: int | None = None) -> None:
        held = self._held.pop(request_id, None)
        if held is None or held.future.done():
            return
        rng = random.Random(held.key)
        if self._eos > 0:
            rng.random()  # the end-of-sequence draw comes first in the stream
        token_ids = [rng.randrange(VOCAB_SIZE) for _ in range(produced)]
        if input_tokens is None:
            input_tokens = len(held.request.prompt_text().split())
        held.future.set_result(Generation(
            text=" ".join(_WORDS[t % len(_WORDS)] for t in token_ids), token_ids=token_ids,
            finish_reason=reason, input_tokens=input_tokens, ttft_s=ttft_s, tpot_s=tpot_s))

    def _fail_all(self, why: str) -> None:
        held, self._held = self._held, {}
        self._arrivals.clear()
        for h in held.values():
            if not h.future.done():
                h.future.set_exception(EngineError(why))

    # -- helpers ---------------------------------------------------------------
    def _state(self) -> EngineState:
        if self._closed:
            return "closed"
        if self._broken is not None or self._core.crashed:
            return "failed"
        return "ready"

    def _stream_key(self, request: InferenceRequest) -> int:
        sampling = request.sampling
        if sampling.temperature == 0:
            salt = "greedy"
        elif sampling.seed is not None:
            salt = f"seed:{sampling.seed}"
        else:
            salt = f"id:{request.request_id}"
        text = f"{self._seed}\x00{request.model}\x00{salt}\x00{request.prompt_text()}"
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")

    def _output_length(self, rng: random.Random, max_tokens: int) -> int:
        if self._eos == 0:
            return max_tokens
        # Geometric number of tokens up to and including end of sequence.
        u = rng.random()
        natural = 1 + int(math.log1p(-u) / math.log1p(-self._eos))
        return min(max_tokens, natural)

    def _sim_at(self, wall: float) -> float:
        return self._anchor_sim + (wall - self._anchor_wall) / self.time_scale

    def _wall_at(self, sim: float) -> float:
        return self._anchor_wall + (sim - self._anchor_sim) * self.time_scale
