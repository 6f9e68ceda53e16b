"""vLLM engine: vLLM's async engine (``AsyncLLM``) with priority scheduling.

vLLM is imported when the engine starts, never at module import: the
control plane, the tests and CPU hosts import this module without it. The
translation between tokenweir's types and vLLM's (request -> sampling
keyword arguments, streamed outputs -> :class:`Generation`, finish reasons)
lives in plain functions below, so that it is unit-tested everywhere
(``tests/unit/test_vllm_translation.py``) while the engine itself runs on a
GPU host.

- **Scheduling.** ``scheduling_policy="priority"`` by default: vLLM serves
  the lowest priority value first, ties by arrival, and preempts running
  work for more urgent requests, which is what :data:`PROBE_PRIORITY` relies
  on. ``"fcfs"`` is there for comparison (bench/gpu_worker.py).
- **Prompts.** Tokenised here with the model directory's own tokenizer (chat
  template for requests with messages, as the transformers engine does)
  and handed to vLLM as token ids, so both engines bill the same input.
- **Usage.** ``input_tokens`` from the output's prompt token ids,
  ``cached_tokens`` from ``num_cached_tokens`` (vLLM's prefix cache),
  output tokens are the streamed token ids.
- **Timing.** Outputs stream as deltas; ``ttft_s`` runs from the
  ``generate`` call to the first delta with tokens, ``tpot_s`` is the mean
  gap per later token.
- **Abort.** ``abort`` asks vLLM to drop the request; its stream then ends
  with finish reason "abort" and the tokens so far. A cancelled ``generate``
  aborts its request too.
- **Health.** ``AsyncLLM.check_health`` (raises once the engine core died)
  and its ``errored`` flag.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from schemas.events import InferenceRequest
from workers import EngineError
from workers.engines.base import EngineState, EngineStats, Generation, enter_engine

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "abort"]
SchedulingPolicy = Literal["priority", "fcfs"]


# -- translation (no vLLM needed) ------------------------------------------------------


def request_seed(engine_seed: int, request_id: str) -> int:
    """A sampled request's seed when it names none: stable per engine seed and request."""
    digest = hashlib.blake2b(f"{engine_seed}\x00{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def sampling_kwargs(request: InferenceRequest, *, engine_seed: int = 0,
                    eos_token_ids: Sequence[int] = (),
                    ignore_eos: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``vllm.SamplingParams`` serving ``request``.

    Greedy (temperature 0) drops top-p/top-k/seed, which vLLM ignores then
    anyway; a sampled request without a seed gets one derived from the
    engine seed and request id, so a retry draws the same tokens.
    ``eos_token_ids`` are extra stop tokens (the transformers engine's
    ``eos_token_ids`` option); ``ignore_eos`` is for benchmarks that need
    fixed output lengths.
    """
    sampling = request.sampling
    kwargs: dict[str, Any] = {
        "n": 1,
        "max_tokens": request.max_tokens,
        "temperature": sampling.temperature,
        # Stop strings are cut from the text, as the transformers engine does.
        "stop": list(sampling.stop),
        "include_stop_str_in_output": False,
        # Special tokens never reach the text, as in the transformers engine.
        "skip_special_tokens": True,
        "ignore_eos": ignore_eos,
    }
    if eos_token_ids:
        kwargs["stop_token_ids"] = [int(t) for t in eos_token_ids]
    if sampling.temperature > 0:
        kwargs["top_p"] = sampling.top_p
        # vLLM disables top-k with 0 or -1 alike (older releases only -1).
        kwargs["top_k"] = sampling.top_k if sampling.top_k > 0 else -1
        seed = sampling.seed if sampling.seed is not None else request_seed(
            engine_seed, request.request_id)
        # vLLM seeds are taken modulo 2**63 - 1 internally; keep it in range.
        kwargs["seed"] = seed
    return kwargs


def finish_reason(reason: str | None, *, aborted: bool = False) -> FinishReason:
    """vLLM's finish reason ("stop", "length", "abort", None while running) as ours.

    A stream that ended without a reason (the engine stopped it) or that we
    aborted counts as "abort"; anything else vLLM may add reads as "stop".
    """
    if aborted or reason is None or reason == "abort":
        return "abort"
    if reason == "length":
        return "length"
    return "stop"


@dataclass
class StreamAccumulator:
    """Folds a request's stream of delta ``RequestOutput``s into one :class:`Generation`.

    Duck-typed over vLLM's output objects (``prompt_token_ids``,
    ``num_cached_tokens``, ``outputs[0].text/token_ids/finish_reason``,
    ``finished``), so tests feed it small fakes.
    """

    started: float  # perf_counter s at the generate call
    input_tokens: int = 0
    cached_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    reason: str | None = None
    finished: bool = False
    first_token_at: float | None = None
    last_token_at: float | None = None

    def add(self, output: Any, now: float) -> int:
        """Take one delta output seen at ``now``; returns how many new tokens it carried."""
        prompt_ids = getattr(output, "prompt_token_ids", None)
        if prompt_ids:
            self.input_tokens = len(prompt_ids)
        cached = getattr(output, "num_cached_tokens", None)
        if cached:
            self.cached_tokens = int(cached)
        new = 0
        completions = getattr(output, "outputs", None) or []
        if completions:
            completion = completions[0]
            ids = [int(t) for t in (completion.token_ids or [])]
            new = len(ids)
            if ids:
                if self.first_token_at is None:
                    self.first_token_at = now
                self.last_token_at = now
                self.token_ids.extend(ids)
            if completion.text:
                self.text_parts.append(completion.text)
            if completion.finish_reason is not None:
                self.reason = str(completion.finish_reason)
        if getattr(output, "finished", False):
            self.finished = True
        return new

    def generation(self, *, aborted: bool = False) -> Generation:
        n = len(self.token_ids)
        ttft = 0.0 if self.first_token_at is None else self.first_token_at - self.started
        tpot = 0.0
        if n >= 2 and self.first_token_at is not None and self.last_token_at is not None:
            # Several tokens may arrive in one delta: spread the gap over all of them.
            tpot = (self.last_token_at - self.first_token_at) / (n - 1)
        return Generation(text="".join(self.text_parts), token_ids=list(self.token_ids),
                          finish_reason=finish_reason(self.reason, aborted=aborted),
                          input_tokens=self.input_tokens, cached_tokens=self.cached_tokens,
                          ttft_s=max(0.0, ttft), tpot_s=max(0.0, tpot))


def engine_args(model_dir: Path, *, policy: SchedulingPolicy, max_batch: int, seed: int,
                max_model_len: int | None, gpu_memory_utilization: float, enforce_eager: bool,
                dtype: str) -> dict[str, Any]:
    """Keyword arguments for ``vllm.engine.arg_utils.AsyncEngineArgs``."""
    args: dict[str, Any] = {
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "scheduling_policy": policy,
        "max_num_seqs": max_batch,
        "seed": seed,
        "gpu_memory_utilization": gpu_memory_utilization,
        "enforce_eager": enforce_eager,
        "dtype": dtype,
        # Requests are logged by the worker; vLLM's per-request and stats logs are noise.
        "disable_log_stats": True,
    }
    if max_model_len is not None:
        args["max_model_len"] = max_model_len
    return args


# -- the engine ---------------------------------------------------------------------------


class VllmEngine:
    """The :class:`workers.engines.base.Engine` over vLLM's ``AsyncLLM`` (see module doc)."""

    name = "vllm"
    supports_images = False  # text prompts only here; multimodal inputs are not passed on
    time_scale = 1.0

    def __init__(self, model_dir: Path, *, max_batch: int = 256, seed: int = 0,
                 policy: SchedulingPolicy = "priority", max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.5, enforce_eager: bool = False,
                 dtype: str = "auto", eos_token_ids: Sequence[int] | None = None,
                 ignore_eos: bool = False) -> None:
        if max_batch < 1:
            raise EngineError(f"max_batch must be at least 1, not {max_batch}")
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise EngineError(f"{model_dir} is not a model directory (no config.json); build "
                              "one with `tokenweir model make-tiny DIR`")
        if policy not in ("priority", "fcfs"):
            raise EngineError(f"scheduling policy must be 'priority' or 'fcfs', not {policy!r}")
        self.model_dir = model_dir
        self.max_batch = max_batch
        self.policy: SchedulingPolicy = policy
        self._seed = seed
        self._args = engine_args(model_dir, policy=policy, max_batch=max_batch, seed=seed,
                                 max_model_len=max_model_len,
                                 gpu_memory_utilization=gpu_memory_utilization,
                                 enforce_eager=enforce_eager, dtype=dtype)
        self._eos = list(eos_token_ids or [])
        self._ignore_eos = ignore_eos
        self._llm: Any = None
        self._tokenizer: Any = None
        self._max_len: int | None = None
        self._sampling_cls: Any = None
        self._delta_kind: Any = None
        self._load_lock = asyncio.Lock()
        self._tok_lock = threading.Lock()
        self._broken: str | None = None
        self._closed = False
        self._held: dict[str, bool] = {}  # request id -> has produced a token (running)
        self._aborted: set[str] = set()
        self._tokens_generated = 0
        self._requests_completed = 0

    # -- Engine ----------------------------------------------------------------
    async def generate(self, request: InferenceRequest, *, priority: int = 0) -> Generation:
        rid = request.request_id
        await enter_engine(rid, self._held, self._check_usable, self._ensure_started)
        prompt_ids = self._encode(request)
        params = self._sampling_cls(**sampling_kwargs(
            request, engine_seed=self._seed, eos_token_ids=self._eos,
            ignore_eos=self._ignore_eos), output_kind=self._delta_kind)
        acc = StreamAccumulator(started=time.perf_counter(), input_tokens=len(prompt_ids))
        self._held[rid] = False
        # Under "fcfs" vLLM rejects non-zero priorities.
        prio = priority if self.policy == "priority" else 0
        try:
            stream = self._llm.generate({"prompt_token_ids": prompt_ids}, params, rid,
                                        priority=prio)
            async for output in stream:
                new = acc.add(output, time.perf_counter())
                if new:
                    self._held[rid] = True
                    self._tokens_generated += new
                if acc.finished:
                    break
        except asyncio.CancelledError:
            # The caller gave up: free the request's place in vLLM's batch.
            await self._abort_quietly(rid)
            raise
        except Exception as exc:
            if self._closed:
                raise EngineError("vllm engine closed") from exc
            if getattr(self._llm, "errored", False):
                self._broken = f"vllm engine died: {exc!r}"
            raise EngineError(f"vllm failed request {rid!r}: {exc!r}") from exc
        finally:
            self._held.pop(rid, None)
            aborted = rid in self._aborted
            self._aborted.discard(rid)
        if self._closed and not acc.finished:
            raise EngineError("vllm engine closed")
        result = acc.generation(aborted=aborted or not acc.finished)
        if result.finish_reason != "abort":
            self._requests_completed += 1
        return result

    async def abort(self, request_id: str) -> bool:
        if request_id not in self._held or self._llm is None:
            return False
        self._aborted.add(request_id)
        await self._llm.abort(request_id)
        return True

    async def health(self) -> bool:
        if self._closed or self._broken is not None:
            return False
        try:
            await self._ensure_started()
            if self._llm.errored:
                return False
            await self._llm.check_health()
        except Exception:  # check_health raises once the engine core is gone
            return False
        return True

    def stats(self) -> EngineStats:
        # vLLM's scheduler counts live in the engine core process; this side
        # knows which held requests have produced tokens (running) and which not.
        running = sum(1 for started in self._held.values() if started)
        return EngineStats(state=self._state(), running=running,
                           waiting=len(self._held) - running,
                           tokens_generated=self._tokens_generated,
                           requests_completed=self._requests_completed)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        llm, self._llm = self._llm, None
        if llm is not None:
            for rid in list(self._held):
                await self._abort_quietly(rid, llm)
            # Explicitly: a vLLM process left to exit on its own can hang.
            llm.shutdown()

    # -- internals ---------------------------------------------------------------
    def _state(self) -> EngineState:
        if self._closed:
            return "closed"
        if self._broken is not None:
            return "failed"
        return "ready" if self._llm is not None else "starting"

    def _check_usable(self) -> None:
        if self._closed:
            raise EngineError("vllm engine closed")
        if self._broken is not None:
            raise EngineError(self._broken)

    async def _abort_quietly(self, rid: str, llm: Any = None) -> None:
        llm = llm or self._llm
        if llm is None:
            return
        try:
            await llm.abort(rid)
        except Exception as exc:  # the engine may be gone already
            log.debug("vllm abort of %s failed: %r", rid, exc)

    async def _ensure_started(self) -> None:
        if self._llm is not None:
            return
        async with self._load_lock:
            if self._llm is not None:
                return
            if self._broken is not None:
                raise EngineError(self._broken)
            try:
                self._start()
            except Exception as exc:
                self._broken = f"starting vllm on {self.model_dir} failed: {exc!r}"
                raise EngineError(self._broken) from exc

    def _start(self) -> None:
        try:
            from transformers import AutoTokenizer
            from vllm import SamplingParams
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.sampling_params import RequestOutputKind
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise EngineError(f"the vllm engine needs vllm installed: {exc}") from exc
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**self._args))
        self._tokenizer = tokenizer
        self._sampling_cls = SamplingParams
        self._delta_kind = RequestOutputKind.DELTA
        max_len = self._args.get("max_model_len")
        if max_len is None:
            max_len = getattr(getattr(llm, "model_config", None), "max_model_len", None)
        self._max_len = int(max_len) if max_len is not None else None
        self._llm = llm

    def _encode(self, request: InferenceRequest) -> list[int]:
        tokenizer = self._tokenizer
        with self._tok_lock:
            if request.messages is not None and getattr(tokenizer, "chat_template", None):
                chat: list[Mapping[str, str]] = [
                    {"role": m.role, "content": m.content} for m in request.messages]
                text = tokenizer.apply_chat_template(chat, tokenize=False,
                                                     add_generation_prompt=True)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ids = tokenizer(request.prompt_text())["input_ids"]
        if not ids:
            raise EngineError(f"request {request.request_id!r}: the prompt encodes to no tokens")
        if self._max_len is not None and len(ids) + request.max_tokens > self._max_len:
            raise EngineError(
                f"request {request.request_id!r}: {len(ids)} prompt tokens plus max_tokens "
                f"{request.max_tokens} exceed the engine's {self._max_len}-token context")
        return [int(t) for t in ids]
