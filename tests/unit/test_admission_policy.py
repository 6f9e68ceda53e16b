import math

import pytest

from agents.auth import authenticate
from agents.capacity import CapacityPool, SlidingSum
from agents.control import AdmissionController, Admit, Reject, Settle, Skip
from agents.estimator import CostEstimator, StreamingQuantile
from agents.limiter import Reservation, TokenBucketLimiter
from agents.router import ShardRouter
from schemas.cost import CostModel
from schemas.signing import sign
from tests.builders import (
    SECRET,
    make_config,
    make_heartbeat,
    make_request,
    make_tenant,
    make_usage,
)

NOW = 1000.0


# -- authentication -----------------------------------------------------------
def test_auth_signed_request_accepted():
    config = make_config(auth_required=True)
    assert authenticate(sign(make_request(), "k-acme", SECRET), config) is None


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        pytest.param(lambda r: r, "not signed", id="unsigned"),
        pytest.param(lambda r: sign(r, "k-nobody", SECRET), "unknown key", id="unknown-key"),
        pytest.param(lambda r: sign(r, "k-acme", SECRET).model_copy(update={"max_tokens": 9}),
                     "does not match", id="tampered-body"),
        pytest.param(lambda r: sign(r, "k-acme", "ff" * 32), "does not match", id="wrong-secret"),
        pytest.param(lambda r: sign(r.model_copy(update={"tenant": "globex"}), "k-acme", SECRET),
                     "does not belong", id="other-tenants-key"),
    ],
)
def test_auth_forged_or_unsigned_rejected(mutate, fragment):
    denied = authenticate(mutate(make_request()), make_config(auth_required=True))
    assert denied is not None and fragment in denied


# -- estimator ------------------------------------------------------------------
def test_streaming_quantile_within_relative_error():
    sketch = StreamingQuantile()
    for v in range(1, 10_001):
        sketch.add(v)
    assert sketch.quantile(0.9) == pytest.approx(9000, rel=0.05)
    assert sketch.quantile(0.5) == pytest.approx(5000, rel=0.05)


def test_estimator_uses_prior_then_observed_quantile_capped_by_max_tokens():
    est = CostEstimator(min_observations=5, prior_output_tokens=100)
    assert est.expected_output_tokens("acme", "m", max_tokens=50) == 50
    assert est.expected_output_tokens("acme", "m", max_tokens=500) == 100
    for _ in range(10):
        est.observe("acme", "m", 300)
    assert est.expected_output_tokens("acme", "m", 1000) == pytest.approx(300, rel=0.05)
    assert est.expected_output_tokens("acme", "m", 200) == 200


def test_estimator_input_tokens_approximation_and_tokenizer():
    request = make_request(prompt="x" * 41)
    assert CostEstimator().count_input_tokens(request) == 11
    assert CostEstimator(tokenizers={"tiny-llama": lambda t: 3}).count_input_tokens(request) == 3


def test_cost_model_discounts_cached_input():
    cost = CostModel(alpha=1.0, beta=2.0, gamma=10.0, delta=0.5)
    assert cost.model_units(100, 10, images=1) == 130.0
    assert cost.model_units(100, 10, images=1, cached_tokens=40) == 110.0


# -- limiter --------------------------------------------------------------------
def reserve(limiter, state, mu, now, offset=0):
    """Charge ``mu`` at ``now``; the reservation the agent would store with it."""
    reservation = Reservation(tenant="acme", mu=mu, slot=math.floor(now), admit_offset=offset)
    return limiter.charge(state, mu, reservation.slot), reservation


def test_limiter_burst_then_refill_at_rate():
    limiter, tenant = TokenBucketLimiter(), make_tenant(limit_mu_per_min=60.0, burst_mu=10.0)
    state = limiter.fresh(tenant, NOW)
    for _ in range(10):
        assert limiter.check(state, tenant, 1.0, NOW).admitted
        state, _ = reserve(limiter, state, 1.0, NOW)
    over = limiter.check(state, tenant, 1.0, NOW)
    assert not over.admitted and over.retry_after_s == pytest.approx(1.0)
    state = limiter.refill(state, tenant, NOW + 2.0)
    assert state.tokens == pytest.approx(2.0)


def test_limiter_reconcile_refunds_overestimate():
    limiter, tenant = TokenBucketLimiter(), make_tenant()
    state, reservation = reserve(limiter, limiter.fresh(tenant, NOW), 4.0, NOW)
    settled = limiter.reconcile(state, tenant, reservation, 1.5, NOW)
    assert (settled.charged_mu, settled.actual_mu, settled.tokens, settled.pending) == (
        1.5, 1.5, 8.5, 0)
    assert settled.window == {int(NOW): 1.5}


def test_limiter_refund_never_fills_bucket_above_burst():
    limiter, tenant = TokenBucketLimiter(), make_tenant(burst_mu=10.0)
    state, reservation = reserve(limiter, limiter.fresh(tenant, NOW), 4.0, NOW)
    state = limiter.refill(state, tenant, NOW + 60)  # refilled to the burst meanwhile
    settled = limiter.reconcile(state, tenant, reservation, 0.0, NOW + 60)
    assert settled.tokens == 10.0 and settled.charged_mu == 0.0


def test_limiter_underestimate_becomes_debt_that_delays_next_admission():
    limiter, tenant = TokenBucketLimiter(), make_tenant(limit_mu_per_min=60.0, burst_mu=10.0)
    state, reservation = reserve(limiter, limiter.fresh(tenant, NOW), 2.0, NOW)
    state = limiter.reconcile(state, tenant, reservation, 14.0, NOW)
    assert state.tokens == pytest.approx(-4.0)
    over = limiter.check(state, tenant, 1.0, NOW)
    assert not over.admitted and over.retry_after_s == pytest.approx(5.0)


@pytest.mark.parametrize("refund", [pytest.param(0.0, id="exact-estimates"),
                                    pytest.param(0.9, id="overestimates-refunded")])
def test_limiter_provisioned_flood_never_exceeds_limit_plus_burst_per_minute(refund):
    limiter = TokenBucketLimiter()
    tenant = make_tenant(plan="provisioned", limit_mu_per_min=60.0, burst_mu=10.0,
                         reservation_mu_per_min=30.0)
    state, admitted_at = limiter.fresh(tenant, NOW), []
    for i in range(1800):  # 10 requests/s of 1 MU for 3 minutes
        now = NOW + i / 10
        state = limiter.refill(state, tenant, now)
        if limiter.check(state, tenant, 1.0, now).admitted:
            state, reservation = reserve(limiter, state, 1.0, now)
            state = limiter.reconcile(state, tenant, reservation, 1.0 - refund, now)
            admitted_at.append((now, 1.0 - refund))
    worst = max(sum(mu for t, mu in admitted_at if start <= t < start + 60)
                for start in (NOW + k / 10 for k in range(1200)))
    assert 30.0 <= worst <= 70.0 + 1e-9


def test_limiter_reservation_admits_beyond_empty_bucket_up_to_reservation():
    limiter = TokenBucketLimiter()
    tenant = make_tenant(plan="provisioned", limit_mu_per_min=60.0, burst_mu=1.0,
                         reservation_mu_per_min=30.0)
    state = limiter.fresh(tenant, NOW)
    paths = []
    for _ in range(40):
        decision = limiter.check(state, tenant, 1.0, NOW)
        paths.append(decision.path)
        if decision.admitted:
            state, _ = reserve(limiter, state, 1.0, NOW)
    assert paths.count("reservation") == 30 and paths[30:] == ["rejected"] * 10


# -- capacity -------------------------------------------------------------------
def test_sliding_sum_expires_old_buckets():
    window = SlidingSum(window_s=10, step_s=1)
    window.add(5, NOW)
    window.add(3, NOW + 5)
    assert window.total(NOW + 9) == 8
    assert window.total(NOW + 10.5) == 3


def test_pool_saturated_admits_only_tenants_below_fair_share():
    pool = CapacityPool(window_s=60)
    pool.set_capacity(capacity_mu_per_min=100, reserved_mu_per_min=0)
    for _ in range(95):  # alone, the hog's fair share is the whole pool
        d = pool.decide("hog", "high", 1.0, NOW)
        assert d.admitted
        pool.record("hog", 1.0, NOW)
    small = pool.decide("small", "high", 1.0, NOW)
    assert small.admitted and small.reason == "fair share"
    pool.record("small", 1.0, NOW)
    hog = pool.decide("hog", "high", 1.0, NOW)
    assert not hog.admitted and hog.retry_after_s > 0


def test_pool_low_priority_leaves_headroom_for_high():
    pool = CapacityPool(window_s=60)
    pool.set_capacity(capacity_mu_per_min=100, reserved_mu_per_min=0)
    for tenant in ("a", "b", "c", "d"):
        for _ in range(19):
            pool.decide(tenant, "low", 1.0, NOW)  # recorded even when refused: load
            pool.record(tenant, 1.0, NOW)
    assert pool._shared.total(NOW) == 76
    assert not pool.decide("e", "low", 1.0, NOW).admitted
    assert pool.decide("e", "high", 1.0, NOW).admitted


# -- router ---------------------------------------------------------------------
def test_router_only_routes_to_fresh_ready_shards():
    router = ShardRouter(heartbeat_timeout_s=5)
    router.observe(make_heartbeat(worker="w-1", shards=[0, 1]), NOW)
    router.observe(make_heartbeat(worker="w-2", shards=[2, 3], engine_state="draining"), NOW)
    assert router.healthy_shards("tiny-llama", NOW + 1) == [0, 1]
    assert router.route("tiny-llama", None, NOW + 6) is None  # w-1 went silent


def test_router_shards_move_with_rebalance():
    router = ShardRouter()
    router.observe(make_heartbeat(worker="w-1", shards=[0, 1, 2, 3]), NOW)
    router.observe(make_heartbeat(worker="w-1", shards=[0, 1], seq=2), NOW)
    router.observe(make_heartbeat(worker="w-2", shards=[2, 3]), NOW)
    assert router.healthy_shards("tiny-llama", NOW) == [0, 1, 2, 3]
    router.exclude("w-2")
    assert router.healthy_shards("tiny-llama", NOW) == [0, 1]


def test_router_session_sticks_until_load_bound_exceeded():
    router = ShardRouter(balance=1.25)
    router.observe(make_heartbeat(), NOW)
    first = router.route("tiny-llama", "conv-7", NOW, 1.0)
    assert first is not None
    for i in range(3):
        route = router.route("tiny-llama", "conv-7", NOW, 1.0)
        assert route is not None and route.shard == first.shard
        other = router.route("tiny-llama", None, NOW, 1.0)
        assert other is not None
        router.routed(f"o{i}", other, 1.0)
    router.load[("tiny-llama", first.shard)] = 100.0  # the sticky shard is overloaded
    moved = router.route("tiny-llama", "conv-7", NOW, 1.0)
    assert moved is not None and moved.shard != first.shard and not moved.sticky


def test_router_without_session_picks_least_loaded_and_completion_frees_load():
    router = ShardRouter()
    router.observe(make_heartbeat(shards=[0, 1]), NOW)
    a = router.route("tiny-llama", None, NOW, 5.0)
    assert a is not None
    router.routed("r1", a, 5.0)
    b = router.route("tiny-llama", None, NOW, 5.0)
    assert b is not None and b.shard != a.shard
    router.completed("r1")
    assert router.load[("tiny-llama", a.shard)] == 0.0


# -- admission controller ----------------------------------------------------------
def controller(**config_overrides):
    ctl = AdmissionController(make_config(**config_overrides), models=["tiny-llama"])
    ctl.observe_heartbeat(make_heartbeat(sent_at=NOW), NOW)
    return ctl


def test_controller_admits_charges_and_settles_exactly():
    ctl = controller()
    admit = ctl.admit(None, None, make_request(request_id="r1", max_tokens=100), 0, NOW)
    assert isinstance(admit, Admit) and admit.state is not None and admit.state.pending == 1
    assert admit.reservation.admit_offset == 0 and not admit.reservation.settled
    settle = ctl.settle(admit.state, admit.reservation,
                        make_usage(request_id="r1", model_units=0.42), 0, NOW)
    assert isinstance(settle, Settle) and settle.reservation is not None
    assert settle.state.charged_mu == pytest.approx(settle.state.actual_mu) == 0.42
    assert settle.reservation.settle_offset == 0 and settle.state.pending == 0
    again = ctl.settle(settle.state, settle.reservation,
                       make_usage(request_id="r1", model_units=0.42), 1, NOW)
    assert isinstance(again, Settle) and again.duplicate and again.reservation is None
    assert again.state.charged_mu == pytest.approx(0.42) and again.state.duplicates == 1


def test_controller_replayed_offsets_are_not_applied_twice():
    ctl = controller()
    admit = ctl.admit(None, None, make_request(request_id="r1"), 5, NOW)
    assert isinstance(admit, Admit) and admit.state is not None
    replay = ctl.admit(admit.state, admit.reservation, make_request(request_id="r1"), 5, NOW)
    assert isinstance(replay, Admit) and replay.replay and replay.state is None
    settled = ctl.settle(admit.state, admit.reservation, make_usage(request_id="r1"), 3, NOW)
    assert isinstance(settled, Settle)
    assert isinstance(ctl.settle(settled.state, settled.reservation,
                                 make_usage(request_id="r1"), 3, NOW), Skip)
    assert isinstance(ctl.admit(settled.state, settled.reservation,
                                make_request(request_id="r1"), 5, NOW), Skip)


def test_controller_crash_kept_reservation_not_state_recharges_once():
    ctl = controller()
    before = ctl.admit(None, None, make_request(request_id="r0"), 4, NOW)
    assert isinstance(before, Admit) and before.state is not None
    lost = ctl.admit(before.state, None, make_request(request_id="r1"), 5, NOW)
    assert isinstance(lost, Admit) and lost.state is not None
    # Only the reservation of r1 reached the changelog: the state is still `before`'s.
    again = ctl.admit(before.state, lost.reservation, make_request(request_id="r1"), 5, NOW)
    assert isinstance(again, Admit) and not again.replay and again.state is not None
    assert again.state.charged_mu == pytest.approx(lost.state.charged_mu)
    assert again.state.pending == 2


def test_controller_crash_kept_settled_reservation_not_state_applies_once():
    ctl = controller()
    admit = ctl.admit(None, None, make_request(request_id="r1"), 0, NOW)
    assert isinstance(admit, Admit) and admit.state is not None
    usage = make_usage(request_id="r1", model_units=0.3)
    first = ctl.settle(admit.state, admit.reservation, usage, 7, NOW)
    assert isinstance(first, Settle) and first.reservation is not None
    # The settled reservation survived, the state did not: the same record applies it.
    redo = ctl.settle(admit.state, first.reservation, usage, 7, NOW)
    assert isinstance(redo, Settle) and not redo.duplicate
    assert redo.state.charged_mu == pytest.approx(first.state.charged_mu) == 0.3
    # A redelivery (another record) of the same usage is a duplicate.
    dup = ctl.settle(redo.state, first.reservation, usage, 9, NOW)
    assert isinstance(dup, Settle) and dup.duplicate
    assert dup.state.charged_mu == dup.state.actual_mu == 0.3  # exactly: nothing pending


def test_controller_second_admission_of_same_request_id_rejected():
    ctl = controller()
    admit = ctl.admit(None, None, make_request(request_id="r1"), 0, NOW)
    assert isinstance(admit, Admit) and admit.state is not None
    twice = ctl.admit(admit.state, admit.reservation, make_request(request_id="r1"), 1, NOW)
    assert isinstance(twice, Reject) and twice.rejection.reason == "invalid"


def test_controller_over_limit_rejects_with_retry_after():
    ctl = controller(tenants={"acme": make_tenant(limit_mu_per_min=6.0, burst_mu=1.0)})
    state = None
    outcomes = []
    for i in range(20):
        d = ctl.admit(state, None, make_request(request_id=f"r{i}", max_tokens=10), i, NOW)
        state = d.state if not isinstance(d, Skip) else state
        outcomes.append(d)
    rejected = [d for d in outcomes if isinstance(d, Reject)]
    assert rejected and all(r.rejection.reason == "rate_limited" for r in rejected)
    assert all(r.rejection.retry_after_s and r.rejection.retry_after_s > 0 for r in rejected)
    assert all(r.rejection.model_units == pytest.approx(0.105) for r in rejected)


def test_controller_no_healthy_worker_rejects_over_capacity():
    ctl = AdmissionController(make_config(), models=["tiny-llama"])
    d = ctl.admit(None, None, make_request(), 0, NOW)
    assert isinstance(d, Reject) and d.rejection.reason == "over_capacity"


def test_controller_unknown_tenant_without_default_is_rejected():
    ctl = controller(default_tenant=None)
    d = ctl.admit(None, None, make_request(tenant="stranger"), 0, NOW)
    assert isinstance(d, Reject) and d.rejection.reason == "unauthenticated"


def test_controller_provisioned_within_reservation_admitted_while_shared_pool_full():
    prov = make_tenant(plan="provisioned", limit_mu_per_min=100.0, burst_mu=10.0,
                       reservation_mu_per_min=50.0)
    ctl = controller(tenants={"acme": make_tenant(limit_mu_per_min=1e6, burst_mu=1e6),
                              "prov": prov})
    ctl.observe_heartbeat(make_heartbeat(sent_at=NOW, capacity_mu_per_min=60.0), NOW)
    state, i = None, 0
    while True:  # acme fills the 10 MU/min the reservation leaves to the shared pool
        d = ctl.admit(state, None, make_request(request_id=f"a{i}", max_tokens=100), i, NOW)
        i += 1
        if isinstance(d, Reject):
            assert d.rejection.reason == "over_capacity"
            break
        state = d.state
    prov_state = None
    for j in range(5):
        d = ctl.admit(prov_state, None, make_request(request_id=f"p{j}", tenant="prov",
                                                     max_tokens=100), j, NOW)
        assert isinstance(d, Admit), d
        prov_state = d.state


# -- batch settlement -------------------------------------------------------------
def _admitted(ctl, n, tenant="acme"):
    state, reservations = None, {}
    for i in range(n):
        admit = ctl.admit(state, None, make_request(request_id=f"r{i}", tenant=tenant,
                                                    max_tokens=50 + i), i, NOW + i * 0.01)
        assert isinstance(admit, Admit) and admit.state is not None
        state, reservations[f"r{i}"] = admit.state, admit.reservation
    return state, reservations


def _held(reservation):
    return None if reservation is None else (reservation.mu, reservation.slot)


def test_settle_batch_equals_settling_one_record_at_a_time():
    ctl = controller(tenants={"acme": make_tenant(limit_mu_per_min=600.0, burst_mu=100.0)})
    state, reservations = _admitted(ctl, 40)
    # Real usage for 30 of them (some twice: redeliveries), one never admitted.
    records = [make_usage(request_id=f"r{i}", model_units=0.05 * (i % 7)) for i in range(30)]
    records += [make_usage(request_id="r3", model_units=0.15),
                make_usage(request_id="ghost", model_units=1.0)]
    one_by_one, held = state, dict(reservations)
    for offset, usage in enumerate(records):
        out = ctl.settle(one_by_one, held.get(usage.request_id), usage, offset, NOW + 5)
        assert isinstance(out, Settle)
        one_by_one = out.state
        if out.reservation is not None:
            held.pop(usage.request_id)
    batch = ctl.settle_batch(state, [(u, offset, _held(reservations.get(u.request_id)))
                                     for offset, u in enumerate(records)], NOW + 5)
    assert batch.state == one_by_one
    assert batch.settled == tuple(f"r{i}" for i in range(30)) and batch.duplicates == 2
    assert batch.state.pending == 10 and batch.state.usage_offset == len(records) - 1


def test_settle_batch_replayed_records_close_their_reservations_without_charging():
    ctl = controller()
    state, reservations = _admitted(ctl, 3)
    usage = [make_usage(request_id=f"r{i}", model_units=0.1) for i in range(3)]
    first = ctl.settle_batch(state, [(u, i, _held(reservations[u.request_id]))
                                     for i, u in enumerate(usage)], NOW + 1)
    assert first.state is not None
    # A crash kept the state but not the reservations' deletion: all three are replayed.
    replay = ctl.settle_batch(first.state, [(u, i, _held(reservations[u.request_id]))
                                            for i, u in enumerate(usage)], NOW + 2)
    assert replay.state is None and replay.settled == ()
    assert replay.closed_late == ("r0", "r1", "r2")


def test_settle_batch_without_admission_state_settles_nothing():
    out = controller().settle_batch(None, [(make_usage(), 0, None)], NOW)
    assert out.state is None and out.settled == () and "no admission state" in out.why
