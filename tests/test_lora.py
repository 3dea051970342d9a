"""LoRA checkpoints: the adapter under adapter/, a merged HF model under model/ that reproduces the
adapted policy; QLoRA and push_to_hub fail with one-line errors where they cannot run."""
from __future__ import annotations

import pytest
import torch

from rltk.schema import ConfigError

from rltk.validate import build_recipe
from tests.conftest import small_recipe_data

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merged_export_and_adapter_reproduce_the_adapted_model(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rltk.trainer.rl import RLTrainer

    recipe = build_recipe(small_recipe_data(tiny_model_dir, tmp_path / "run", model={"lora": LORA}))
    trainer = RLTrainer(recipe)
    try:
        policy = trainer.accelerator.unwrap_model(trainer.model)
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)
            for name, p in policy.named_parameters():
                if "lora_B" in name:  # zero at init: give the adapter an effect to reproduce
                    p.normal_(0, 0.2)
        ids = trainer.tokenizer("Q: 37+48=? A: \\boxed{85}", return_tensors="pt")["input_ids"]
        adapted = _logits(policy, ids)
        with trainer.reference() as ref:
            base_logits = _logits(ref, ids)
        checkpoint = trainer.save()
    finally:
        trainer.close()
    assert (adapted - base_logits).abs().max() > 1e-2  # the adapter matters
    merged = AutoModelForCausalLM.from_pretrained(checkpoint / "model")
    assert not any("lora" in k for k in merged.state_dict())  # a plain HF model
    assert torch.allclose(_logits(merged, ids), adapted, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert torch.allclose(_logits(base, ids), base_logits, atol=1e-6)  # reference = adapter disabled
    reloaded = PeftModel.from_pretrained(base, checkpoint / "adapter")
    assert torch.allclose(_logits(reloaded, ids), adapted, atol=1e-5)
    assert (checkpoint / "model" / "tokenizer_config.json").is_file()


def test_qlora_without_cuda_is_a_one_line_error(tiny_model_dir):
    from rltk.models import load_model

    if torch.cuda.is_available():
        pytest.skip("CUDA present: 4-bit loading may work here")
    recipe = build_recipe({"model": {"name_or_path": tiny_model_dir, "lora": {**LORA, "load_in_4bit": True}}})
    with pytest.raises(ConfigError, match="load_in_4bit") as err:
        load_model(tiny_model_dir, recipe.model)
    assert "\n" not in str(err.value)


def test_push_to_hub_offline_is_a_one_line_error(tmp_path, monkeypatch):
    from rltk.trainer.checkpoint import push_to_hub

    recipe = build_recipe({"trainer": {"push_to_hub": "someone/rltk-test"}})
    assert recipe.trainer.push_to_hub == "someone/rltk-test"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="trainer.push_to_hub: cannot upload to 'someone/rltk-test'") as err:
        push_to_hub(tmp_path, "someone/rltk-test")
    assert "\n" not in str(err.value) and "intact" in str(err.value)
