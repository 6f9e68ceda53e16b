"""The shard replay harness driving the real ShardRouter and the baselines."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from agents.router import ShardRouter
from bench.shardsim import (
    FleetConfig,
    Job,
    LeastRequestsPolicy,
    RoundRobinPolicy,
    TokenweirPolicy,
    capacity_for,
    replay,
)


# -- builders -----------------------------------------------------------------
def session_jobs(*, sessions: int, per_session: int, span_s: float = 120.0,
                 mu: tuple[float, float] = (1.0, 10.0), seed: int = 1,
                 prefix: str = "s") -> list[Job]:
    """``per_session`` requests for each session at uniform times, MU uniform in ``mu``."""
    rng = random.Random(seed)
    jobs = [Job(at=rng.uniform(0, span_s), mu=rng.uniform(*mu), session=f"{prefix}{k}")
            for k in range(sessions) for _ in range(per_session)]
    return sorted(jobs, key=lambda j: j.at)


def fleet_for(jobs: list[Job], *, shards: int = 4, utilisation: float = 0.7) -> FleetConfig:
    return FleetConfig(shards=shards, stream_mu_per_s=0.5,
                       capacity_mu_per_min=capacity_for(jobs, shards, utilisation))


def merged(*streams: list[Job]) -> list[Job]:
    return sorted((j for s in streams for j in s), key=lambda j: j.at)


# -- tokenweir ----------------------------------------------------------------
@pytest.mark.parametrize(
    "jobs",
    [
        pytest.param(session_jobs(sessions=60, per_session=20), id="many-small-sessions"),
        pytest.param(session_jobs(sessions=16, per_session=60, seed=2), id="few-busy-sessions"),
        pytest.param(session_jobs(sessions=40, per_session=25, mu=(0.2, 40.0), seed=3),
                     id="skewed-request-cost"),
    ],
)
def test_tokenweir_keeps_sessions_sticky_and_shard_load_bounded(jobs):
    result = replay(jobs, TokenweirPolicy(), fleet_for(jobs))

    assert result.unrouted == 0
    assert result.max_mean_load <= 1.25
    assert result.sticky_share >= 0.8
    assert result.mean_stickiness >= 0.8


def test_tokenweir_spills_a_dominant_session_rather_than_overload_its_shard():
    # ~38% of all MU in one session: more than 1.25 × a quarter of the fleet
    whale = session_jobs(sessions=1, per_session=200, mu=(5.0, 15.0), prefix="whale")
    minnows = session_jobs(sessions=40, per_session=15, seed=4)
    jobs = merged(whale, minnows)

    result = replay(jobs, TokenweirPolicy(), fleet_for(jobs))

    assert result.session_shares["whale0"] < 0.8
    assert result.max_mean_load <= 1.25
    # its overflow displaces some small sessions from their home shards, but not most
    others = [v for k, v in result.session_shares.items() if k != "whale0"]
    assert sum(others) / len(others) >= 0.85


def test_router_load_drains_to_zero_once_every_request_completes():
    jobs = session_jobs(sessions=20, per_session=10)
    router = ShardRouter()

    replay(jobs, TokenweirPolicy(router), fleet_for(jobs))

    assert router.load and all(v == pytest.approx(0.0, abs=1e-6) for v in router.load.values())


def test_router_bounds_the_mu_it_is_told_not_the_true_mu():
    rng = random.Random(6)
    # 3% of requests are 200× the rest, and the estimate cannot tell which
    jobs = [replace(j, mu=200.0 if rng.random() < 0.03 else 1.0, routed_mu=7.0)
            for j in session_jobs(sessions=40, per_session=20, seed=6)]

    result = replay(jobs, TokenweirPolicy(), fleet_for(jobs))

    assert result.max_mean_routed_load <= 1.25 < result.max_mean_load


# -- baselines: the stickiness metric can fail ----------------------------------------------
@pytest.mark.parametrize(
    "policy",
    [pytest.param(RoundRobinPolicy, id="round-robin"),
     pytest.param(LeastRequestsPolicy, id="least-requests")],
)
def test_session_blind_baselines_spread_each_session_across_shards(policy):
    jobs = session_jobs(sessions=30, per_session=20)

    result = replay(jobs, policy(), fleet_for(jobs))

    assert result.unrouted == 0
    assert result.sticky_share < 0.1
    assert result.mean_stickiness < 0.6


# -- service model ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("jobs", "capacity_mu_per_min", "stretch"),
    [
        pytest.param([Job(at=0.0, mu=1.0)], 60.0, 1.0, id="lone-request-at-stream-speed"),
        pytest.param([Job(at=0.0, mu=1.0), Job(at=0.0, mu=1.0)], 30.0, 2.0,
                     id="saturated-shard-shares-capacity"),
        pytest.param([Job(at=0.0, mu=1.0), Job(at=0.0, mu=1.0)], 60.0, 1.0,
                     id="two-streams-fit-under-capacity"),
    ],
)
def test_processor_sharing_with_per_stream_cap(jobs, capacity_mu_per_min, stretch):
    fleet = FleetConfig(shards=1, capacity_mu_per_min=capacity_mu_per_min, stream_mu_per_s=0.5)

    result = replay(jobs, RoundRobinPolicy(), fleet)

    assert result.mean_stretch == pytest.approx(stretch)
