"""Estimating a request's cost before it runs. Pure.

Input tokens: the model's tokenizer when one is given; otherwise the
documented approximation of one token per 4 characters (English BPE
vocabularies average 3.5–4.5 characters per token), rounded up, plus 4
tokens per chat message for role markers.

Output tokens: ``min(max_tokens, q)`` where ``q`` is a high quantile of the
output lengths observed for the tenant × model, kept by a streaming,
mergeable log-bucket histogram (bounded memory, ~4% relative error); until
enough observations exist, a prior of ``min(max_tokens, prior_output_tokens)``.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterable

from pydantic import BaseModel, ConfigDict

from schemas.cost import CostModel
from schemas.events import InferenceRequest

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4


class StreamingQuantile:
    """Log-bucketed histogram: bucket i holds values in [g^(i-1), g^i)."""

    def __init__(self, relative_error: float = 0.04) -> None:
        self._gamma = (1 + relative_error) / (1 - relative_error)
        self._log_gamma = math.log(self._gamma)
        self._buckets: dict[int, int] = {}
        self._zeros = 0
        self.count = 0

    def add(self, value: float) -> None:
        self.add_many((value,))

    def add_many(self, values: Iterable[float]) -> None:
        """Observe ``values``; each distinct value is placed once (lengths repeat a lot)."""
        buckets, log_gamma = self._buckets, self._log_gamma
        for value, n in collections.Counter(values).items():
            self.count += n
            if value <= 0:
                self._zeros += n
                continue
            index = math.ceil(math.log(value) / log_gamma)
            buckets[index] = buckets.get(index, 0) + n

    def quantile(self, q: float) -> float:
        if self.count == 0:
            raise ValueError("no observations")
        rank = q * (self.count - 1)
        seen = self._zeros
        if rank < seen:
            return 0.0
        for index in sorted(self._buckets):
            seen += self._buckets[index]
            if seen > rank:
                return 2 * self._gamma**index / (self._gamma + 1)
        return 2 * self._gamma ** max(self._buckets) / (self._gamma + 1)


class Estimate(BaseModel):
    model_config = ConfigDict(frozen=True)

    input_tokens: int
    output_tokens: int
    images: int
    model_units: float  # MU reserved at admission


class CostEstimator:
    def __init__(
        self,
        *,
        quantile: float = 0.9,
        min_observations: int = 20,
        prior_output_tokens: int = 512,
        tokenizers: dict[str, Callable[[str], int]] | None = None,
    ) -> None:
        self._q = quantile
        self._min_obs = min_observations
        self._prior = prior_output_tokens
        self._tokenizers = tokenizers or {}
        self._outputs: dict[tuple[str, str], StreamingQuantile] = {}

    def count_input_tokens(self, request: InferenceRequest) -> int:
        count = self._tokenizers.get(request.model)
        if request.prompt is not None:
            text, overhead = request.prompt, 0
        else:
            messages = request.messages or []
            text = "".join(m.content for m in messages)
            overhead = TOKENS_PER_MESSAGE * len(messages)
        if count is not None:
            return count(text) + overhead
        return -(-len(text) // CHARS_PER_TOKEN) + overhead

    def expected_output_tokens(self, tenant: str, model: str, max_tokens: int) -> int:
        observed = self._outputs.get((tenant, model))
        if observed is None or observed.count < self._min_obs:
            return min(max_tokens, self._prior)
        return max(1, min(max_tokens, math.ceil(observed.quantile(self._q))))

    def estimate(self, request: InferenceRequest, cost: CostModel) -> Estimate:
        inputs = self.count_input_tokens(request)
        outputs = self.expected_output_tokens(request.tenant, request.model, request.max_tokens)
        images = len(request.images)
        return Estimate(input_tokens=inputs, output_tokens=outputs, images=images,
                        model_units=cost.model_units(inputs, outputs, images))

    def observe(self, tenant: str, model: str, output_tokens: int) -> None:
        self.sketch(tenant, model).add(output_tokens)

    def sketch(self, tenant: str, model: str) -> StreamingQuantile:
        """The tenant×model output-length sketch, to observe a batch into."""
        key = (tenant, model)
        sketch = self._outputs.get(key)
        if sketch is None:
            sketch = self._outputs[key] = StreamingQuantile()
        return sketch
