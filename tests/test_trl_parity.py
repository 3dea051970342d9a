"""Parity of rltk's policy loss and gradients with TRL 1.16's ``GRPOTrainer``.

rltk owns its RL loop (docs/design.md §2), so nothing forces its loss to agree with the reference
implementation users know. These tests pin it: on one tiny Qwen2 and one batch (left-padded prompts
of different lengths, right-padded completions of different lengths, advantages from rltk's
``grpo`` estimator, sampling temperature 0.7), TRL's ``GRPOTrainer._compute_loss(model, inputs)`` and
rltk's ``RLTrainer.accumulate_gradients(batch, rows)`` must give the same loss (atol 1e-5) and the
same gradient on every parameter (max abs diff 1e-5), for

* TRL ``loss_type="grpo"``    ↔ rltk aggregation ``seq_mean_token_mean``,
* TRL ``loss_type="dapo"``    ↔ rltk aggregation ``token_mean``,
* TRL ``loss_type="dr_grpo"`` ↔ rltk aggregation ``seq_mean_token_sum_norm`` (TRL's
  ``max_completion_length`` = rltk's ``rollout.max_new_tokens``),

with loss ``ppo_clip`` (TRL ``epsilon`` / ``epsilon_high`` ↔ rltk ``epsilon_low`` / ``epsilon_high``),
on-policy (no old log-probs: ratio ≡ 1 in value, gradient through it) and off-policy (perturbed old
log-probs, so clipping is active on both sides), and with a k3 KL penalty (TRL ``beta`` with
``ref_per_token_logps`` ↔ rltk term ``{name: kl, coef: beta, estimator: k3}``).

TRL conventions mirrored in the setup (none of them is an rltk bug):

* TRL is called on the whole batch at once (its ``gradient_accumulation_steps`` = 1 and
  ``steps_per_generation`` = 1), while rltk cuts the same rows into two micro-batches: the parity
  then also checks that rltk's step normaliser makes micro-batching invisible (docs/algorithms/reference.md §0.3).
  With gradient accumulation TRL divides ``grpo``/``dr_grpo`` losses by the number of accumulation
  steps, and ``dapo`` by ``num_items_in_batch``, the token count of the whole generation batch; we
  pass that count (one process) in ``inputs["num_items_in_batch"]`` exactly as TRL's sampler does.
* TRL's default ``use_bias_correction_kl=True`` multiplies the k3 KL by the (gradient-carrying)
  ratio ρ; rltk's ``kl`` term is the plain k3 estimator of docs/algorithms/reference.md §0.4, so the KL case runs
  TRL with ``use_bias_correction_kl=False``.
* TRL's forward passes no ``position_ids``: its left-padded rows get positions shifted by their pad
  count, while rltk passes ``cumsum(mask) − 1``. Qwen2's rotary embedding only sees relative
  positions, so both are the same function up to float rounding; the log-prob test below bounds it.
* TRL is given the advantages, old and reference log-probs through ``inputs`` (its sampler would
  compute them with ``eps = 1e-4`` in the std instead of rltk's 1e-6); the test compares the loss,
  not the advantage estimator.
* Activation (gradient) checkpointing is off in TRL (its default is on): it changes speed, not values.
* Every row of the batch has at least one completion token (EOS is in the mask) and all are kept.
  Rows that are masked out entirely (rltk drops them with ``keep``/``mask_truncated``; TRL zeroes
  them with ``mask_truncated_completions``) are a deliberate difference: TRL still counts them in the
  ``grpo`` mean and the ``dr_grpo`` sequence count, rltk removes them from the normaliser
  (docs/algorithms/reference.md §0.3–0.4).
"""
from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass, replace

import pytest
import torch

from rltk.algos.types import Advantages, Rollouts
from rltk.validate import build_recipe
from rltk.trainer.logprobs import TokenBatch, forward_logps
from rltk.trainer.batch import RolloutBatch
from tests.conftest import small_recipe_data

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

TEMPERATURE = 0.7
MAX_NEW_TOKENS = 10  # > the batch's completion width (8): Dr. GRPO must divide by this, not by the width
GROUP_SIZE = 4
LOSS_ATOL = 1e-5
GRAD_ATOL = 1e-5

# TRL loss_type -> rltk aggregation
AGGREGATIONS = {"grpo": "seq_mean_token_mean", "dapo": "token_mean", "dr_grpo": "seq_mean_token_sum_norm"}


@dataclass(frozen=True)
class Case:
    loss_type: str
    off_policy: bool = False
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float = 0.28

    @property
    def id(self) -> str:
        policy = "off-policy" if self.off_policy else "on-policy"
        return f"{self.loss_type}-{policy}" + (f"-beta{self.beta}" if self.beta else "")


CASES = [
    *(Case(loss_type) for loss_type in AGGREGATIONS),
    *(Case(loss_type, off_policy=True) for loss_type in AGGREGATIONS),
    Case("grpo", off_policy=True, beta=0.04),
    Case("dapo", beta=0.1, epsilon=0.1, epsilon_high=0.1),
]


# ---------------------------------------------------------------------------------------------- the batch
def _parity_batch(vocab_size: int, pad_id: int, eos_id: int) -> tuple[TokenBatch, torch.Tensor]:
    """2 groups × 4 completions with varied prompt lengths (left-padded) and completion lengths
    (right-padded, EOS-terminated except the full-width ones); returns tokens and rewards."""
    gen = torch.Generator().manual_seed(1234)
    prompt_lengths = [7, 7, 7, 7, 4, 4, 4, 4]  # two prompts, each repeated for its group
    completion_lengths = [8, 3, 5, 1, 8, 6, 2, 4]
    n, width_p, width_c = len(prompt_lengths), max(prompt_lengths), max(completion_lengths)
    prompt_ids = torch.full((n, width_p), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros(n, width_p, dtype=torch.long)
    completion_ids = torch.full((n, width_c), pad_id, dtype=torch.long)
    completion_mask = torch.zeros(n, width_c, dtype=torch.long)
    prompts = {}
    for i, (lp, lc) in enumerate(zip(prompt_lengths, completion_lengths)):
        group = i // GROUP_SIZE
        if group not in prompts:
            prompts[group] = torch.randint(3, vocab_size, (lp,), generator=gen)
        prompt_ids[i, width_p - lp:] = prompts[group]
        prompt_mask[i, width_p - lp:] = 1
        completion_ids[i, :lc] = torch.randint(3, vocab_size, (lc,), generator=gen)
        if lc < width_c:
            completion_ids[i, lc - 1] = eos_id
        completion_mask[i, :lc] = 1
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    return TokenBatch(prompt_ids, prompt_mask, completion_ids, completion_mask), rewards


@pytest.fixture(scope="module")
def parity_setup(tiny_model_dir):
    """The shared batch, its grpo advantages, and perturbed old/ref log-probs (fixed per module)."""
    from rltk.algos.pipeline import AlgorithmPipeline
    from rltk.models import load_tokenizer
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokens, rewards = _parity_batch(model.config.vocab_size, tokenizer.pad_token_id, tokenizer.eos_token_id)
    mask = tokens.completion_mask.float()
    rollouts = Rollouts(group_ids=torch.arange(2).repeat_interleave(GROUP_SIZE), rewards=rewards,
                        correct=rewards.bool(), completion_mask=mask,
                        truncated=~(tokens.completion_ids == tokenizer.eos_token_id).any(-1))
    advantages, _ = AlgorithmPipeline([{"name": "grpo"}]).compute_advantages(rollouts)
    with torch.no_grad():
        current = forward_logps(model, tokens, TEMPERATURE).logps * mask
    gen = torch.Generator().manual_seed(99)
    # |noise| ~ 0.3 puts many ratios outside [0.8, 1.28]: clipping is active in the off-policy cases
    old = (current + 0.3 * torch.randn(current.shape, generator=gen)) * mask
    ref = (current + 0.5 * torch.randn(current.shape, generator=gen)) * mask
    return {"tokens": tokens, "rollouts": rollouts, "advantages": advantages, "old": old, "ref": ref}


# ---------------------------------------------------------------------------------------------- both sides
def _trl_trainer(model_dir: str, case: Case, output_dir):
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(output_dir), report_to="none", use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=8, num_generations=GROUP_SIZE, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, max_completion_length=MAX_NEW_TOKENS,
        temperature=TEMPERATURE, loss_type=case.loss_type, beta=case.beta, epsilon=case.epsilon,
        epsilon_high=case.epsilon_high, importance_sampling_level="token", top_entropy_quantile=1.0,
        entropy_coef=0.0, use_bias_correction_kl=False, use_vllm=False, activation_checkpointing=False,
        save_strategy="no", logging_strategy="no", seed=0,
    )
    train = datasets.Dataset.from_dict({"prompt": ["Q: 1+1=? A:"] * 8})
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=model_dir, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                              args=args, train_dataset=train)
    return trainer


def _trl_loss_and_grads(trainer, setup, case: Case):
    """TRL's own loss function on the batch, in train mode with one accumulation step."""
    tokens = setup["tokens"]
    inputs = {
        "prompt_ids": tokens.prompt_ids, "prompt_mask": tokens.prompt_mask,
        "completion_ids": tokens.completion_ids, "completion_mask": tokens.completion_mask,
        "advantages": setup["advantages"].values.float(),
        # what TRL's sampler stores: the token count of the (one-process) generation batch
        "num_items_in_batch": tokens.completion_mask.sum(),
    }
    if case.off_policy:
        inputs["old_per_token_logps"] = setup["old"]
    if case.beta:
        inputs["ref_per_token_logps"] = setup["ref"]
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; 1 = no accumulation
    model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    clipped = trainer._metrics["train"]["clip_ratio/region_mean"][-1]
    return loss.item(), grads, clipped


def _rltk_trainer(model_dir: str, case: Case, output_dir):
    from rltk.trainer.rl import RLTrainer

    terms = [{"name": "kl", "coef": case.beta, "estimator": "k3"}] if case.beta else []
    data = small_recipe_data(
        model_dir, output_dir,
        rollout={"group_size": GROUP_SIZE, "max_new_tokens": MAX_NEW_TOKENS, "temperature": TEMPERATURE},
        trainer={"prompts_per_step": 2, "micro_batch_size": GROUP_SIZE},  # 2 micro-batches of one group
        algorithm={"advantage": [{"name": "grpo"}], "aggregation": AGGREGATIONS[case.loss_type], "terms": terms,
                   "loss": {"name": "ppo_clip", "epsilon_low": case.epsilon, "epsilon_high": case.epsilon_high}},
    )
    return RLTrainer(build_recipe(data))


def _rltk_loss_and_grads(trainer, setup, case: Case):
    """rltk's trainer path: ``accumulate_gradients`` on a RolloutBatch of the same tensors."""
    rollouts = setup["rollouts"]
    updates = {}
    if case.off_policy:
        updates["old_logps"] = setup["old"]
    if case.beta:
        updates["ref_logps"] = setup["ref"]
    batch = RolloutBatch(setup["tokens"], replace(rollouts, **updates), Advantages(setup["advantages"].values))
    trainer.optimizer.zero_grad(set_to_none=True)
    metrics = trainer.accumulate_gradients(batch, torch.arange(rollouts.num_completions))
    model = trainer.accelerator.unwrap_model(trainer.model)
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    clipped = metrics.get("ppo_clip/clip_low", 0.0) + metrics.get("ppo_clip/clip_high", 0.0)
    return metrics["loss"], grads, clipped


# ---------------------------------------------------------------------------------------------- tests
def test_logps_match_trl(tiny_model_dir, parity_setup, tmp_path):
    """Per-token log-probs (temperature-scaled, left-padded prompts) agree with TRL's fused LM head."""
    trainer = _trl_trainer(tiny_model_dir, Case("grpo"), tmp_path / "trl")
    tokens = parity_setup["tokens"]
    with torch.no_grad():
        theirs, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([tokens.prompt_ids, tokens.completion_ids], 1),
            torch.cat([tokens.prompt_mask, tokens.completion_mask], 1), tokens.completion_ids.shape[1])
        ours = forward_logps(trainer.model, tokens, TEMPERATURE).logps
    mask = tokens.completion_mask.bool()
    assert (ours[mask] - theirs[mask]).abs().max() < 1e-5


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_loss_and_gradients_match_trl(tiny_model_dir, parity_setup, tmp_path, case):
    """Same loss and per-parameter gradients as TRL's ``_compute_loss`` for the mapped settings."""
    trl_trainer = _trl_trainer(tiny_model_dir, case, tmp_path / "trl")
    trl_loss, trl_grads, trl_clipped = _trl_loss_and_grads(trl_trainer, parity_setup, case)
    rltk_trainer = _rltk_trainer(tiny_model_dir, case, tmp_path / "rltk")
    try:
        rltk_loss, rltk_grads, rltk_clipped = _rltk_loss_and_grads(rltk_trainer, parity_setup, case)
    finally:
        rltk_trainer.close()

    # (on-policy grpo's loss is −mean(A) = 0 in value; its gradient is not)
    assert rltk_loss == pytest.approx(trl_loss, abs=LOSS_ATOL)
    assert trl_grads.keys() == rltk_grads.keys()
    worst = max((rltk_grads[k] - trl_grads[k]).abs().max().item() for k in trl_grads)
    scale = max(g.abs().max().item() for g in trl_grads.values())
    assert scale > 1e-3  # a vacuous zero gradient would prove nothing
    assert worst < GRAD_ATOL, f"max |Δgrad| {worst:.3g} (largest grad {scale:.3g})"
    if case.off_policy:  # clipping really was exercised, and counted alike
        assert trl_clipped > 0
        assert rltk_clipped == pytest.approx(trl_clipped, abs=1e-6)
    else:
        assert trl_clipped == 0 and rltk_clipped == 0
