"""The per-GPU memory figures of ``rltk check`` (rltk/memory.py) against measured peak memory of
real-shaped models on CPU: vocabulary 151,936, a small hidden size, completions up to 3,072 tokens.
Estimated = activations + log-prob working set + gradients (4 bytes per parameter); measured = the
peak resident-set increase of one forward + backward in a fresh process. Within ±25%."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from rltk.memory import ModelShape, StepShape, activation_bytes, logprob_bytes, step_working_set
from tests.conftest import run_command

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed" / "memory_worker.py"
VOCAB = 151936


def _measure(shape: ModelShape, step: StepShape) -> dict:
    spec = {"vocab": shape.vocab, "hidden": shape.hidden, "intermediate": shape.intermediate, "layers": shape.layers,
            "heads": shape.heads, "kv_heads": shape.kv_heads, "tied": shape.tied, "rows": step.rows,
            "prompt": step.prompt, "completion": step.completion, "attn": step.attn_implementation or "sdpa",
            "checkpointing": step.gradient_checkpointing, "head_chunk": step.head_chunk}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = run_command([sys.executable, str(WORKER), json.dumps(spec)], env, cwd=str(ROOT))  # stderr on a timeout
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


SMALL = ModelShape(hidden=64, layers=2, intermediate=256, heads=4, kv_heads=2, vocab=VOCAB, tied=True)
WIDER = ModelShape(hidden=256, layers=4, intermediate=1024, heads=4, kv_heads=2, vocab=VOCAB, tied=False)
CASES = {
    "T1024": (SMALL, StepShape(rows=2, prompt=32, completion=1024, compute_dtype="float32")),
    "T3072": (SMALL, StepShape(rows=2, prompt=32, completion=3072, compute_dtype="float32")),
    "T3072_checkpointing": (SMALL, StepShape(rows=2, prompt=32, completion=3072, compute_dtype="float32",
                                             gradient_checkpointing=True)),
    "T3072_eager_attention": (SMALL, StepShape(rows=2, prompt=32, completion=3072, compute_dtype="float32",
                                               attn_implementation="eager")),
    "T2048_wider_untied": (WIDER, StepShape(rows=2, prompt=32, completion=2048, compute_dtype="float32")),
    "T1024_dense_logits": (SMALL, StepShape(rows=1, prompt=32, completion=1024, compute_dtype="float32", head_chunk=0)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_estimate_is_within_a_quarter_of_measured_peak(name):
    shape, step = CASES[name]
    measured = _measure(shape, step)
    estimate = sum(step_working_set(shape, step).values()) + 4 * shape.params
    assert abs(shape.params - measured["params"]) < 0.01 * measured["params"]  # the shape's parameter count
    assert 0.75 <= estimate / measured["increase"] <= 1.25, (name, estimate / 2**20, measured["increase"] / 2**20)


def test_known_model_shapes_give_their_parameter_counts():
    from rltk.launch_check import KNOWN_MODELS

    expected = {"Qwen/Qwen2.5-Math-1.5B": 1.54e9, "Qwen/Qwen2.5-Math-7B": 7.62e9, "Qwen/Qwen3-4B": 4.02e9,
                "Qwen/Qwen2.5-Math-72B-Instruct": 72.7e9}
    for name, params in expected.items():
        assert abs(KNOWN_MODELS[name].params - params) < 0.01 * params, name


def test_figures_scale_as_the_model_says():
    """Checkpointing keeps one layer's activations plus every layer's input; the chunked head's
    working set does not grow with the rows; the dense one does; eager attention adds S²."""
    shape = ModelShape(hidden=1536, layers=28, intermediate=8960, heads=12, kv_heads=2, vocab=151936, tied=True)
    step = StepShape(rows=16, prompt=1024, completion=3072)
    plain, ckpt = activation_bytes(shape, step), activation_bytes(shape, StepShape(**{**step.__dict__,
                                                                                      "gradient_checkpointing": True}))
    assert ckpt < plain / 5
    more_rows = StepShape(**{**step.__dict__, "rows": 32})
    assert logprob_bytes(shape, more_rows) - logprob_bytes(shape, step) < 1.1 * 2 * 16 * 3072 * 1536 * 4  # only h
    dense = StepShape(**{**step.__dict__, "head_chunk": 0})
    assert logprob_bytes(shape, dense) > 100 * 2**30  # the [16, 3072, 151936] float32 logits, four times
    eager = StepShape(**{**step.__dict__, "attn_implementation": "eager"})
    assert activation_bytes(shape, eager) - plain == 28 * 16 * 12 * 4096**2 * 2
