"""Simulator throughput: a 1M-request synthetic day built from the Azure 2023 trace's shapes.

The day tiles the trace's hour of per-second arrival counts (code and conversation
merged, so its burstiness is the trace's) 24 times under a diurnal curve (trough at
40 % of the peak), scaled to 1,000,000 requests; token shapes are drawn from the
trace's rows. It runs the tokenweir policy (closed loop: one ScalingPolicy decision
every 2 s) and, as the baseline in the same run, static-peak (no control loop, only
the vectorised fleet and latency model), and prints one JSON line last.

    python -m bench.simulator
"""

from __future__ import annotations

import json
import time

import numpy as np

from bench.traces import azure_requests
from schemas.cost import CostModel
from sim.simulator import SimConfig, Workload, simulate

DAY_S = 86_400


def synthetic_day(n: int = 1_000_000, seed: int = 11) -> tuple[np.ndarray, np.ndarray,
                                                                np.ndarray]:
    rows = azure_requests()
    rng = np.random.default_rng(seed)
    at = np.array([r.at for r in rows])
    inp = np.array([r.input_tokens for r in rows], dtype=float)
    out = np.array([r.output_tokens for r in rows], dtype=float)
    hour = int(np.ceil(at[-1]))
    per_s = np.bincount(at.astype(np.int64), minlength=hour).astype(float)
    shape = np.tile(per_s, DAY_S // hour + 1)[:DAY_S]
    diurnal = 0.7 - 0.3 * np.cos(2 * np.pi * np.arange(DAY_S) / DAY_S)  # 0.4 … 1.0
    rate = shape * diurnal
    counts = rng.multinomial(n, rate / rate.sum())  # exactly n requests
    secs = np.repeat(np.arange(DAY_S), counts)
    times = secs + rng.random(len(secs))
    pick = rng.integers(0, len(rows), len(times))
    return times, inp[pick], out[pick]


def main() -> None:
    cfg = SimConfig(model="synthetic-day")
    times, inp, out = synthetic_day()
    t0 = time.perf_counter()
    work = Workload.build((times, inp, out), CostModel(), cfg)
    build_s = time.perf_counter() - t0
    results = {}
    for policy in ("tokenweir", "static-peak"):
        t1 = time.perf_counter()
        res = simulate(work, policy, cfg)
        wall = time.perf_counter() - t1 + build_s
        results[policy] = (res, wall)
        print(f"{policy:<12} requests={res.requests} wall={wall:.2f}s "
              f"req/s={res.requests / wall:,.0f} GPU-h={res.gpu_hours:.1f} "
              f"SLO={res.slo_attainment:.2%}")
    tw, tw_wall = results["tokenweir"]
    sp, sp_wall = results["static-peak"]
    print(json.dumps({
        "bench": "simulator",
        "requests_per_s": round(tw.requests / tw_wall),
        "requests": tw.requests,
        "policy": "tokenweir",
        "wall_s": round(tw_wall, 3),
        "baseline": "static-peak policy on the same day (no control loop; "
                    "includes its oracle sizing pass)",
        "baseline_requests_per_s": round(sp.requests / sp_wall),
        "gpu_hours": round(tw.gpu_hours, 2),
        "baseline_gpu_hours": round(sp.gpu_hours, 2),
        "slo_attainment": round(tw.slo_attainment, 4),
    }))


if __name__ == "__main__":
    main()
