"""One optimizer step's loss and gradient on 1 or N processes (launched by tests/test_distributed.py
and tests/test_deepspeed.py).

Every rank samples the same full batch under a fixed seed, keeps its own share of whole prompt
groups (as the trainer does), and accumulates gradients; rank 0 writes the global loss and the
gradient vector. Equal results for 1 and 2 processes show the global normaliser and DDP's
averaging give the single-process step exactly.

Mode ``step`` (used under DeepSpeed, where gradients live in ZeRO's partitioned buffers) runs the
whole optimizer step (``RLTrainer.optimize``: accumulation, clipping, update) and writes the loss,
the pre-clip gradient norm and the trainable weights after the update, gathered from all ranks,
then saves a checkpoint (HF-format ``model/``, and ``adapter/`` under LoRA).

An optional fourth argument, a JSON list of 0/1, replaces the verifier's correctness of the full
batch (to give PACED non-trivial pass rates).
"""
import json
import sys
from dataclasses import replace

import torch

from rltk.validate import build_recipe
from rltk.trainer.distributed import shutdown_process_group, whole_shape, zero_stage
from rltk.trainer.rl import RLTrainer


def main(recipe_path: str, out_path: str, mode: str = "grad", correct: str | None = None) -> None:
    torch.set_num_threads(1)
    recipe = build_recipe(json.loads(open(recipe_path).read()))
    trainer = RLTrainer(recipe)
    acc = trainer.accelerator
    try:
        with torch.random.fork_rng():
            torch.manual_seed(1234)
            full = trainer.collector.rollout_batch(list(range(recipe.trainer.prompts_per_step)), first_group=0)
        if correct is not None:
            full = replace(full, rollouts=replace(full.rollouts, correct=torch.tensor(json.loads(correct)).bool()))
        group = recipe.rollout.group_size
        per_rank = recipe.trainer.prompts_per_step // acc.num_processes * group
        rows = torch.arange(acc.process_index * per_rank, (acc.process_index + 1) * per_rank)  # this rank's groups
        head = acc.unwrap_model(trainer.model).get_output_embeddings().weight
        result = {"world": acc.num_processes, "zero_stage": zero_stage(acc),
                  "micro_batches": len(trainer.micro_batches(full, rows)),
                  "lm_head_sharded": tuple(head.shape) != tuple(whole_shape(head))}  # a ZeRO-3 placeholder
        if mode == "grad":
            metrics = trainer.accumulate_gradients(full, rows)
            result["grad"] = torch.cat([p.grad.flatten() for p in trainer.model.parameters()
                                        if p.grad is not None]).tolist()
        else:
            trainable = {n.removeprefix("module.") for n, p in trainer.model.named_parameters() if p.requires_grad}
            metrics = trainer.optimize(full, rows)
            state = acc.get_state_dict(trainer.model)  # gathered under ZeRO-3 (collective)
            if acc.is_main_process:
                names = sorted(n for n in state if n in trainable)
                result["weights"] = torch.cat([state[n].detach().float().flatten() for n in names]).tolist()
                result["weight_names"] = names
                result["grad_norm"] = metrics["grad_norm"]
            result["checkpoint"] = str(trainer.save())  # HF export gathered from all ranks (+ LoRA merge)
        result["loss"] = metrics["loss"]
        if acc.is_main_process:
            with open(out_path, "w") as handle:
                json.dump(result, handle)
        shutdown_process_group(completed=True)  # as the CLI does: no rank left to gloo's finalizer
    finally:
        trainer.close()


if __name__ == "__main__":
    main(*sys.argv[1:5])
