"""A tiny Llama-style causal LM with random weights and a locally trained tokenizer.

Nothing loads weights from a hub (DESIGN.md, "Real components"): tests, the
demo and CPU hosts build this model instead, with ``tokenweir model
make-tiny DIR``. The directory is an ordinary Hugging Face model directory
(``config.json``, ``generation_config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json``), so the transformers engine
loads it exactly as it would a real checkpoint.

- **Tokenizer.** Byte-level BPE (as GPT-2 and Llama 3 use) trained with the
  ``tokenizers`` library on the built-in corpus below: any text encodes, no
  unknown token. Special tokens ``<pad>`` (0), ``<s>`` (1, prepended to
  every encoding) and ``</s>`` (2, end of sequence). Padding is on the left,
  as batched generation needs.
- **Weights.** Random, from ``torch.manual_seed(seed)``: the same spec and
  seed give the same weights. The output-projection rows of the special
  tokens are zero, so their logits are always exactly 0 while the best of
  the ~1000 random logits is positive: greedy decoding never ends a sequence
  or emits padding on its own, and tests control output lengths through
  ``max_tokens`` (the engine's ``eos_token_ids`` option covers stopping).
  Sampling can still draw ``</s>``.

torch, transformers and tokenizers come with the ``inference`` extra; they
are imported inside :func:`make_tiny_model`, so this module imports without them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from workers import ModelBuildError

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
# A minimal chat template, so that requests with messages exercise the
# tokenizer's template path as they would on a real instruction-tuned model.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>"
    "{{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>"
    "{% endif %}"
)

# The training corpus: enough varied English for ~1000 merges. Its content
# only shapes which character sequences become single tokens.
_CORPUS = """\
Clients produce inference requests to a Kafka topic, and agents authenticate them,
price them in model units, enforce each tenant's limits and reservations, and route
admitted requests to shard partitions. Workers consume their shards, run the engine
and stream results back. Token usage flows back through Kafka to meter tenants, to
drive the autoscaler and to land in ClickHouse for analytics.
A model unit is the cost of a request on one model and hardware: input tokens,
output tokens and images each have a price, with a discount on cached input.
The router picks a shard by load, with stickiness for a session or prefix key,
only among shards owned by healthy workers. The policy keeps utilisation near a
target, scales up fast and down slowly, and emits decisions as events.
A worker sends minimal probe requests through its engine at the highest priority
when no real request finished recently. Missed heartbeats, failed probes and stalled
token progress turn into states: healthy, suspect, unhealthy.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.
Once upon a time there was a little model that answered every question with a story.
It read the prompt, thought for a while, and wrote one token after another until it
reached the end of the sequence or the limit it was given. Some stories were long,
some were short, and some stopped in the middle of a sentence.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday are the days of the
week; January, February, March, April, May, June, July, August, September, October,
November and December are the months of the year.
def generate(prompt, max_tokens=16): return model(prompt)[:max_tokens]
{"tenant": "acme", "model": "tiny-llama", "prompt": "hello there world", "max_tokens": 64}
SELECT tenant, sum(output_tokens) FROM usage GROUP BY tenant ORDER BY 2 DESC LIMIT 10;
hello world, hello kafka, hello there, good morning, good evening, thank you, please.
"""


class TinyModelSpec(BaseModel):
    """Shape of the tiny model; the defaults generate hundreds of tokens per second on one core."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: Annotated[int, Field(ge=300, le=8192)] = 1024  # tokenizer target, tokens
    hidden_size: Annotated[int, Field(ge=8, le=1024)] = 64
    intermediate_size: Annotated[int, Field(ge=8, le=4096)] = 128
    num_layers: Annotated[int, Field(ge=1, le=16)] = 2
    num_heads: Annotated[int, Field(ge=1, le=32)] = 4
    num_kv_heads: Annotated[int, Field(ge=1, le=32)] = 2
    max_positions: Annotated[int, Field(ge=64, le=32768)] = 1024  # tokens, prompt + output
    seed: int = 0


class TinyModel(BaseModel):
    """What :func:`make_tiny_model` wrote."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    directory: Path
    vocab_size: int  # tokens, the tokenizer's actual size
    parameters: int
    files: list[str]


def _corpus() -> list[str]:
    lines = _CORPUS.splitlines()
    # Numbers and the calibration prompts' shape ("c3x17 tok tok"), so that
    # digits and common prompt words get merges of their own.
    lines += [" ".join(str(n) for n in range(start, start + 50)) for start in range(0, 1000, 50)]
    lines += [f"c{p}x{i} tok tok tok" for p in range(10) for i in range(10)]
    return lines


def make_tiny_model(directory: Path, spec: TinyModelSpec | None = None, *,
                    overwrite: bool = False) -> TinyModel:
    """Build and save the tiny model and its tokenizer into ``directory``.

    Raises :class:`workers.ModelBuildError` when the directory holds files
    (unless ``overwrite``), the spec is inconsistent, or torch, transformers
    or tokenizers is missing.
    """
    spec = spec or TinyModelSpec()
    if spec.hidden_size % spec.num_heads or spec.num_heads % spec.num_kv_heads:
        raise ModelBuildError(
            f"hidden_size {spec.hidden_size} must divide into {spec.num_heads} heads, and "
            f"heads into {spec.num_kv_heads} key/value heads")
    if directory.exists() and not directory.is_dir():
        raise ModelBuildError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise ModelBuildError(f"{directory} is not empty (pass overwrite to replace its model)")
    try:
        import torch
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
        from transformers import (
            GenerationConfig,
            LlamaConfig,
            LlamaForCausalLM,
            PreTrainedTokenizerFast,
        )
    except ImportError as exc:
        raise ModelBuildError(
            f"building a model needs torch, transformers and tokenizers "
            f"(pip install 'tokenweir[inference]'): {exc}") from exc

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=[PAD, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    raw.train_from_iterator(_corpus(), trainer=trainer)
    pad_id, bos_id, eos_id = (raw.token_to_id(t) for t in (PAD, BOS, EOS))
    raw.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        padding_side="left", model_max_length=spec.max_positions, chat_template=CHAT_TEMPLATE)
    vocab_size = len(tokenizer)

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions, bos_token_id=bos_id, eos_token_id=eos_id,
        pad_token_id=pad_id, tie_word_embeddings=False)
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # See the module doc: special tokens never win a greedy step.
        model.lm_head.weight[[pad_id, bos_id, eos_id]] = 0.0
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id,
                                               pad_token_id=pad_id, do_sample=False)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return TinyModel(directory=directory, vocab_size=vocab_size,
                     parameters=sum(p.numel() for p in model.parameters()),
                     files=sorted(p.name for p in directory.iterdir()))
