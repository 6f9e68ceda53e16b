"""The model-unit cost model: one currency for limits, routing and scaling."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class CostModel(BaseModel):
    """``mu = α·input + β·output + γ·images − δ·cached_input`` for one (model, hardware).

    The defaults are placeholders of the right shape (decode ≫ prefill per
    token) until ``tokenweir calibrate`` fits real coefficients.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: Annotated[float, Field(ge=0)] = 0.001  # MU per input token
    beta: Annotated[float, Field(ge=0)] = 0.01  # MU per output token
    gamma: Annotated[float, Field(ge=0)] = 0.5  # MU per image
    delta: Annotated[float, Field(ge=0)] = 0.0008  # MU refunded per cached input token
    capacity_mu_per_min: Annotated[float, Field(gt=0)] = 6000.0  # one replica, MU/min

    def model_units(
        self, input_tokens: int, output_tokens: int, images: int = 0, cached_tokens: int = 0
    ) -> float:
        cached = min(cached_tokens, input_tokens)
        return max(
            0.0,
            self.alpha * input_tokens
            + self.beta * output_tokens
            + self.gamma * images
            - self.delta * cached,
        )
