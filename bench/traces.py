"""Workloads from the real traces in ``../shared/traces`` (see its README for licenses).

ServeGen (Alibaba, Apache-2.0) describes each client per 10-minute window by
a request rate and an inter-arrival distribution (Gamma or Weibull with the
given shape), and per 6-hour window by input/output token distributions.
``servegen_requests`` turns that into concrete requests: the shape is kept
(so burstiness, the CV, is the trace's) and the scale is set so the mean
inter-arrival time is 1/rate.
"""

from __future__ import annotations

import ast
import bisect
import csv
import json
import math
import os
import random
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

# The project's shared folder sits beside the checkout; TOKENWEIR_SHARED_DIR points
# elsewhere (a clone in another place, a CI workspace).
SHARED = Path(os.environ.get("TOKENWEIR_SHARED_DIR")
              or Path(__file__).resolve().parents[2] / "shared")
SERVEGEN = SHARED / "traces" / "servegen-deepseek-r1"
AZURE = SHARED / "traces" / "azure2023"
WINDOW_S = 600


@dataclass(frozen=True, slots=True)
class TraceRequest:
    at: float  # seconds from the start of the slice (trace time)
    tenant: str
    input_tokens: int
    output_tokens: int
    session: str | None = None


class _Distribution:
    def __init__(self, encoded: str) -> None:
        pairs = sorted(ast.literal_eval(encoded).items())
        self.values = [int(k) for k, _ in pairs]
        self._cdf = list(accumulate(float(p) for _, p in pairs))

    def sample(self, rng: random.Random) -> int:
        i = bisect.bisect_left(self._cdf, rng.random() * self._cdf[-1])
        return self.values[min(i, len(self.values) - 1)]


def _interarrival(rng: random.Random, pattern: str, shape: float, rate: float) -> float:
    mean = 1.0 / rate
    if pattern == "Weibull" and shape > 0:
        scale = mean / math.gamma(1 + 1 / shape)
        return rng.weibullvariate(scale, shape)
    if pattern == "Gamma" and shape > 0:
        return rng.gammavariate(shape, mean / shape)
    return rng.expovariate(rate)


def servegen_clients(directory: Path = SERVEGEN) -> list[int]:
    clients = sorted(int(p.name.split("-")[1]) for p in directory.glob("chunk-*-trace.csv"))
    if not clients:
        raise FileNotFoundError(f"no ServeGen trace (chunk-N-trace.csv) under {directory}; "
                                "set TOKENWEIR_SHARED_DIR to the folder holding traces/")
    return clients


def servegen_requests(start_s: float, duration_s: float, *, seed: int = 7,
                      directory: Path = SERVEGEN, sessions_per_tenant: int = 0,
                      ) -> list[TraceRequest]:
    """Requests of every client in [start_s, start_s + duration_s), times relative to start_s."""
    rng = random.Random(seed)
    out: list[TraceRequest] = []
    for client in servegen_clients(directory):
        tenant = f"client-{client}"
        data = json.loads((directory / f"chunk-{client}-dataset.json").read_text())
        dists: dict[int, tuple[_Distribution, _Distribution]] = {}
        with open(directory / f"chunk-{client}-trace.csv") as fh:
            rows = [r for r in csv.reader(fh) if r]
        for row in rows:
            w0, rate, pattern, shape = float(row[0]), float(row[1]), row[3], float(row[4] or 0)
            if rate <= 0 or w0 + WINDOW_S <= start_s or w0 >= start_s + duration_s:
                continue
            block = int(w0 // 21600 * 21600)
            if block not in dists:
                doc = data.get(str(block)) or data[min(data, key=lambda k: abs(int(k) - block))]
                dists[block] = (_Distribution(doc["input_tokens"]),
                                _Distribution(doc["output_tokens"]))
            inputs, outputs = dists[block]
            t = w0 + _interarrival(rng, pattern, shape, rate)
            while t < w0 + WINDOW_S:
                if start_s <= t < start_s + duration_s:
                    session = (f"{tenant}/s{rng.randrange(sessions_per_tenant)}"
                               if sessions_per_tenant else None)
                    out.append(TraceRequest(at=t - start_s, tenant=tenant,
                                            input_tokens=max(1, inputs.sample(rng)),
                                            output_tokens=max(1, outputs.sample(rng)),
                                            session=session))
                t += _interarrival(rng, pattern, shape, rate)
    out.sort(key=lambda r: r.at)
    return out


def azure_requests(names: tuple[str, ...] = ("code", "conv"), directory: Path = AZURE
                   ) -> list[TraceRequest]:
    """The Azure 2023 trace rows, one service per file (tenant = file name)."""
    from datetime import datetime

    rows: list[tuple[datetime, str, int, int]] = []
    for name in names:
        with open(directory / f"AzureLLMInferenceTrace_{name}.csv") as fh:
            for rec in csv.DictReader(fh):
                at = datetime.strptime(rec["TIMESTAMP"][:26], "%Y-%m-%d %H:%M:%S.%f")
                rows.append((at, name, int(rec["ContextTokens"]), int(rec["GeneratedTokens"])))
    rows.sort()
    t0 = rows[0][0]
    return [TraceRequest(at=(at - t0).total_seconds(), tenant=name, input_tokens=i,
                         output_tokens=max(1, o)) for at, name, i, o in rows]
