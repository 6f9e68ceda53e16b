import asyncio
import time
from typing import Any

import pytest

from schemas.cost import CostModel
from schemas.events import SamplingParams
from tests.builders import make_request
from workers import EngineError
from workers.engines import make_engine
from workers.engines.base import PROBE_PRIORITY, Engine
from workers.engines.echo import EchoEngine
from workers.engines.sim import SimEngine, SimFaults, SimJob, SimScheduler

# R = C/60 = 10 MU per simulated second.
COST = CostModel(alpha=0.001, beta=0.01, gamma=0.5, delta=0.0, capacity_mu_per_min=600.0)
R = COST.capacity_mu_per_min / 60.0


def make_scheduler(**overrides: Any) -> SimScheduler:
    kwargs: dict[str, Any] = {"max_batch": 4}
    kwargs.update(overrides)
    return SimScheduler(kwargs.pop("cost", COST), **kwargs)


def submit(core: SimScheduler, rid: str, *, input_tokens: int = 0, output_tokens: int = 10,
           images: int = 0, priority: int = 0) -> SimJob:
    return core.submit(rid, priority=priority, input_tokens=input_tokens, images=images,
                       output_tokens=output_tokens, at=core.now)


def run_until(core: SimScheduler, done: int) -> list[SimJob]:
    """Run whole plans until ``done`` requests finished; the finished, in order."""
    finished: list[SimJob] = []
    while len(finished) < done:
        plan = core.plan()
        assert plan is not None, "scheduler stalled"
        finished += core.advance(plan, plan.steps)
    return finished


def make_sim(**overrides: Any) -> SimEngine:
    kwargs: dict[str, Any] = {"seed": 7, "max_batch": 4, "time_scale": 0.01}
    kwargs.update(overrides)
    return SimEngine(kwargs.pop("cost", COST), **kwargs)


def words(n: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def sim_request(prompt: str = "hello there world", **overrides: Any):  # type: ignore[no-untyped-def]
    return make_request(prompt=prompt, sampling=SamplingParams(temperature=0.0), **overrides)


# -- the pure scheduler ---------------------------------------------------------------
def test_sim_scheduler_lone_request_timing_follows_cost_model():
    core = make_scheduler(max_batch=4, knee=4)
    job = submit(core, "r", input_tokens=100, output_tokens=5)
    run_until(core, 1)
    alone = R * 1 * (4 + 4) / (4 * (1 + 4))  # thr(1), MU/s
    assert job.ttft_s == pytest.approx((100 * COST.alpha + COST.beta) / alone)
    assert job.tpot_s == pytest.approx(COST.beta / alone)
    assert job.finished_at == pytest.approx(COST.model_units(100, 5) / alone)


@pytest.mark.parametrize(
    ("input_tokens", "output_tokens", "images"),
    [
        pytest.param(2000, 4, 0, id="prefill-heavy-chunked"),
        pytest.param(16, 300, 0, id="decode-heavy"),
        pytest.param(64, 8, 2, id="with-images"),
    ],
)
def test_sim_scheduler_saturated_batch_retires_capacity_whatever_the_mix(
        input_tokens, output_tokens, images):
    core = make_scheduler(max_batch=4, prefill_chunk=512)
    for i in range(12):
        submit(core, f"r{i}", input_tokens=input_tokens, output_tokens=output_tokens,
               images=images)
    finished = run_until(core, 8)  # two full waves, the batch full all along
    mu = sum(COST.model_units(j.input_tokens, j.output_tokens, j.images) for j in finished)
    assert mu / core.now == pytest.approx(R)
    assert 8 / core.now * 60 == pytest.approx(
        COST.capacity_mu_per_min / COST.model_units(input_tokens, output_tokens, images))


def test_sim_scheduler_request_slows_as_batch_grows():
    tpots = []
    for n in (1, 2, 4, 8):
        core = make_scheduler(max_batch=8)
        jobs = [submit(core, f"r{i}", output_tokens=50) for i in range(n)]
        run_until(core, n)
        tpots.append(jobs[0].tpot_s)
        assert jobs[0].tpot_s == pytest.approx(n * COST.beta / core.throughput(n))
    assert tpots == sorted(tpots) and tpots[0] < tpots[-1]
    # ... while the engine's throughput grows with the batch.
    assert [n * COST.beta / t for n, t in zip((1, 2, 4, 8), tpots, strict=True)] == sorted(
        n * COST.beta / t for n, t in zip((1, 2, 4, 8), tpots, strict=True))


def test_sim_scheduler_urgent_request_preempts_least_urgent_running_one():
    core = make_scheduler(max_batch=1)
    batch = submit(core, "batch", output_tokens=100, priority=1)
    plan = core.plan()
    assert plan is not None
    core.advance(plan, 1)
    plan = core.plan()
    assert plan is not None
    core.advance(plan, 10)
    progress = batch.produced
    probe = submit(core, "probe", output_tokens=1, priority=PROBE_PRIORITY)
    finished = run_until(core, 2)
    assert [j.request_id for j in finished] == ["probe", "batch"]
    assert progress == 11 and batch.produced == 100  # resumed, not restarted
    assert probe.ttft_s < batch.ttft_s + batch.tpot_s * 100


def test_sim_scheduler_abort_of_queued_request_frees_nothing_else():
    core = make_scheduler(max_batch=1)
    submit(core, "a", output_tokens=3)
    submit(core, "b", output_tokens=3)
    assert core.abort("b") is not None and core.abort("b") is None
    assert [j.request_id for j in run_until(core, 1)] == ["a"]
    assert core.plan() is None and core.waiting == 0


# -- the engine: outputs ----------------------------------------------------------------
async def test_sim_engine_greedy_output_is_deterministic_for_the_same_prompt():
    one, two = make_sim(), make_sim()
    try:
        a = await one.generate(sim_request(words(20), max_tokens=12, request_id="a"))
        b = await two.generate(sim_request(words(20), max_tokens=12, request_id="b"))
        short = await two.generate(sim_request(words(20), max_tokens=5, request_id="c"))
        other = await two.generate(sim_request(words(21), max_tokens=12, request_id="d"))
    finally:
        await one.close()
        await two.close()
    assert a.token_ids == b.token_ids and a.text == b.text
    assert len(a.token_ids) == 12 and a.finish_reason == "length" and a.input_tokens == 20
    assert short.token_ids == a.token_ids[:5]
    assert other.token_ids != a.token_ids


@pytest.mark.parametrize(
    ("seed_a", "seed_b", "same"),
    [
        pytest.param(5, 5, True, id="same-sampling-seed"),
        pytest.param(None, None, False, id="unseeded-differs-by-request"),
    ],
)
async def test_sim_engine_sampled_output_follows_the_sampling_seed(seed_a, seed_b, same):
    engine = make_sim()
    try:
        outs = [await engine.generate(make_request(
            prompt=words(8), max_tokens=16, request_id=rid,
            sampling=SamplingParams(temperature=1.0, seed=seed)))
            for rid, seed in (("a", seed_a), ("b", seed_b))]
    finally:
        await engine.close()
    assert (outs[0].token_ids == outs[1].token_ids) is same


async def test_sim_engine_engine_seed_changes_output():
    one, two = make_sim(seed=1), make_sim(seed=2)
    try:
        a = await one.generate(sim_request(words(8), max_tokens=16))
        b = await two.generate(sim_request(words(8), max_tokens=16))
    finally:
        await one.close()
        await two.close()
    assert a.token_ids != b.token_ids


async def test_sim_engine_eos_probability_stops_early_and_deterministically():
    engine = make_sim(eos_probability=0.1)
    try:
        runs = [await engine.generate(sim_request(words(8), max_tokens=500, request_id=f"r{i}"))
                for i in range(2)]
    finally:
        await engine.close()
    assert runs[0].finish_reason == "stop" and 0 < len(runs[0].token_ids) < 500
    assert runs[0].token_ids == runs[1].token_ids


# -- the engine: scheduling ----------------------------------------------------------
async def test_sim_engine_priority_request_overtakes_queue():
    engine = make_sim(max_batch=1, time_scale=0.01)
    order: list[str] = []

    async def run(rid: str, priority: int, max_tokens: int) -> None:
        await engine.generate(sim_request(words(4), max_tokens=max_tokens, request_id=rid),
                              priority=priority)
        order.append(rid)

    try:
        first = asyncio.create_task(run("first", 0, 200))
        await asyncio.sleep(0.001)  # "first" holds the only slot
        queued = [asyncio.create_task(run(f"low{i}", 1, 5)) for i in range(3)]
        await asyncio.sleep(0)
        urgent = asyncio.create_task(run("urgent", 0, 5))
        await asyncio.gather(first, urgent, *queued)
    finally:
        await engine.close()
    assert order == ["first", "urgent", "low0", "low1", "low2"]


async def test_sim_engine_abort_returns_partial_generation():
    engine = make_sim(time_scale=1.0)
    try:
        task = asyncio.create_task(engine.generate(
            sim_request(words(4), max_tokens=10_000, request_id="long")))
        await asyncio.sleep(0.05)
        assert await engine.abort("long") is True
        gen = await asyncio.wait_for(task, 1.0)
        assert await engine.abort("long") is False
        assert await engine.abort("never-seen") is False
    finally:
        await engine.close()
    assert gen.finish_reason == "abort"
    assert 0 < len(gen.token_ids) < 10_000


async def test_sim_engine_cancelled_caller_frees_its_slot():
    engine = make_sim(max_batch=1, time_scale=1.0)
    try:
        hog = asyncio.create_task(engine.generate(sim_request(words(4), max_tokens=10_000)))
        await asyncio.sleep(0.02)
        hog.cancel()
        quick = await asyncio.wait_for(engine.generate(sim_request(words(4), max_tokens=2)), 1.0)
        assert quick.finish_reason == "length"
        assert engine.stats().running == 0 and engine.stats().waiting == 0
    finally:
        await engine.close()


async def test_sim_engine_wall_time_follows_time_scale():
    engine = make_sim(max_batch=1, time_scale=0.2)
    request = sim_request(words(100), max_tokens=41)
    try:
        started = time.perf_counter()
        gen = await engine.generate(request)
        wall_s = time.perf_counter() - started
    finally:
        await engine.close()
    sim_s = gen.ttft_s + gen.tpot_s * 40
    assert sim_s == pytest.approx(COST.model_units(100, 41) / R)  # alone in a batch of 1
    assert wall_s == pytest.approx(sim_s * 0.2, abs=0.03)


async def test_sim_engine_arrival_mid_step_waits_for_the_step_boundary():
    engine = make_sim(time_scale=0.5, prefill_chunk=4096)
    step_s = COST.model_units(2000, 1) / make_scheduler().throughput(1)  # one prefill, alone
    try:
        started = time.perf_counter()
        long = asyncio.create_task(engine.generate(sim_request(words(2000), max_tokens=1)))
        await asyncio.sleep(step_s * 0.5 * 0.6)  # 60% into the step
        short = await engine.generate(sim_request(words(4), max_tokens=1, request_id="short"))
        long_gen = await long
        long_wall_s = time.perf_counter() - started
    finally:
        await engine.close()
    assert long_gen.ttft_s == pytest.approx(step_s)  # the step was not stretched ...
    assert long_wall_s == pytest.approx(step_s * 0.5, abs=0.03)
    assert short.ttft_s > 0.3 * step_s  # ... and the newcomer waited for its end


async def test_sim_engine_stats_count_tokens_and_requests():
    engine = make_sim()
    try:
        await asyncio.gather(*(engine.generate(sim_request(words(4), max_tokens=6,
                                                           request_id=f"r{i}"))
                               for i in range(5)))
        stats = engine.stats()
    finally:
        await engine.close()
    assert (stats.state, stats.running, stats.waiting) == ("ready", 0, 0)
    assert (stats.tokens_generated, stats.requests_completed) == (30, 5)
    assert engine.stats().state == "closed"


async def test_sim_engine_duplicate_request_id_is_refused():
    engine = make_sim(time_scale=1.0)
    try:
        task = asyncio.create_task(engine.generate(sim_request(max_tokens=1000, request_id="x")))
        await asyncio.sleep(0.01)
        with pytest.raises(EngineError, match="already held"):
            await engine.generate(sim_request(request_id="x"))
        task.cancel()
    finally:
        await engine.close()


async def test_sim_engine_close_fails_held_requests():
    engine = make_sim(time_scale=1.0)
    task = asyncio.create_task(engine.generate(sim_request(max_tokens=10_000)))
    await asyncio.sleep(0.01)
    await engine.close()
    with pytest.raises(EngineError, match="closed"):
        await task
    assert await engine.health() is False


# -- the engine: faults -------------------------------------------------------------
async def test_sim_engine_hang_after_n_requests_is_silent_until_cleared():
    engine = make_sim(faults=SimFaults(hang_after_requests=2))
    try:
        for i in range(2):
            await engine.generate(sim_request(max_tokens=3, request_id=f"ok{i}"))
        stuck = asyncio.create_task(engine.generate(sim_request(max_tokens=3, request_id="h")))
        tokens = engine.stats().tokens_generated
        await asyncio.sleep(0.2)  # 20 simulated seconds: ages for 3 tokens
        assert not stuck.done()
        assert await engine.health() is True  # the hang is silent ...
        stats = engine.stats()  # ... but progress stalls with work held
        assert stats.tokens_generated == tokens and stats.running + stats.waiting == 1
        engine.inject(SimFaults())
        gen = await asyncio.wait_for(stuck, 1.0)
    finally:
        await engine.close()
    assert gen.finish_reason == "length"


async def test_sim_engine_crash_fails_held_and_later_requests():
    engine = make_sim(max_batch=1, faults=SimFaults(crash_after_requests=1))
    try:
        first = asyncio.create_task(engine.generate(sim_request(max_tokens=2, request_id="a")))
        held = asyncio.create_task(engine.generate(sim_request(max_tokens=2, request_id="b")))
        assert (await first).finish_reason == "length"
        with pytest.raises(EngineError, match="crashed"):
            await held
        with pytest.raises(EngineError, match="crashed"):
            await engine.generate(sim_request(request_id="c"))
        assert await engine.health() is False and engine.stats().state == "failed"
        engine.inject(SimFaults())  # a dead process stays dead
        assert await engine.health() is False
    finally:
        await engine.close()


@pytest.mark.parametrize("factor", [pytest.param(2.0, id="2x"), pytest.param(5.0, id="5x")])
async def test_sim_engine_slowdown_stretches_every_step(factor):
    request = sim_request(words(50), max_tokens=20)
    plain, slow = make_sim(), make_sim(faults=SimFaults(slowdown=factor))
    try:
        base = await plain.generate(request)
        slowed = await slow.generate(request)
    finally:
        await plain.close()
        await slow.close()
    assert slowed.tpot_s == pytest.approx(base.tpot_s * factor)
    assert slowed.ttft_s == pytest.approx(base.ttft_s * factor, rel=0.05)
    assert slowed.token_ids == base.token_ids


async def test_sim_engine_slowdown_starts_after_n_requests():
    engine = make_sim(faults=SimFaults(slowdown=3.0, slowdown_after_requests=1))
    try:
        before = await engine.generate(sim_request(words(4), max_tokens=10, request_id="a"))
        after = await engine.generate(sim_request(words(4), max_tokens=10, request_id="b"))
    finally:
        await engine.close()
    assert after.tpot_s == pytest.approx(before.tpot_s * 3.0)


# -- configuration and the other engines ---------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        pytest.param({"max_batch": 0}, "max_batch", id="no-batch"),
        pytest.param({"time_scale": 0.0}, "time_scale", id="zero-time-scale"),
        pytest.param({"eos_probability": 1.0}, "eos_probability", id="certain-eos"),
        pytest.param({"knee": -1.0}, "knee", id="negative-knee"),
        pytest.param({"prefill_chunk": 0}, "prefill_chunk", id="no-prefill-chunk"),
    ],
)
def test_sim_engine_rejects_bad_configuration(overrides, fragment):
    with pytest.raises(EngineError, match=fragment):
        make_sim(**overrides)


@pytest.mark.parametrize("name", ["echo", "sim"])
async def test_make_engine_builds_every_named_engine(name):
    engine: Engine = make_engine(name, model="tiny-llama", cost=COST, time_scale=0.01)
    try:
        gen = await engine.generate(sim_request("a b c", max_tokens=2), priority=PROBE_PRIORITY)
        assert engine.name == name and len(gen.token_ids) == 2 and await engine.health()
        assert engine.stats().requests_completed == 1
    finally:
        await engine.close()
    assert await engine.health() is False


def test_make_engine_rejects_unknown_engine():
    with pytest.raises(EngineError, match="unknown engine 'vllm-typo'"):
        make_engine("vllm-typo", model="tiny-llama", cost=COST)


async def test_echo_engine_has_nothing_to_abort_and_refuses_after_close():
    engine = EchoEngine()
    assert await engine.abort("anything") is False
    await engine.close()
    with pytest.raises(EngineError, match="closed"):
        await engine.generate(sim_request())
