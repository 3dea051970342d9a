"""Shared fixtures: offline mode, a tiny model built once per session, small recipes."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-initialised tiny Qwen2 + character tokenizer as an HF directory."""
    from rltk.models import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny"))


# correctness of the 16 completions (4 prompts × 4) of the 2-process PACED step tests: pass rates
# 0.25, 0.5, 0.75, 0, so w(p) = p(1 - p) differs by prompt and Σw differs by rank
PACED_CORRECT = "[1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0]"


def small_recipe_data(model_dir: str, output_dir, **sections) -> dict:
    """A recipe small enough for a few-second RL run of the tiny model."""
    data = {
        "model": {"name_or_path": model_dir},
        "data": {"source": "builtin", "levels": [1], "template": "compact", "num_train": 64, "num_test": 8},
        "rollout": {"group_size": 4, "max_new_tokens": 8, "temperature": 1.0},
        "trainer": {"steps": 2, "prompts_per_step": 4, "micro_batch_size": 8, "lr": 1e-3,
                    "output_dir": str(output_dir), "seed": 0},
        "eval": {"n": 2, "temperature": 1.0, "top_p": 1.0, "maj": False},
        "verifier": {"deadline_s": 3.0, "num_workers": 1},
        "logging": {"progress": False},
        # math (correctness, usually 0 for a random model) + a dense reward so advantages are non-zero
        "rewards": [{"name": "math"}, {"name": "tests.user_stages:digit_share_reward"}],
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values) if isinstance(values, dict) else data.__setitem__(section, values)
    return data
