"""Calibration: fit a model's cost coefficients (α, β, γ) and capacity C from an engine.

The model (DESIGN.md, "Concepts"): a request costs ``mu = α·in + β·out +
γ·images`` MU and a saturated replica retires C MU per minute, so a stream
of identical requests at saturation completes at ``r = C / mu`` requests per
minute, i.e.::

    1 / r  =  (α/C)·in + (β/C)·out + (γ/C)·images        (minutes per request)

The driver keeps the engine saturated at each grid point (input length ×
output length, plus image points for engines that take images), measures r,
and ordinary least squares over the grid fits ``a = α/C``, ``b = β/C``,
``g = γ/C`` (no intercept: the MU formula has none).

MU is only defined up to scale (doubling α, β, γ and C changes nothing), so
one coefficient anchors it: β keeps its value from the existing entry
(default 0.01 MU per output token), whence ``C = β / b``, ``α = a·C``,
``γ = g·C``. δ (the refund per cached input token) needs a prefix-caching
workload and is not measured: it keeps its ratio to α from the existing entry.

The fitting is pure (plain Python: two or three unknowns need no numpy); the
driver is async and talks to the engine only through
:class:`workers.engines.base.Engine`.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import math
import os
import re
import struct
import tomllib
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.cost import CostModel
from schemas.events import InferenceRequest, SamplingParams
from workers import CalibrationError
from workers.engines import make_engine
from workers.engines.base import Engine

# A column of the design matrix this much shorter than dependent on the others
# (after scaling every column to unit length) makes the grid degenerate.
_RANK_TOLERANCE = 1e-9


# -- pure fitting ------------------------------------------------------------------
class Measurement(BaseModel):
    """One grid point driven at saturation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_tokens: Annotated[float, Field(ge=0)]  # mean prompt tokens per request
    output_tokens: Annotated[float, Field(ge=0)]  # mean output tokens per request
    images: Annotated[float, Field(ge=0)] = 0.0  # images per request
    requests_per_min: Annotated[float, Field(gt=0)]  # completions/min, engine time
    requests: Annotated[int, Field(ge=0)] = 0  # completions timed
    saturated: bool = True  # the engine held requests queued while timed


class PointFit(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input_tokens: float  # mean prompt tokens per request
    output_tokens: float  # mean output tokens per request
    images: float  # images per request
    requests_per_min: float  # measured, requests/min
    fitted_requests_per_min: float  # the fitted model's prediction, requests/min
    residual_pct: float  # (measured − fitted) / fitted, percent
    saturated: bool


class Calibration(BaseModel):
    """The fitted cost model and how well it fits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: str
    model: str
    alpha: float  # MU per input token
    beta: float  # MU per output token (the anchor of the MU scale)
    gamma: float  # MU per image
    delta: float  # MU refunded per cached input token
    capacity_mu_per_min: float  # one replica, MU/min
    r_squared: float  # of minutes per request, fitted vs measured
    max_abs_residual_pct: float  # worst grid point, percent of its fitted rate
    points: list[PointFit]
    notes: list[str] = []  # what was anchored, kept or forced rather than measured

    def cost_model(self) -> CostModel:
        return CostModel(alpha=self.alpha, beta=self.beta, gamma=self.gamma, delta=self.delta,
                         capacity_mu_per_min=self.capacity_mu_per_min)


def least_squares(rows: Sequence[Sequence[float]], ys: Sequence[float]) -> list[float]:
    """Coefficients c minimising ‖X·c − y‖² (no intercept), by the normal equations.

    Columns are scaled to unit length first, so that one tolerance detects a
    degenerate design whatever the units. Raises :class:`CalibrationError`
    when the columns are (nearly) linearly dependent.
    """
    if not rows or len(rows) != len(ys):
        raise CalibrationError("least squares needs one y per row and at least one row")
    p = len(rows[0])
    if any(len(row) != p for row in rows):
        raise CalibrationError("least squares rows differ in length")
    if len(rows) < p:
        raise CalibrationError(f"{len(rows)} measurements cannot determine {p} coefficients")
    norms = [math.sqrt(sum(row[j] ** 2 for row in rows)) for j in range(p)]
    if any(n == 0 for n in norms):
        raise CalibrationError("a coefficient's column is all zero: nothing measures it")
    x = [[row[j] / norms[j] for j in range(p)] for row in rows]
    # Augmented normal equations [XᵀX | Xᵀy], solved by Gaussian elimination
    # with partial pivoting.
    m = [[sum(r[i] * r[j] for r in x) for j in range(p)]
         + [sum(r[i] * y for r, y in zip(x, ys, strict=True))] for i in range(p)]
    for col in range(p):
        pivot = max(range(col, p), key=lambda i: abs(m[i][col]))
        if abs(m[pivot][col]) < _RANK_TOLERANCE:
            raise CalibrationError("the grid cannot separate the coefficients: its points are "
                                   "collinear; vary input and output lengths independently")
        m[col], m[pivot] = m[pivot], m[col]
        for i in range(col + 1, p):
            f = m[i][col] / m[col][col]
            for j in range(col, p + 1):
                m[i][j] -= f * m[col][j]
    scaled = [0.0] * p
    for i in reversed(range(p)):
        scaled[i] = (m[i][p] - sum(m[i][j] * scaled[j] for j in range(i + 1, p))) / m[i][i]
    return [c / n for c, n in zip(scaled, norms, strict=True)]


def r_squared(ys: Sequence[float], fitted: Sequence[float]) -> float:
    mean = sum(ys) / len(ys)
    ss_tot = sum((y - mean) ** 2 for y in ys)
    ss_res = sum((y - f) ** 2 for y, f in zip(ys, fitted, strict=True))
    if ss_tot == 0:
        return 1.0 if ss_res == 0 else 0.0
    return 1.0 - ss_res / ss_tot


def check_grid(shapes: Sequence[tuple[float, float, float]]) -> None:
    """Raise unless the (input, output, images) shapes can determine the coefficients."""
    with_images = any(s[2] > 0 for s in shapes)
    unknowns = 3 if with_images else 2
    distinct = set(shapes)
    if len(distinct) < unknowns:
        raise CalibrationError(
            f"the grid has {len(distinct)} distinct shape(s); fitting "
            f"{'α, β and γ' if with_images else 'α and β'} needs at least {unknowns} that vary "
            "input and output lengths independently")
    if len({s[0] for s in distinct}) < 2 or len({s[1] for s in distinct}) < 2:
        raise CalibrationError("the grid must hold at least two input lengths and two output "
                               "lengths, or α and β cannot be told apart")


def fit_cost_model(measurements: Sequence[Measurement], *, anchor: CostModel,
                   engine: str, model: str) -> Calibration:
    """Fit α, β, γ and C to saturated request rates; MU scale anchored on ``anchor.beta``."""
    if anchor.beta <= 0:
        raise CalibrationError("the existing β is 0: it cannot anchor the MU scale")
    check_grid([(m.input_tokens, m.output_tokens, m.images) for m in measurements])
    with_images = any(m.images > 0 for m in measurements)
    names = ["α", "β", "γ"] if with_images else ["α", "β"]
    rows = [[m.input_tokens, m.output_tokens, m.images][: len(names)] for m in measurements]
    ys = [1.0 / m.requests_per_min for m in measurements]  # minutes per request
    notes: list[str] = []
    # Costs cannot be negative: a coefficient fitted below zero (noise around
    # a negligible cost) is fixed at zero and the others refitted.
    active = list(range(len(names)))
    while True:
        sub = least_squares([[row[j] for j in active] for row in rows], ys)
        coef = [0.0] * len(names)
        for j, c in zip(active, sub, strict=True):
            coef[j] = c
        worst = min(active, key=lambda j: coef[j])
        if coef[worst] >= 0:
            break
        if names[worst] == "β":
            raise CalibrationError("output tokens fitted as free: β cannot anchor the MU scale; "
                                   "is the engine saturated and are output lengths honoured?")
        notes.append(f"{names[worst]} fitted below zero; fixed at 0 and the rest refitted")
        active.remove(worst)
    if coef[1] <= 0:
        raise CalibrationError("output tokens fitted as free: β cannot anchor the MU scale")
    capacity = anchor.beta / coef[1]
    alpha = coef[0] * capacity
    notes.append(f"β = {anchor.beta:g} MU/output token kept from the existing entry "
                 "(it fixes the MU scale)")
    if with_images:
        gamma = coef[2] * capacity
    else:
        gamma = anchor.gamma
        notes.append(f"γ not measured (no image points): kept at {gamma:g}")
    ratio = anchor.delta / anchor.alpha if anchor.alpha > 0 else 0.0
    delta = min(alpha, ratio * alpha)
    notes.append(f"δ not measured (needs prefix caching): kept at {ratio:.3g}·α")
    fitted = [sum(c * v for c, v in zip(coef, row, strict=True)) for row in rows]
    points = [PointFit(input_tokens=m.input_tokens, output_tokens=m.output_tokens,
                       images=m.images, requests_per_min=m.requests_per_min,
                       fitted_requests_per_min=1.0 / f,
                       residual_pct=(m.requests_per_min * f - 1.0) * 100.0,
                       saturated=m.saturated)
              for m, f in zip(measurements, fitted, strict=True)]
    unsaturated = sum(not p.saturated for p in points)
    if unsaturated:
        notes.append(f"{unsaturated} grid point(s) never had a request queued in the engine: "
                     "it may not have been saturated (raise the concurrency), and C reads low")
    return Calibration(engine=engine, model=model, alpha=alpha, beta=anchor.beta, gamma=gamma,
                       delta=delta, capacity_mu_per_min=capacity,
                       r_squared=r_squared(ys, fitted),
                       max_abs_residual_pct=max(abs(p.residual_pct) for p in points),
                       points=points, notes=notes)


# -- the grid and the driver -------------------------------------------------------
Count = Annotated[int, Field(ge=1, le=65_536)]


class CalibrationGrid(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input_tokens: Annotated[list[Count], Field(min_length=1)] = [128, 512, 2048]  # tokens
    output_tokens: Annotated[list[Count], Field(min_length=1)] = [16, 64, 256]  # tokens
    # Each adds one point at the first input and output length with that many
    # images (only for engines that take images).
    images: list[Annotated[int, Field(ge=1, le=8)]] = []
    requests_per_point: Count = 256  # completions timed per point
    concurrency: Count = 128  # requests kept in flight: above the engine's batch size
    point_timeout_s: Annotated[float, Field(gt=0)] = 600.0  # wall s per point

    def shapes(self) -> list[tuple[int, int, int]]:
        """(input tokens, output tokens, images) of every grid point, in driving order."""
        shapes = [(i, o, 0) for i in self.input_tokens for o in self.output_tokens]
        shapes += [(self.input_tokens[0], self.output_tokens[0], n) for n in self.images]
        return shapes


def parse_counts(text: str, *, what: str) -> list[int]:
    """``"128,512,2048"`` → ``[128, 512, 2048]``; an empty string is an empty list."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise CalibrationError(f"{what}: expected comma-separated integers, got {text!r}") from exc
    if any(c < 1 for c in counts):
        raise CalibrationError(f"{what}: every count must be at least 1, got {text!r}")
    return counts


@functools.cache
def _probe_image_b64(side: int = 224) -> str:
    """A grey ``side``×``side`` PNG: real image bytes for engines that decode images."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    pixels = b"".join(b"\x00" + b"\x80\x80\x80" * side for _ in range(side))
    png = (b"\x89PNG\r\n\x1a\n"
           + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(pixels)) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode()


def _calibration_request(model: str, point: int, index: int, shape: tuple[int, int, int]
                         ) -> InferenceRequest:
    input_tokens, output_tokens, images = shape
    # A distinct first word per request, so that no prefix cache can serve
    # a prompt; greedy, so that a real engine's work does not depend on luck.
    words = [f"c{point}x{index}"] + ["tok"] * (input_tokens - 1)
    return InferenceRequest(
        request_id=f"cal-{point}-{index}", tenant="calibration", model=model,
        prompt=" ".join(words), max_tokens=output_tokens,
        sampling=SamplingParams(temperature=0.0),
        images=[_probe_image_b64()] * images)


async def measure(engine: Engine, *, model: str, point: int, shape: tuple[int, int, int],
                  requests: int, concurrency: int, timeout_s: float) -> Measurement:
    """Drive ``engine`` closed-loop at ``concurrency`` requests in flight and time completions.

    ``requests + 2·concurrency`` requests run; the rate is taken over
    ``requests`` completions after the first ``concurrency`` (the ramp-up,
    when everything prefills at once), while ``concurrency`` are still in
    flight (before the drain). Rates are converted to engine time.
    """
    loop = asyncio.get_running_loop()
    total = requests + 2 * concurrency
    # Built beforehand: the clients run on the engine's event loop, and work
    # between a completion and its timestamp would blur the timing.
    batch = [_calibration_request(model, point, i, shape) for i in range(total)]
    done_at: list[float] = []
    inputs: list[int] = []
    outputs: list[int] = []
    waiting_seen: list[int] = []
    submitted = 0

    async def client() -> None:
        nonlocal submitted
        while submitted < total:
            index, submitted = submitted, submitted + 1
            generation = await engine.generate(batch[index], priority=0)
            done_at.append(loop.time())
            inputs.append(generation.input_tokens)
            outputs.append(len(generation.token_ids))
            waiting_seen.append(engine.stats().waiting)

    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(client() for _ in range(concurrency)))
    except TimeoutError as exc:
        raise CalibrationError(
            f"grid point {shape} did not finish in {timeout_s:g} s (engine hung or far slower "
            f"than expected: {engine.stats()})") from exc
    first, last = concurrency, concurrency + requests
    wall_s = done_at[last] - done_at[first]
    if wall_s <= 0:
        raise CalibrationError(f"engine {engine.name!r} answered grid point {shape} faster than "
                               "the clock can time: it has no latency to calibrate")
    per_min = requests / (wall_s / engine.time_scale) * 60.0
    timed = slice(first + 1, last + 1)
    return Measurement(input_tokens=sum(inputs[timed]) / requests,
                       output_tokens=sum(outputs[timed]) / requests, images=float(shape[2]),
                       requests_per_min=per_min, requests=requests,
                       saturated=max(waiting_seen[timed]) > 0)


async def calibrate(engine: Engine, grid: CalibrationGrid, *, model: str, anchor: CostModel,
                    on_point: Callable[[Measurement], None] | None = None) -> Calibration:
    """Drive every grid point at saturation and fit the cost model."""
    shapes = grid.shapes()
    check_grid([(float(i), float(o), float(n)) for i, o, n in shapes])
    if grid.images and not engine.supports_images:
        raise CalibrationError(f"engine {engine.name!r} does not take images: drop the image "
                               "points (γ keeps its existing value)")
    # One untimed round first: the first requests of a process pay for lazy
    # imports, caches and allocator growth, which would skew the first point.
    await measure(engine, model=model, point=len(shapes), shape=shapes[0],
                  requests=grid.concurrency, concurrency=grid.concurrency,
                  timeout_s=grid.point_timeout_s)
    measurements: list[Measurement] = []
    for point, shape in enumerate(shapes):
        m = await measure(engine, model=model, point=point, shape=shape,
                          requests=grid.requests_per_point, concurrency=grid.concurrency,
                          timeout_s=grid.point_timeout_s)
        measurements.append(m)
        if on_point is not None:
            on_point(m)
    return fit_cost_model(measurements, anchor=anchor, engine=engine.name, model=model)


async def run_calibration(engine_name: str, *, model: str, grid: CalibrationGrid,
                          anchor: CostModel, seed: int = 0, max_batch: int = 64,
                          time_scale: float = 1.0, model_dir: Path | None = None,
                          on_point: Callable[[Measurement], None] | None = None) -> Calibration:
    """Build engine ``engine_name`` (the simulated one runs on ``anchor``) and calibrate it."""
    engine = make_engine(engine_name, model=model, cost=anchor, seed=seed, max_batch=max_batch,
                         time_scale=time_scale, model_dir=model_dir)
    try:
        return await calibrate(engine, grid, model=model, anchor=anchor, on_point=on_point)
    finally:
        await engine.close()


# -- configuration entry -----------------------------------------------------------
def _table_key(model: str) -> str:
    return model if re.fullmatch(r"[A-Za-z0-9_-]+", model) else f'"{model}"'


def _num(x: float) -> str:
    return repr(float(f"{x:.6g}"))  # six significant digits, always a TOML float


def toml_entry(model: str, cost: CostModel) -> str:
    """The ``[models.<model>]`` table of the control-plane configuration for ``cost``."""
    return (f"[models.{_table_key(model)}]\n"
            f"alpha = {_num(cost.alpha)}  # MU per input token\n"
            f"beta = {_num(cost.beta)}  # MU per output token (anchors the MU scale)\n"
            f"gamma = {_num(cost.gamma)}  # MU per image\n"
            f"delta = {_num(cost.delta)}  # MU refunded per cached input token\n"
            f"capacity_mu_per_min = {_num(cost.capacity_mu_per_min)}  # one replica\n")


def _entry_of(doc: dict[str, object], model: str) -> object | None:
    models = doc.get("models")
    return models.get(model) if isinstance(models, dict) else None


def existing_cost(path: Path, model: str) -> CostModel | None:
    """The ``[models.<model>]`` entry of TOML file ``path``; None if the file or entry is absent."""
    if not path.exists():
        return None
    try:
        entry = _entry_of(tomllib.loads(path.read_text()), model)
        return None if entry is None else CostModel.model_validate(entry)
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise CalibrationError(f"{path}: cannot read the entry of {model!r}: {exc}") from exc


def _is_model_header(line: str, model: str) -> bool:
    stripped = line.strip()
    if not stripped.startswith("[") or stripped.startswith("[["):
        return False
    try:
        doc = tomllib.loads(stripped)
    except tomllib.TOMLDecodeError:
        return False
    return doc == {"models": {model: {}}}


def write_model_entry(path: Path, model: str, cost: CostModel) -> None:
    """Replace (or append) the ``[models.<model>]`` table of TOML file ``path``.

    The rest of the file is kept byte for byte; the result is parsed back
    before it replaces the file, which is never left half written.
    """
    old = path.read_text() if path.exists() else ""
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if _is_model_header(line, model)), None)
    entry = toml_entry(model, cost)
    if start is None:
        sep = "" if not old else ("\n" if old.endswith("\n") else "\n\n")
        new = old + sep + entry
    else:
        end = next((i for i in range(start + 1, len(lines))
                    if lines[i].lstrip().startswith("[")), len(lines))
        tail = lines[end:]
        new = "".join(lines[:start]) + entry + ("\n" if tail else "") + "".join(tail)
    try:
        written = _entry_of(tomllib.loads(new), model)
        if written is None or CostModel.model_validate(written) != CostModel.model_validate(
                tomllib.loads(entry)["models"][model]):
            raise CalibrationError(f"{path}: the entry of {model!r} did not read back as written")
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise CalibrationError(f"{path}: not written, the result would not parse "
                               f"(is {model!r} also defined another way?): {exc}") from exc
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


# -- report ------------------------------------------------------------------------
def format_point(m: Measurement) -> str:
    flag = "" if m.saturated else "  (never queued)"
    return (f"  in {m.input_tokens:7.0f}  out {m.output_tokens:6.0f}  images {m.images:2.0f}  "
            f"{m.requests_per_min:12.1f} req/min{flag}")


def format_report(cal: Calibration) -> str:
    head = (f"{'input':>7} {'output':>7} {'images':>6} {'req/min':>12} {'fitted':>12} "
            f"{'residual':>9}")
    rows = [f"{p.input_tokens:7.0f} {p.output_tokens:7.0f} {p.images:6.0f} "
            f"{p.requests_per_min:12.1f} {p.fitted_requests_per_min:12.1f} "
            f"{p.residual_pct:+8.2f}%{'' if p.saturated else '  never queued'}"
            for p in cal.points]
    fit = [f"fit over {len(cal.points)} points: R² = {cal.r_squared:.5f}, "
           f"max |residual| = {cal.max_abs_residual_pct:.2f}%",
           f"alpha = {cal.alpha:.6g} MU/input token",
           f"beta = {cal.beta:.6g} MU/output token",
           f"gamma = {cal.gamma:.6g} MU/image",
           f"delta = {cal.delta:.6g} MU/cached input token",
           f"capacity = {cal.capacity_mu_per_min:.6g} MU/min per replica"]
    return "\n".join([head, *rows, "", *fit, *(f"note: {n}" for n in cal.notes)])
