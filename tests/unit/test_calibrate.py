import time
from pathlib import Path
from typing import Any

import pytest

from schemas.cost import CostModel
from schemas.tenancy import load_config
from workers import CalibrationError
from workers.calibrate import (
    CalibrationGrid,
    Measurement,
    calibrate,
    existing_cost,
    fit_cost_model,
    least_squares,
    parse_counts,
    toml_entry,
    write_model_entry,
)
from workers.engines.echo import EchoEngine
from workers.engines.sim import SimEngine

TRUE = CostModel(alpha=0.002, beta=0.02, gamma=0.3, delta=0.001, capacity_mu_per_min=1200.0)


def exact_measurement(cost: CostModel, input_tokens: int, output_tokens: int,
                      images: int = 0, **overrides: Any) -> Measurement:
    """What a perfect engine following ``cost`` would measure at saturation."""
    fields: dict[str, Any] = {
        "input_tokens": input_tokens, "output_tokens": output_tokens, "images": images,
        "requests_per_min": cost.capacity_mu_per_min
        / cost.model_units(input_tokens, output_tokens, images)}
    fields.update(overrides)
    return Measurement(**fields)


def exact_grid(cost: CostModel, *, images: tuple[int, ...] = ()) -> list[Measurement]:
    points = [exact_measurement(cost, i, o) for i in (64, 512, 2048) for o in (8, 64, 256)]
    return points + [exact_measurement(cost, 64, 8, n) for n in images]


def fit(measurements: list[Measurement], anchor: CostModel = TRUE):  # type: ignore[no-untyped-def]
    return fit_cost_model(measurements, anchor=anchor, engine="sim", model="tiny-llama")


# -- least squares --------------------------------------------------------------------
@pytest.mark.parametrize(
    "coefficients",
    [
        pytest.param([3.0, 0.5], id="two-unknowns"),
        pytest.param([1e-6, 2e-5, 4e-4], id="three-unknowns-tiny-scales"),
    ],
)
def test_least_squares_recovers_exact_coefficients(coefficients):
    rows = [[float(i), float(o), float(n)][: len(coefficients)]
            for i in (10, 200, 3000) for o in (1, 50) for n in (0, 2)]
    ys = [sum(c * v for c, v in zip(coefficients, row, strict=True)) for row in rows]
    assert least_squares(rows, ys) == pytest.approx(coefficients, rel=1e-9)


def test_least_squares_rejects_dependent_columns():
    with pytest.raises(CalibrationError, match="collinear"):
        least_squares([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]], [1.0, 2.0, 3.0])


# -- fitting the cost model -------------------------------------------------------------
@pytest.mark.parametrize(
    "images",
    [pytest.param((), id="tokens-only"), pytest.param((1, 4), id="with-images")],
)
def test_fit_cost_model_recovers_exact_coefficients_from_synthetic_rates(images):
    result = fit(exact_grid(TRUE, images=images))
    assert result.alpha == pytest.approx(TRUE.alpha, rel=1e-9)
    assert result.beta == TRUE.beta
    assert result.gamma == pytest.approx(TRUE.gamma, rel=1e-9)
    assert result.capacity_mu_per_min == pytest.approx(TRUE.capacity_mu_per_min, rel=1e-9)
    assert result.r_squared == pytest.approx(1.0)
    assert result.max_abs_residual_pct == pytest.approx(0.0, abs=1e-6)


def test_fit_cost_model_anchors_mu_scale_on_existing_beta():
    # Same engine, twice the β: every MU quantity doubles, rates do not change.
    doubled = TRUE.model_copy(update={"beta": 2 * TRUE.beta})
    result = fit(exact_grid(TRUE), anchor=doubled)
    assert result.alpha == pytest.approx(2 * TRUE.alpha)
    assert result.capacity_mu_per_min == pytest.approx(2 * TRUE.capacity_mu_per_min)
    assert result.delta == pytest.approx(result.alpha * TRUE.delta / TRUE.alpha)
    assert result.gamma == TRUE.gamma  # not measured without image points
    assert any("γ not measured" in note for note in result.notes)


@pytest.mark.parametrize(
    ("shapes", "fragment"),
    [
        pytest.param([(128, 16)] * 5, "1 distinct shape", id="all-the-same-point"),
        pytest.param([(128, 16), (512, 16), (2048, 16)], "two output lengths",
                     id="one-output-length"),
        pytest.param([(100, 10), (200, 20), (400, 40)], "collinear", id="in-proportional-to-out"),
    ],
)
def test_fit_cost_model_rejects_a_grid_that_cannot_separate_coefficients(shapes, fragment):
    measurements = [exact_measurement(TRUE, i, o) for i, o in shapes]
    with pytest.raises(CalibrationError, match=fragment):
        fit(measurements)


def test_fit_cost_model_fixes_a_negative_alpha_at_zero():
    free_prompts = TRUE.model_copy(update={"alpha": 0.0})
    noisy = [exact_measurement(free_prompts, i, o) for i in (64, 2048) for o in (8, 256)]
    # Long prompts measured a little faster than short ones: α would fit negative.
    noisy = [m.model_copy(update={"requests_per_min": m.requests_per_min
                                  * (1.03 if m.input_tokens > 1000 else 1.0)}) for m in noisy]
    result = fit(noisy)
    assert result.alpha == 0.0 and result.capacity_mu_per_min > 0
    assert any("α fitted below zero" in note for note in result.notes)


def test_fit_cost_model_flags_unsaturated_points():
    points = exact_grid(TRUE)
    points[0] = points[0].model_copy(update={"saturated": False})
    result = fit(points)
    assert not result.points[0].saturated
    assert any("1 grid point(s) never had a request queued" in n for n in result.notes)


# -- driving engines -------------------------------------------------------------------
async def test_calibrate_sim_engine_recovers_its_cost_model():
    engine = SimEngine(TRUE, seed=3, max_batch=8, time_scale=0.1)
    grid = CalibrationGrid(input_tokens=[64, 512], output_tokens=[8, 32], images=[2],
                           requests_per_point=32, concurrency=16, point_timeout_s=30)
    started = time.perf_counter()
    try:
        result = await calibrate(engine, grid, model="tiny-llama", anchor=TRUE)
    finally:
        await engine.close()
    assert time.perf_counter() - started < 5
    assert result.r_squared > 0.95
    assert result.alpha == pytest.approx(TRUE.alpha, rel=0.1)
    assert result.beta == TRUE.beta
    assert result.gamma == pytest.approx(TRUE.gamma, rel=0.1)
    assert result.capacity_mu_per_min == pytest.approx(TRUE.capacity_mu_per_min, rel=0.1)
    assert all(p.saturated for p in result.points)
    assert [(p.input_tokens, p.output_tokens, p.images) for p in result.points] == [
        (64, 8, 0), (64, 32, 0), (512, 8, 0), (512, 32, 0), (64, 8, 2)]


@pytest.mark.parametrize(
    ("grid", "fragment"),
    [
        pytest.param(CalibrationGrid(input_tokens=[128], output_tokens=[16]),
                     "1 distinct shape", id="one-point"),
        pytest.param(CalibrationGrid(input_tokens=[128, 512], output_tokens=[16, 64],
                                     images=[1]), "does not take images", id="images-for-echo"),
    ],
)
async def test_calibrate_refuses_before_driving_the_engine(grid, fragment):
    engine = EchoEngine()
    with pytest.raises(CalibrationError, match=fragment):
        await calibrate(engine, grid, model="tiny-llama", anchor=TRUE)
    assert engine.stats().requests_completed == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("128,512, 2048", [128, 512, 2048], id="spaces"),
        pytest.param("", [], id="empty"),
    ],
)
def test_parse_counts_reads_comma_separated_integers(text, expected):
    assert parse_counts(text, what="--inputs") == expected


@pytest.mark.parametrize("text", [pytest.param("12,abc", id="word"),
                                  pytest.param("0,4", id="zero")])
def test_parse_counts_rejects_garbage(text):
    with pytest.raises(CalibrationError, match="--inputs"):
        parse_counts(text, what="--inputs")


# -- the configuration entry ---------------------------------------------------------
CONTROL = """\
auth_required = false

[models.tiny-llama]  # a comment on the header
alpha = 0.5
beta = 0.02

[models.other]
alpha = 0.7

[tenants.acme]
limit_mu_per_min = 100.0
"""


def test_write_model_entry_replaces_only_its_own_table(tmp_path: Path):
    path = tmp_path / "control.toml"
    path.write_text(CONTROL)
    write_model_entry(path, "tiny-llama", TRUE)
    config = load_config(path)
    assert config.cost("tiny-llama") == TRUE
    assert config.cost("other").alpha == 0.7
    assert config.tenants["acme"].limit_mu_per_min == 100.0
    text = path.read_text()
    assert text.startswith("auth_required = false\n\n[models.tiny-llama]\n")
    assert text.endswith(CONTROL[CONTROL.index("[models.other]"):])


@pytest.mark.parametrize(
    ("before", "model"),
    [
        pytest.param(None, "tiny-llama", id="new-file"),
        pytest.param(CONTROL, "llama-3.1-8b", id="new-table-dotted-name"),
    ],
)
def test_write_model_entry_appends_a_missing_table(tmp_path: Path, before, model):
    path = tmp_path / "costs.toml"
    if before is not None:
        path.write_text(before)
    write_model_entry(path, model, TRUE)
    assert existing_cost(path, model) == TRUE
    if before is not None:
        assert path.read_text().startswith(before)


def test_write_model_entry_refuses_a_file_it_would_break(tmp_path: Path):
    path = tmp_path / "control.toml"
    original = "models = { tiny-llama = { alpha = 0.1 } }\n"
    path.write_text(original)
    with pytest.raises(CalibrationError, match="not written"):
        write_model_entry(path, "tiny-llama", TRUE)
    assert path.read_text() == original


def test_toml_entry_reads_back_as_the_cost_model():
    import tomllib

    doc = tomllib.loads(toml_entry("tiny-llama", TRUE))
    assert CostModel.model_validate(doc["models"]["tiny-llama"]) == TRUE
