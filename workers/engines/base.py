"""The one async interface every engine implements (echo, sim, transformers; vLLM next).

Priorities follow vLLM's priority scheduling: an integer, lower is more
urgent, ties served in arrival order. Health probes use
:data:`PROBE_PRIORITY`, which outranks every request priority, so that a
probe never waits behind request work (DESIGN.md, "Health").
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Container
from typing import Annotated, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from schemas.events import InferenceRequest, Priority
from workers import EngineError


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


EngineState = Literal["starting", "ready", "failed", "closed"]

# Request priority classes mapped onto engine priorities (lower is more urgent).
REQUEST_PRIORITY: dict[Priority, int] = {"high": -1, "normal": 0, "low": 1}
PROBE_PRIORITY = -2


class EngineStats(BaseModel):
    """A snapshot of an engine's scheduler, cheap enough to read on every heartbeat."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state: EngineState
    running: Annotated[int, Field(ge=0)]  # requests in the running batch
    waiting: Annotated[int, Field(ge=0)]  # requests queued inside the engine
    # Monotonic since start: a silent hang shows as requests in flight and this not moving.
    tokens_generated: Annotated[int, Field(ge=0)]  # output tokens
    requests_completed: Annotated[int, Field(ge=0)]  # requests finished by stop or length


class Engine(Protocol):
    name: str
    supports_images: bool  # whether request.images changes the work done
    # Wall seconds per engine second: 1.0 for real engines; a simulated engine
    # may run faster so that load tests and calibration take seconds.
    time_scale: float

    async def generate(self, request: InferenceRequest, *, priority: int = 0) -> Generation:
        """Run one request to completion. Raises :class:`workers.EngineError` on failure;
        an aborted request returns with ``finish_reason="abort"`` and the tokens so far."""
        ...

    async def abort(self, request_id: str) -> bool:
        """Stop a request that is queued or running; False when the engine does not hold it."""
        ...

    async def health(self) -> bool:
        """The engine's own view of itself (a hung engine may well answer True)."""
        ...

    def stats(self) -> EngineStats: ...

    async def close(self) -> None:
        """Release the engine; requests still held fail with :class:`workers.EngineError`."""
        ...


async def enter_engine(request_id: str, held: Container[str], check_usable: Callable[[], None],
                       start: Callable[[], Awaitable[None]]) -> None:
    """The common door of ``generate``: refuse a closed or failed engine and a request id it
    already holds, start the engine if need be, then look again, since it may have closed,
    or the same id arrived, while it started."""
    for starting in (True, False):
        check_usable()
        if request_id in held:
            raise EngineError(f"request {request_id!r} is already held by the engine")
        if starting:
            await start()
