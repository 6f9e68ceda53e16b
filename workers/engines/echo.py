"""Echo engine: answers with the prompt's own words.

Used by the backbone's main job and tests to carry requests end to end
before the real engines (sim, transformers, vLLM) exist; token ids are the
word positions, so results are deterministic and checkable.
"""

from __future__ import annotations

import time

from schemas.events import InferenceRequest
from workers.engines.base import Generation


class EchoEngine:
    name = "echo"

    async def generate(self, request: InferenceRequest) -> Generation:
        started = time.perf_counter()
        words = request.prompt_text().split()
        out = words[: request.max_tokens]
        return Generation(
            text=" ".join(out),
            token_ids=list(range(len(out))),
            finish_reason="length" if len(words) > request.max_tokens else "stop",
            input_tokens=len(words),
            ttft_s=time.perf_counter() - started,
            tpot_s=0.0,
        )

    async def health(self) -> bool:
        return True
