"""The demo's plan: a thinned, compressed trace slice, its tenants' limits and the fleet."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.autoscaler import load_autoscaler_config
from bench.traces import servegen_clients
from infra.demo_trace import DemoTrace, control_toml, plan
from schemas.tenancy import load_config

SLICE = DemoTrace(start_s=36000, duration_s=7200, speedup=240, sample=0.002, tenants=4)


def test_demo_plan_slice_keeps_busiest_tenants_in_time_order() -> None:
    p = plan(SLICE, model="tiny-llama", run_id="t")
    assert len(p.requests) > 50 and len(p.tenants) == 4
    assert {r.request.tenant for r in p.requests} == set(p.tenants)
    times = [r.wall_s for r in p.requests]
    assert times == sorted(times) and times[0] == 0.0
    assert p.wall_s == pytest.approx(times[-1]) and p.wall_s <= 7200 / 240
    assert all(r.request.request_id.startswith("demo-t-") for r in p.requests)


def test_demo_plan_sizes_replicas_so_the_peak_minute_needs_peak_replicas() -> None:
    p = plan(SLICE, model="tiny-llama", run_id="t")
    needed = p.peak_mu_per_min / (p.cost.capacity_mu_per_min * SLICE.target_utilisation)
    assert needed == pytest.approx(SLICE.peak_replicas, rel=1e-3)


def test_demo_control_file_loads_with_one_provisioned_tenant_and_a_floor(tmp_path: Path) -> None:
    p = plan(SLICE, model="tiny-llama", run_id="t")
    path = tmp_path / "control.toml"
    path.write_text(control_toml(p, "tiny-llama", SLICE))
    config = load_config(path)
    assert not config.auth_required
    provisioned = [t for t in config.tenants.values() if t.plan == "provisioned"]
    assert len(provisioned) == 1
    scaling = load_autoscaler_config(config).scaling("tiny-llama", p.cost.capacity_mu_per_min)
    # The fleet's floor carries every reservation with a replica to spare.
    assert (scaling.min_replicas - 1) * p.cost.capacity_mu_per_min \
        >= provisioned[0].reservation_mu_per_min


def test_trace_folder_missing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="TOKENWEIR_SHARED_DIR"):
        servegen_clients(tmp_path)
