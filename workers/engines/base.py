from __future__ import annotations

from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict

from schemas.events import InferenceRequest


class Generation(BaseModel):
    """What an engine returns for one request."""

    model_config = ConfigDict(frozen=True)

    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length", "abort"]
    input_tokens: int
    cached_tokens: int = 0
    ttft_s: float  # engine start -> first token
    tpot_s: float  # mean time per output token after the first


class Engine(Protocol):
    name: str

    async def generate(self, request: InferenceRequest) -> Generation: ...

    async def health(self) -> bool: ...
