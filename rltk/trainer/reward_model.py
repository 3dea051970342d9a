"""A reward model as a reward (``rewards: [{model: PATH_OR_ID, weight: ...}]``): a
sequence-classification model scoring each (prompt, completion) pair, as TRL's GRPOTrainer does with
a model among its ``reward_funcs``. A conversational pair is rendered with the reward model's own
chat template (prompt messages + the assistant completion), a standard one is the prompt text
followed by the completion. Scored in batches of ``batch_size`` pairs, without gradient, on the
trainer's device; placed like the reference model (sharded under ZeRO-3:
:func:`rltk.trainer.distributed.prepare_frozen`), loaded in ``model.dtype``.
"""
from __future__ import annotations

import torch

from rewards.registry import RewardFunction, load_reward_function
from rltk.models import torch_dtype
from rltk.schema import ConfigError, ModelConfig, Recipe, RewardSpec
from rltk.trainer.distributed import prepare_frozen


class RewardModel:
    """Called like a reward function: ``scorer(prompts=..., completions=..., **ignored) -> list[float]``."""

    def __init__(self, spec: RewardSpec, model_cfg: ModelConfig, accelerator):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.__name__ = spec.label  # how errors and metrics name it
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(spec.model, trust_remote_code=model_cfg.trust_remote_code)
            model = AutoModelForSequenceClassification.from_pretrained(
                spec.model, num_labels=1, dtype=torch_dtype(model_cfg.dtype),
                trust_remote_code=model_cfg.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"rewards: cannot load reward model '{spec.model}': {str(exc).splitlines()[0]}") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model.config.pad_token_id = self.tokenizer.pad_token_id  # the score is read at each row's last token
        self.model = prepare_frozen(model, accelerator)
        self.device = accelerator.device
        self.batch_size = spec.batch_size

    def text(self, prompt, completion) -> str:
        if isinstance(prompt, list):
            return self.tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        return prompt + completion

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        texts = [self.text(p, c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                   padding_side="right", add_special_tokens=False).to(self.device)
            scores += self.model(**batch).logits[:, 0].float().tolist()
        return scores


def build_rewards(recipe: Recipe, accelerator) -> list[RewardFunction]:
    """The recipe's rewards, in order: functions checked against TRL's call (rewards.registry), and
    reward models loaded and placed (call after the policy is prepared)."""
    out = []
    for spec in recipe.rewards:
        if spec.model is not None:
            out.append(RewardFunction(spec.label, RewardModel(spec, recipe.model, accelerator), spec.weight))
        else:
            try:
                out.append(load_reward_function(spec.name, spec.weight, spec.kwargs))
            except ValueError as exc:
                raise ConfigError(f"rewards: {exc}") from None
    return out
