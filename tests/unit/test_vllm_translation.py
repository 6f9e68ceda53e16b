"""The vLLM engine's translation logic, without vLLM: requests -> sampling arguments,
streamed delta outputs -> Generation, finish reasons, engine arguments, registration.

Small fakes stand in for vLLM's ``RequestOutput``/``CompletionOutput``; the
engine itself runs on a GPU host (bench/gpu_worker.py).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from schemas.cost import CostModel
from schemas.events import InferenceRequest, SamplingParams
from workers import EngineError
from workers.engines import ENGINE_NAMES, make_engine
from workers.engines.vllm_engine import (
    StreamAccumulator,
    VllmEngine,
    engine_args,
    finish_reason,
    request_seed,
    sampling_kwargs,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@dataclass
class FakeCompletion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class FakeOutput:
    outputs: list[FakeCompletion]
    prompt_token_ids: list[int] | None = None
    num_cached_tokens: int | None = None
    finished: bool = False


def req(**kw: object) -> InferenceRequest:
    base: dict[str, object] = {"request_id": "r1", "tenant": "t", "model": "m", "prompt": "hi"}
    base.update(kw)
    return InferenceRequest.model_validate(base)


def test_greedy_request_maps_to_plain_sampling() -> None:
    kw = sampling_kwargs(req(max_tokens=7, sampling=SamplingParams(temperature=0.0,
                                                                    stop=["\n\n"])))
    assert kw == {"n": 1, "max_tokens": 7, "temperature": 0.0, "stop": ["\n\n"],
                  "include_stop_str_in_output": False, "skip_special_tokens": True,
                  "ignore_eos": False}


def test_sampled_request_keeps_its_seed_and_filters() -> None:
    kw = sampling_kwargs(req(sampling=SamplingParams(temperature=0.7, top_p=0.9, top_k=40,
                                                     seed=123)))
    assert (kw["temperature"], kw["top_p"], kw["top_k"], kw["seed"]) == (0.7, 0.9, 40, 123)


def test_sampled_request_without_seed_gets_a_stable_one() -> None:
    sampled = SamplingParams(temperature=1.0)
    a = sampling_kwargs(req(sampling=sampled), engine_seed=5)
    b = sampling_kwargs(req(sampling=sampled), engine_seed=5)
    c = sampling_kwargs(req(sampling=sampled), engine_seed=6)
    assert a["seed"] == b["seed"] == request_seed(5, "r1") != c["seed"]
    assert 0 <= a["seed"] < 2**63
    assert a["top_k"] == -1  # disabled stays disabled


def test_eos_override_and_ignore_eos() -> None:
    kw = sampling_kwargs(req(), eos_token_ids=[2, 7], ignore_eos=True)
    assert kw["stop_token_ids"] == [2, 7] and kw["ignore_eos"] is True


@pytest.mark.parametrize(("reason", "aborted", "expected"), [
    ("stop", False, "stop"), ("length", False, "length"), ("abort", False, "abort"),
    (None, False, "abort"), ("stop", True, "abort"), ("something-new", False, "stop"),
])
def test_finish_reasons(reason: str | None, aborted: bool, expected: str) -> None:
    assert finish_reason(reason, aborted=aborted) == expected


def test_stream_of_deltas_folds_into_one_generation() -> None:
    acc = StreamAccumulator(started=10.0, input_tokens=3)
    assert acc.add(FakeOutput([FakeCompletion()], prompt_token_ids=[1, 5, 6, 7]), 10.1) == 0
    assert acc.add(FakeOutput([FakeCompletion("ab", [11, 12])], num_cached_tokens=2), 10.5) == 2
    assert acc.add(FakeOutput([FakeCompletion("c", [13], "length")], finished=True), 10.9) == 1
    assert acc.finished
    gen = acc.generation()
    assert gen.text == "abc" and gen.token_ids == [11, 12, 13]
    assert gen.finish_reason == "length"
    assert (gen.input_tokens, gen.cached_tokens) == (4, 2)  # vLLM's count wins
    assert gen.ttft_s == pytest.approx(0.5)
    assert gen.tpot_s == pytest.approx(0.4 / 2)


def test_unfinished_or_aborted_stream_reads_as_abort_with_tokens_so_far() -> None:
    acc = StreamAccumulator(started=0.0)
    acc.add(FakeOutput([FakeCompletion("x", [9])]), 0.2)
    gen = acc.generation(aborted=True)
    assert gen.finish_reason == "abort" and gen.token_ids == [9]
    assert gen.tpot_s == 0.0
    empty = StreamAccumulator(started=0.0).generation()
    assert empty.finish_reason == "abort" and empty.ttft_s == 0.0


def test_engine_args_pick_the_policy_and_limits(tmp_path: Path) -> None:
    args = engine_args(tmp_path, policy="priority", max_batch=64, seed=3, max_model_len=512,
                       gpu_memory_utilization=0.4, enforce_eager=True, dtype="bfloat16")
    assert args["scheduling_policy"] == "priority" and args["max_num_seqs"] == 64
    assert args["model"] == str(tmp_path) and args["max_model_len"] == 512
    assert "max_model_len" not in engine_args(
        tmp_path, policy="fcfs", max_batch=1, seed=0, max_model_len=None,
        gpu_memory_utilization=0.5, enforce_eager=False, dtype="auto")


def test_registered_and_built_lazily(tmp_path: Path) -> None:
    assert "vllm" in ENGINE_NAMES
    with pytest.raises(EngineError, match="model directory"):
        make_engine("vllm", model="m", cost=CostModel())
    with pytest.raises(EngineError, match=r"no config\.json"):
        make_engine("vllm", model="m", cost=CostModel(), model_dir=tmp_path)
    (tmp_path / "config.json").write_text("{}")
    engine = make_engine("vllm", model="m", cost=CostModel(), model_dir=tmp_path)
    assert isinstance(engine, VllmEngine)  # built without importing vLLM
    assert engine.stats().state == "starting"
    with pytest.raises(EngineError, match="scheduling policy"):
        VllmEngine(tmp_path, policy="lifo")  # type: ignore[arg-type]


@pytest.mark.skipif(HAS_VLLM, reason="checks the message given where vLLM is missing")
async def test_without_vllm_generate_fails_with_advice(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    engine = VllmEngine(tmp_path)
    with pytest.raises(EngineError, match="needs vllm installed"):
        await engine.generate(req())
    assert not await engine.health()
    assert engine.stats().state == "failed"
    await engine.close()
    assert engine.stats().state == "closed"
