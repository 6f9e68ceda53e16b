"""Transformers engine: a Hugging Face causal-LM directory on torch, batched generation.

Loads ``AutoModelForCausalLM`` and ``AutoTokenizer`` from a local directory
(``local_files_only``: nothing comes from a hub) onto CUDA when torch sees a
GPU, else the CPU. torch and transformers come with the ``inference`` extra
and are imported when an engine is built, so the control plane installs
without them.

Scheduling
----------
Static batching, the most ``transformers.generate`` offers: requests wait in
a queue ordered by priority (lower first) then arrival; whenever no batch
runs, the next batch takes up to ``max_batch`` of them from the head, and
requests that arrive meanwhile form the next one. There is no preemption,
so an urgent request (a health probe included) waits for the batch in
progress, at most ``max_tokens`` decode steps of it. The blocking torch
call runs on a single-thread executor, so the event loop (heartbeats,
Kafka) stays free and batches never overlap.

Prompts are left-padded to the batch's longest, with an attention mask;
``generate`` derives position ids from the mask, so a padded row computes
what it would alone (up to floating-point rounding) and greedy output does
not depend on batch company.

Per request, inside one batch
-----------------------------
Two hooks run after every decode step, on the executor thread:

- a logits processor samples the rows with ``temperature > 0`` (temperature,
  top-k, top-p, each row with its own ``torch.Generator``, seeded by
  ``sampling.seed`` or else by the engine seed and request id) and pins
  their scores to the drawn token; greedy rows are left to ``generate``'s
  argmax. So one batch mixes greedy and sampled requests, and a seeded
  request draws the same tokens whatever batch it lands in.
- a stopping criterion records each row's new token and its time, and
  ends a row at its own ``max_tokens`` ("length"), at an end-of-sequence
  token or a ``sampling.stop`` string ("stop"), or when it was aborted
  ("abort"). A finished row is answered at once, not at the end of its
  batch; ``generate`` keeps computing it (feeding padding) until the whole
  batch is done, as static batching does.

Outputs: ``token_ids`` are the tokens the model produced for the request,
the end-of-sequence token included when it ended one (it cost a decode
step and is billed, as vLLM reports it); never padding. ``text`` decodes
them without special tokens and stops before a matched stop string.
``input_tokens`` counts the prompt's token ids as fed to the model (the
BOS the tokenizer adds included; the chat template applied for requests
with messages when the tokenizer has one). ``cached_tokens`` is 0: there
is no prefix cache.

Timing (wall seconds, ``time.perf_counter``): ``ttft_s`` runs from the
``generate`` call to the first token, so it includes waiting in the engine
queue and the batch's prefill, as the simulated engine measures it;
``tpot_s`` is the mean gap between a request's later tokens, each stamped
when the stopping criterion sees it (the step's tokens are copied to the
host there, which also synchronises CUDA).

The model loads on first use (``generate`` or ``health``) on the executor
thread; ``stats().state`` is "starting" until then.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from schemas.events import InferenceRequest
from workers import EngineError
from workers.engines.base import EngineState, EngineStats, Generation, enter_engine

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "abort"]
# close() waits this long for the batch in progress to reach its next step.
_CLOSE_WAIT_S = 30.0


@dataclass(eq=False)
class _Job:
    """One request held by the engine.

    ``state`` moves queued -> running -> finished; queued -> running and
    queued -> finished happen on the event loop, running -> finished on the
    executor thread (which alone writes the output fields while running).
    """

    request: InferenceRequest
    priority: int  # lower is more urgent
    seq: int  # arrival order: breaks priority ties
    prompt_ids: list[int]
    future: asyncio.Future[Generation]
    arrived: float  # perf_counter s
    sample_seed: int | None  # None: greedy
    state: Literal["queued", "running", "finished"] = "queued"
    aborted: bool = False  # set on the loop, honoured by the executor at the next step
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    reason: FinishReason | None = None
    first_token_at: float | None = None  # perf_counter s
    last_token_at: float | None = None  # perf_counter s

    def generation(self) -> Generation:
        n = len(self.token_ids)
        ttft = 0.0 if self.first_token_at is None else self.first_token_at - self.arrived
        tpot = 0.0
        if n >= 2 and self.first_token_at is not None and self.last_token_at is not None:
            tpot = (self.last_token_at - self.first_token_at) / (n - 1)
        return Generation(text=self.text, token_ids=list(self.token_ids),
                          finish_reason=self.reason or "abort",
                          input_tokens=len(self.prompt_ids), ttft_s=max(0.0, ttft),
                          tpot_s=max(0.0, tpot))


class TransformersEngine:
    """The :class:`workers.engines.base.Engine` over ``transformers`` (see module doc)."""

    name = "transformers"
    supports_images = False  # text-only causal LMs; request images are ignored
    time_scale = 1.0

    def __init__(self, model_dir: Path, *, max_batch: int = 16, seed: int = 0,
                 device: str | None = None, eos_token_ids: Sequence[int] | None = None) -> None:
        """``device``: a torch device ("cpu", "cuda:1"); default CUDA when available.

        ``eos_token_ids`` replaces the tokens that end a sequence (default:
        the model's generation config plus the tokenizer's EOS).
        """
        if max_batch < 1:
            raise EngineError(f"max_batch must be at least 1, not {max_batch}")
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise EngineError(f"{model_dir} is not a model directory (no config.json); build "
                              "one with `tokenweir model make-tiny DIR`")
        try:
            import torch  # noqa: F401  (fail here, with advice, not at first request)
            import transformers  # noqa: F401
        except ImportError as exc:
            raise EngineError("the transformers engine needs torch and transformers "
                              f"(pip install 'tokenweir[inference]'): {exc}") from exc
        self.model_dir = model_dir
        self.max_batch = max_batch
        self._seed = seed
        self._device_name = device
        if eos_token_ids is not None and not eos_token_ids:
            # generate() would fill an empty set from the model's own config.
            raise EngineError("eos_token_ids must name at least one token")
        self._eos_override = list(eos_token_ids) if eos_token_ids is not None else None
        # One thread: batches and the load run one at a time, in order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tw-transformers")
        # Guards the tokenizer, used from the loop (encode) and the executor (decode).
        self._tok_lock = threading.Lock()
        self._load_lock = asyncio.Lock()
        self._model: Any = None
        self._tokenizer: Any = None
        self._device: torch.device | None = None
        self._eos: frozenset[int] = frozenset()
        self._pad_id = 0
        self._max_positions: int | None = None
        self._heap: list[tuple[int, int, _Job]] = []
        self._jobs: dict[str, _Job] = {}
        self._waiting = 0
        self._running: list[_Job] = []
        self._seq = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stop = threading.Event()  # tells the batch in progress to end at its next step
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loaded = False
        self._broken: str | None = None
        self._closed = False
        # Written by the executor thread only; read anywhere (ints: no torn reads).
        self._tokens_generated = 0
        self._requests_completed = 0

    # -- Engine ----------------------------------------------------------------
    async def generate(self, request: InferenceRequest, *, priority: int = 0) -> Generation:
        rid = request.request_id
        await enter_engine(rid, self._jobs, self._check_usable, self._ensure_loaded)
        prompt_ids = self._encode(request)
        loop = asyncio.get_running_loop()
        sampling = request.sampling
        seed: int | None = None
        if sampling.temperature > 0:
            seed = sampling.seed if sampling.seed is not None else self._request_seed(rid)
        self._seq += 1
        job = _Job(request=request, priority=priority, seq=self._seq, prompt_ids=prompt_ids,
                   future=loop.create_future(), arrived=time.perf_counter(), sample_seed=seed)
        self._jobs[rid] = job
        heapq.heappush(self._heap, (priority, job.seq, job))
        self._waiting += 1
        self._wake.set()
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            # The caller gave up: free its place as an abort would.
            self._abort_job(job)
            raise

    async def abort(self, request_id: str) -> bool:
        job = self._jobs.get(request_id)
        if job is None:
            return False
        return self._abort_job(job)

    async def health(self) -> bool:
        if self._closed or self._broken is not None:
            return False
        try:
            await self._ensure_loaded()
        except EngineError:
            return False
        return self._state() == "ready"

    def stats(self) -> EngineStats:
        running = sum(1 for job in self._running if job.state == "running")
        return EngineStats(state=self._state(), running=running, waiting=self._waiting,
                           tokens_generated=self._tokens_generated,
                           requests_completed=self._requests_completed)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            try:
                # The batch in progress sees the stop flag at its next step.
                await asyncio.wait_for(asyncio.shield(self._task), _CLOSE_WAIT_S)
            except TimeoutError:
                log.warning("transformers engine: batch still running %ss after close",
                            _CLOSE_WAIT_S)
                self._task.cancel()
        self._fail_all("transformers engine closed")
        self._executor.shutdown(wait=False, cancel_futures=True)
        device, self._model = self._device, None
        if device is not None and device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    # -- loading ---------------------------------------------------------------
    async def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        async with self._load_lock:
            if self._loaded:
                return
            if self._broken is not None:
                raise EngineError(self._broken)
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self._executor, self._load)
            except Exception as exc:
                self._broken = f"loading {self.model_dir} failed: {exc!r}"
                raise EngineError(self._broken) from exc
            self._loop = loop
            self._loaded = True
            if not self._closed:  # close() may have come while the weights loaded
                self._task = loop.create_task(self._schedule_forever(),
                                              name="transformers-engine")

    def _load(self) -> None:
        """Executor thread: load the tokenizer and the model onto the device."""
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self._device_name is not None:
            device = torch.device(self._device_name)
        else:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # float32 on CPU (half precision is slow there); on GPU the checkpoint's own dtype.
        dtype: Any = torch.float32 if device.type == "cpu" else "auto"
        # transformers 5 renamed torch_dtype to dtype.
        dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        # Any: transformers' stubs type from_pretrained's result by its mixins, not the model.
        model: Any = AutoModelForCausalLM.from_pretrained(
            self.model_dir, local_files_only=True, **{dtype_kw: dtype})
        model = model.to(device).eval()
        eos: set[int] = set()
        if self._eos_override is not None:
            eos.update(self._eos_override)
        else:
            configured = model.generation_config.eos_token_id
            if configured is None:
                configured = model.config.eos_token_id
            if isinstance(configured, int):
                eos.add(configured)
            elif configured is not None:
                eos.update(int(t) for t in configured)
            if tokenizer.eos_token_id is not None:
                eos.add(int(tokenizer.eos_token_id))
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = model.generation_config.pad_token_id
        if pad is None:
            # Padding positions are masked out, so any id serves; EOS is the convention.
            pad = min(eos) if eos else 0
        self._tokenizer, self._model, self._device = tokenizer, model, device
        self._eos, self._pad_id = frozenset(eos), int(pad)
        self._max_positions = getattr(model.config, "max_position_embeddings", None)

    # -- scheduling --------------------------------------------------------------
    async def _schedule_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            batch = self._next_batch()
            if not batch:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._running = batch
            try:
                await loop.run_in_executor(self._executor, self._run_batch, batch)
            except Exception as exc:  # one failed batch (say, out of memory) fails its requests
                log.exception("transformers engine: batch of %d failed", len(batch))
                for job in batch:
                    if job.reason is not None:
                        self._finish_running(job)  # ended before the failure: answered
                    else:
                        self._fail(job, EngineError(f"generation failed: {exc!r}"))
            finally:
                self._running = []

    def _next_batch(self) -> list[_Job]:
        batch: list[_Job] = []
        while self._heap and len(batch) < self.max_batch:
            job = heapq.heappop(self._heap)[2]
            if job.state != "queued":
                continue  # aborted while queued: already answered and uncounted
            self._waiting -= 1
            job.state = "running"
            batch.append(job)
        return batch

    def _abort_job(self, job: _Job) -> bool:
        if job.state == "queued":
            # Left in the heap and skipped there: removing from a heap is O(n).
            self._waiting -= 1
            job.state = "finished"
            job.reason = "abort"
            self._deliver(job)
            return True
        if job.state == "running" and job.reason is None:
            job.aborted = True
            return True
        return False

    # -- the executor thread ---------------------------------------------------
    def _run_batch(self, batch: list[_Job]) -> None:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        device = self._device
        if device is None:
            raise EngineError("model not loaded")
        width = max(len(job.prompt_ids) for job in batch)
        # Left padding: every row's last prompt token sits in the last column,
        # where generation continues.
        ids = [[self._pad_id] * (width - len(j.prompt_ids)) + j.prompt_ids for j in batch]
        mask = [[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in batch]
        input_ids = torch.tensor(ids, dtype=torch.long, device=device)
        attention_mask = torch.tensor(mask, dtype=torch.long, device=device)
        config = GenerationConfig(
            max_new_tokens=max(j.request.max_tokens for j in batch), do_sample=False,
            num_beams=1, temperature=1.0, top_p=1.0, use_cache=True,
            eos_token_id=sorted(self._eos) or None, pad_token_id=self._pad_id)
        processors = LogitsProcessorList()
        if any(j.sample_seed is not None for j in batch):
            processors.append(_RowSampler(batch))
        tracker = _RowTracker(self, batch)
        self._model.generate(input_ids=input_ids, attention_mask=attention_mask,
                             generation_config=config, logits_processor=processors,
                             stopping_criteria=StoppingCriteriaList([tracker]))
        if self._stop.is_set():
            return  # close() fails the rows still open
        # Rows generate stopped before they ended themselves (a limit of the
        # model's own): answer with what they have.
        for job in batch:
            if job.reason is None:
                self._end_row(job, "abort" if job.aborted else "length")

    def _end_row(self, job: _Job, reason: FinishReason, text: str | None = None) -> None:
        """Executor thread: finish one row and hand it to the loop."""
        if text is None:
            text = self._decode(job.token_ids)
        job.text, job.reason = text, reason
        if reason != "abort":
            self._requests_completed += 1
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._finish_running, job)

    # -- results (event loop) --------------------------------------------------
    def _finish_running(self, job: _Job) -> None:
        if job.state == "running":
            job.state = "finished"
            self._deliver(job)

    def _deliver(self, job: _Job) -> None:
        self._jobs.pop(job.request.request_id, None)
        if not job.future.done():
            job.future.set_result(job.generation())

    def _fail(self, job: _Job, exc: EngineError) -> None:
        if job.state == "finished":
            return
        job.state = "finished"
        self._jobs.pop(job.request.request_id, None)
        if not job.future.done():
            job.future.set_exception(exc)

    def _fail_all(self, why: str) -> None:
        for job in list(self._jobs.values()):
            if job.state == "queued":
                self._waiting -= 1
            self._fail(job, EngineError(why))
        self._heap.clear()

    # -- helpers ---------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._closed:
            raise EngineError("transformers engine is closed")
        if self._broken is not None:
            raise EngineError(self._broken)

    def _state(self) -> EngineState:
        if self._closed:
            return "closed"
        if self._broken is not None:
            return "failed"
        return "ready" if self._loaded else "starting"

    def _encode(self, request: InferenceRequest) -> list[int]:
        """The prompt's token ids; raises EngineError when it cannot be served."""
        tokenizer = self._tokenizer
        with self._tok_lock:
            if request.messages is not None and getattr(tokenizer, "chat_template", None):
                chat = [{"role": m.role, "content": m.content} for m in request.messages]
                text = tokenizer.apply_chat_template(chat, tokenize=False,
                                                     add_generation_prompt=True)
                # The template writes its own special tokens.
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ids = tokenizer(request.prompt_text())["input_ids"]
        if not ids:
            raise EngineError(f"request {request.request_id!r}: the prompt encodes to no tokens")
        limit = self._max_positions
        if limit is not None and len(ids) + request.max_tokens > limit:
            raise EngineError(
                f"request {request.request_id!r}: {len(ids)} prompt tokens plus max_tokens "
                f"{request.max_tokens} exceed the model's {limit}-token context")
        return [int(t) for t in ids]

    def _decode(self, token_ids: list[int]) -> str:
        with self._tok_lock:
            return str(self._tokenizer.decode(token_ids, skip_special_tokens=True))

    def _request_seed(self, request_id: str) -> int:
        digest = hashlib.blake2b(f"{self._seed}\x00{request_id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") >> 1  # torch seeds must fit a signed int64


class _RowTracker:
    """Stopping criterion: record each row's token and time, end rows on their own terms.

    Duck-typed as a ``transformers.StoppingCriteria`` (called with the ids
    so far, returns one done flag per row), so that this module imports
    without transformers.
    """

    def __init__(self, engine: TransformersEngine, batch: list[_Job]) -> None:
        self._engine = engine
        self._batch = batch

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        import torch

        engine = self._engine
        now = time.perf_counter()
        newest = input_ids[:, -1].tolist()  # one copy to the host per step (syncs CUDA)
        stopping = engine._stop.is_set()
        done: list[bool] = []
        for job, token in zip(self._batch, newest, strict=True):
            if job.reason is not None:
                done.append(True)
                continue
            if stopping:
                done.append(True)  # close(): fails these rows, no result
                continue
            job.token_ids.append(int(token))
            # Counted before the row can be answered: a caller reading stats()
            # after its result sees its tokens.
            engine._tokens_generated += 1
            if job.first_token_at is None:
                job.first_token_at = now
            job.last_token_at = now
            reason, text = self._ended(job)
            if reason is not None:
                engine._end_row(job, reason, text)
            done.append(reason is not None)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _ended(self, job: _Job) -> tuple[FinishReason | None, str | None]:
        if job.token_ids[-1] in self._engine._eos:
            return "stop", None
        stops = job.request.sampling.stop
        if stops:
            # Re-decoded every step: a stop string may span tokens.
            text = self._engine._decode(job.token_ids)
            hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
            if hits:
                return "stop", text[: min(hits)]
        if job.aborted:
            return "abort", None
        if len(job.token_ids) >= job.request.max_tokens:
            return "length", None
        return None, None


class _RowSampler:
    """Logits processor: draw the sampled rows' tokens, each from its own generator.

    ``generate`` runs greedy (argmax) for the whole batch; a sampled row's
    scores come back as 0 for the drawn token and -inf elsewhere, so the
    argmax picks the draw. Greedy rows pass through untouched.
    """

    def __init__(self, batch: list[_Job]) -> None:
        import torch

        self._rows: list[tuple[int, _Job, torch.Generator]] = []
        for i, job in enumerate(batch):
            if job.sample_seed is not None:
                gen = torch.Generator(device="cpu")
                gen.manual_seed(job.sample_seed)
                self._rows.append((i, job, gen))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        for i, job, gen in self._rows:
            if job.reason is not None:
                continue
            sampling = job.request.sampling
            # Drawn on the CPU with a CPU generator: the same seed gives the
            # same draws on any device.
            logits = scores[i].float().cpu() / sampling.temperature
            if sampling.top_k > 0 and sampling.top_k < logits.numel():
                kth = torch.topk(logits, sampling.top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            if sampling.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                # Keep the smallest head whose mass reaches top_p (at least one token).
                drop = sorted_probs.cumsum(0) - sorted_probs >= sampling.top_p
                sorted_probs = sorted_probs.masked_fill(drop, 0.0)
                probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
            token = int(torch.multinomial(probs, 1, generator=gen).item())
            scores[i] = float("-inf")
            scores[i, token] = 0.0
        return scores
