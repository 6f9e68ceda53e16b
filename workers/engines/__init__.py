"""Engines behind one async interface; see :class:`workers.engines.base.Engine`.

:func:`make_engine` is the one place an engine is built by name, for the
``worker`` and ``calibrate`` commands alike; the vLLM engine joins here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from schemas.cost import CostModel
from workers import EngineError
from workers.engines.base import Engine

if TYPE_CHECKING:
    from workers.engines.sim import SimFaults

ENGINE_NAMES: tuple[str, ...] = ("echo", "sim", "transformers", "vllm")


def make_engine(name: str, *, model: str, cost: CostModel, seed: int = 0, max_batch: int = 64,
                time_scale: float = 1.0, model_dir: Path | None = None,
                faults: SimFaults | None = None) -> Engine:
    """Build engine ``name`` to serve ``model``; ``cost`` drives the simulated engine's speed.

    ``seed``, ``max_batch`` and ``time_scale`` apply to the engines that have them;
    ``model_dir`` (a Hugging Face model directory) is what the transformers engine runs;
    ``faults`` are injected into the simulated engine (only).
    """
    if faults is not None and name != "sim":
        raise EngineError(f"faults can only be injected into the sim engine, not {name!r}")
    # Imported here: real engines pull in torch or vLLM, which only their hosts have.
    if name == "echo":
        from workers.engines.echo import EchoEngine

        return EchoEngine()
    if name == "sim":
        from workers.engines.sim import SimEngine

        return SimEngine(cost, seed=seed, max_batch=max_batch, time_scale=time_scale,
                         faults=faults)
    if name == "transformers":
        from workers.engines.hf import TransformersEngine

        if model_dir is None:
            raise EngineError("the transformers engine needs a model directory (--model-dir)")
        return TransformersEngine(model_dir, max_batch=max_batch, seed=seed)
    if name == "vllm":
        # The module imports without vLLM; vLLM itself loads when the engine starts.
        from workers.engines.vllm_engine import VllmEngine

        if model_dir is None:
            raise EngineError("the vllm engine needs a model directory (--model-dir)")
        return VllmEngine(model_dir, max_batch=max_batch, seed=seed)
    raise EngineError(f"unknown engine {name!r}; known: {', '.join(ENGINE_NAMES)}")
