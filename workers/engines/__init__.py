"""Engines behind one async interface; see :class:`workers.engines.base.Engine`.

:func:`make_engine` is the one place an engine is built by name, for the
``worker`` and ``calibrate`` commands alike; the transformers and vLLM
engines join here.
"""

from __future__ import annotations

from schemas.cost import CostModel
from workers import EngineError
from workers.engines.base import Engine

ENGINE_NAMES: tuple[str, ...] = ("echo", "sim")


def make_engine(name: str, *, model: str, cost: CostModel, seed: int = 0, max_batch: int = 64,
                time_scale: float = 1.0) -> Engine:
    """Build engine ``name`` to serve ``model``; ``cost`` drives the simulated engine's speed.

    ``seed``, ``max_batch`` and ``time_scale`` apply to the engines that have them.
    """
    # Imported here: real engines pull in torch or vLLM, which only their hosts have.
    if name == "echo":
        from workers.engines.echo import EchoEngine

        return EchoEngine()
    if name == "sim":
        from workers.engines.sim import SimEngine

        return SimEngine(cost, seed=seed, max_batch=max_batch, time_scale=time_scale)
    raise EngineError(f"unknown engine {name!r}; known: {', '.join(ENGINE_NAMES)}")
