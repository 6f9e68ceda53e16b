"""Windowed metering per tenant and model: tumbling 1-minute and hopping 10 s windows. Pure.

MU are kept in 5-second buckets (model -> bucket start -> MU) for the last two
minutes, inside the tenant's state, so that metering adds no table writes of
its own. A tumbling minute is the sum of its twelve buckets; the hopping
window (10 s long, every 5 s) is two adjacent buckets.
"""

from __future__ import annotations

import math

BUCKET_S = 5
KEEP_S = 120
MINUTE_S = 60
HOP_LEN_S = 10

Buckets = dict[str, dict[int, float]]  # model -> bucket start (epoch s) -> MU


def bucket(now: float) -> int:
    """The start (epoch s) of the bucket ``now`` falls in."""
    return math.floor(now / BUCKET_S) * BUCKET_S


def pruned(buckets: Buckets, now: float) -> Buckets:
    """A copy of ``buckets`` without those older than two minutes at ``now``: the caller
    owns it and may add to it in place."""
    oldest = bucket(now) - KEEP_S
    out: Buckets = {}
    for name, series in buckets.items():
        kept = {start: v for start, v in series.items() if start > oldest}
        if kept:
            out[name] = kept
    return out


def tumbling_minute(buckets: Buckets, model: str, now: float) -> float:
    """MU in the current wall-clock minute [⌊now/60⌋·60, +60)."""
    first = math.floor(now / MINUTE_S) * MINUTE_S
    return sum(v for start, v in buckets.get(model, {}).items()
               if first <= start < first + MINUTE_S)


def hopping_10s(buckets: Buckets, model: str, now: float) -> float:
    """MU in the latest 10 s hopping window (hop 5 s) that contains ``now``."""
    last = bucket(now)
    return sum(v for start, v in buckets.get(model, {}).items()
               if last - HOP_LEN_S + BUCKET_S <= start <= last)
