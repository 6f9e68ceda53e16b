"""Echo engine: answers with the prompt's own words.

Used by the backbone's main job and tests to carry requests end to end
without a latency model; token ids are the word positions, so results are
deterministic and checkable. Requests finish as soon as they start, so there
is never anything queued or running to abort.
"""

from __future__ import annotations

import time

from schemas.events import InferenceRequest
from workers import EngineError
from workers.engines.base import EngineStats, Generation


class EchoEngine:
    name = "echo"
    supports_images = False
    time_scale = 1.0

    def __init__(self) -> None:
        self._closed = False
        self._tokens = 0
        self._completed = 0

    async def generate(self, request: InferenceRequest, *, priority: int = 0) -> Generation:
        if self._closed:
            raise EngineError("echo engine is closed")
        started = time.perf_counter()
        words = request.prompt_text().split()
        out = words[: request.max_tokens]
        self._tokens += len(out)
        self._completed += 1
        return Generation(
            text=" ".join(out),
            token_ids=list(range(len(out))),
            finish_reason="length" if len(words) > request.max_tokens else "stop",
            input_tokens=len(words),
            ttft_s=time.perf_counter() - started,
            tpot_s=0.0,
        )

    async def abort(self, request_id: str) -> bool:
        return False

    async def health(self) -> bool:
        return not self._closed

    def stats(self) -> EngineStats:
        return EngineStats(state="closed" if self._closed else "ready", running=0, waiting=0,
                           tokens_generated=self._tokens, requests_completed=self._completed)

    async def close(self) -> None:
        self._closed = True
