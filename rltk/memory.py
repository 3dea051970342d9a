"""Per-GPU memory of a training step, from the model's shape alone (``rltk check``).

Three parts besides the model states (weights, gradients, optimizer; rltk/launch_check.py):

- **activations** of one micro-batch: what autograd keeps from the forward for the backward, per
  token and decoder layer of a Qwen2/Llama-style block (RMSNorm → q/k/v → RoPE → SDPA → o_proj →
  RMSNorm → SwiGLU), counted tensor by tensor:
  norms 2·H each (input and normalised), q, k, v, the rotated halves and the rotated q/k
  (3·Hq + 3·Hkv), the key/value heads repeated to the query heads and the attention output before
  and after its transpose (4·Hq), gate, up, SiLU(gate), their product (4·I), plus H for the
  residual stream the next block reads — ``5·H + 7·Hq + 4·Hkv + 4·I`` values (``_PER_TOKEN_LAYER``).
  Norm values are float32; the rest are in the compute dtype. Eager attention adds the
  ``[heads, S, S]`` probabilities per layer; SDPA and FlashAttention keep only a log-sum-exp. A
  padding mask ``[S, S]`` (one byte per entry) is kept per row except under FlashAttention-2.
  With gradient checkpointing only each layer's input (H per token and layer, in the weights' dtype:
  float32 masters under autocast, bf16 under DeepSpeed) is kept, plus one layer's activations
  while it is recomputed.
- **log-prob working set**: the chunked LM head holds one ``[chunk, V]`` float32 logits buffer (and
  its compute-dtype matmul output under bf16) and a ``[V, H]`` weight-gradient buffer at a time
  (rltk/algos/linear_logps.py); the dense path (``trainer.head_chunk_tokens: 0``) holds about four
  ``[rows, T, V]`` float32 tensors (logits, their temperature-scaled copy, log-softmax and its
  gradient).
- the final hidden states ``[rows, T, H]`` and their gradient.

The figures are validated against the measured peak memory of real-shaped models on CPU
(vocabulary 151,936, a small hidden size, T up to 3,072): tests/test_memory.py, within ±25%.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    """What the memory figures need of a decoder-only model (a Hugging Face ``config.json``)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int | None = None  # default hidden / heads (Qwen3 sets it apart)
    context: int | None = None

    @property
    def q_width(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_width(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    @property
    def params(self) -> float:
        """Parameter count: embeddings (+ an untied head), attention with q/k/v biases, SwiGLU, norms."""
        h = self.hidden
        attention = h * self.q_width + 2 * h * self.kv_width + self.q_width * h + self.q_width + 2 * self.kv_width
        block = attention + 3 * h * self.intermediate + 2 * h
        return float(self.vocab * h * (1 if self.tied else 2) + self.layers * block + h)

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape | None":
        """From a ``config.json`` mapping; ``None`` if it lacks a decoder's sizes."""
        try:
            return cls(hidden=int(config["hidden_size"]), layers=int(config["num_hidden_layers"]),
                       intermediate=int(config["intermediate_size"]), heads=int(config["num_attention_heads"]),
                       kv_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
                       vocab=int(config["vocab_size"]), tied=bool(config.get("tie_word_embeddings", False)),
                       head_dim=config.get("head_dim"), context=config.get("max_position_embeddings"))
        except (KeyError, TypeError, ValueError):
            return None

    @classmethod
    def from_directory(cls, path: str | Path) -> "ModelShape | None":
        config = Path(path).expanduser() / "config.json"
        if not config.is_file():
            return None
        try:
            return cls.from_config(json.loads(config.read_text()))
        except (OSError, json.JSONDecodeError):
            return None


def bytes_per_value(dtype: str) -> int:
    """Bytes of one value of a recipe dtype name: 4 for float32, 2 for bfloat16/float16 (and
    ``auto``, which loads the checkpoints these recipes use in bf16)."""
    return 4 if dtype == "float32" else 2


def per_token_layer_values(shape: ModelShape) -> tuple[int, int]:
    """Values kept per token and decoder layer: (float32 norm values, compute-dtype values)."""
    norm = 5 * shape.hidden
    rest = 7 * shape.q_width + 4 * shape.kv_width + 4 * shape.intermediate
    return norm, rest


@dataclass(frozen=True)
class StepShape:
    """One micro-batch of the training forward: ``rows`` sequences of ``prompt + completion`` tokens."""

    rows: int
    prompt: int
    completion: int
    compute_dtype: str = "bfloat16"  # float32 | bfloat16 | float16
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None  # eager | sdpa | flash_attention_2 (None: sdpa)
    head_chunk: int = 1024  # trainer.head_chunk_tokens; 0 = dense logits
    weight_dtype: str = "float32"  # the trained weights: the residual stream's dtype and the LM-head gradient's

    @property
    def sequence(self) -> int:
        return self.prompt + self.completion


def activation_bytes(shape: ModelShape, step: StepShape) -> float:
    """What the forward keeps for the backward, whole micro-batch (see the module docstring)."""
    b = bytes_per_value(step.compute_dtype)
    tokens = step.rows * step.sequence
    norm, rest = per_token_layer_values(shape)
    layer = tokens * (4 * norm + b * rest)  # one decoder layer's activations
    if step.attn_implementation == "eager":
        layer += step.rows * shape.heads * step.sequence**2 * b
    residual = tokens * shape.hidden * bytes_per_value(step.weight_dtype)  # a layer's input: the weights' dtype
    kept = residual * shape.layers + layer if step.gradient_checkpointing else layer * shape.layers
    if step.attn_implementation != "flash_attention_2":
        kept += step.rows * step.sequence**2  # the boolean padding mask, shared by the layers
    return float(kept)


def logprob_bytes(shape: ModelShape, step: StepShape) -> float:
    """The LM head's working set during the backward of the log-probs, plus the final hidden states
    and their gradient."""
    b = bytes_per_value(step.compute_dtype)
    positions = step.rows * step.completion
    final = 2 * positions * shape.hidden * 4
    if step.head_chunk == 0:
        return float(4 * positions * shape.vocab * 4 + final)
    chunk = min(step.head_chunk, positions)
    logits = chunk * shape.vocab * (4 + (b if b != 4 else 0))
    weight_grad = 2 * shape.vocab * shape.hidden * bytes_per_value(step.weight_dtype)  # its buffer and one matmul result
    return float(logits + weight_grad + final)


def step_working_set(shape: ModelShape, step: StepShape) -> dict[str, float]:
    """Bytes of the two parts a micro-batch adds on top of the model states."""
    return {"activations": activation_bytes(shape, step), "log-prob working set": logprob_bytes(shape, step)}
