"""Train a bf16-declared recipe for a few optimizer steps at a small lr and report what the
optimizer updated (launched by tests/test_precision.py on 1 process, DDP and ZeRO-2).

Writes, from rank 0: the accelerator's mixed precision, the dtypes of the trainable parameters the
optimizer updates (its masters: DeepSpeed's float32 partition under ZeRO, the module's parameters
otherwise) and of its state, and the share of those master values that changed.
"""
import json
import sys

import torch

from rltk.validate import build_recipe
from rltk.trainer.distributed import shutdown_process_group, zero_stage
from rltk.trainer.guard import base_optimizer
from rltk.trainer.rl import RLTrainer


def masters(trainer) -> list[torch.Tensor]:
    """The float tensors the optimizer updates: ZeRO's float32 partitions, else the parameters."""
    engine_optimizer = getattr(trainer.model, "optimizer", None)  # a DeepSpeed engine's ZeRO optimizer
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        groups = getattr(engine_optimizer, attr, None)
        if groups:
            return list(groups)
    return [p for p in trainer.model.parameters() if p.requires_grad]


def main(recipe_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    recipe = build_recipe(json.loads(open(recipe_path).read()))
    trainer = RLTrainer(recipe)
    acc = trainer.accelerator
    try:
        before = [m.detach().clone() for m in masters(trainer)]
        while trainer.step < recipe.trainer.steps:
            trainer.train_batch()
        after = masters(trainer)
        changed = sum(int((a != b).sum()) for a, b in zip(after, before))
        total = sum(b.numel() for b in before)
        state = base_optimizer(trainer.optimizer).state  # torch AdamW's moments (under ZeRO, of its partitions)
        state_dtypes = {v.dtype for s in state.values() for v in s.values()
                        if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0}
        result = {"world": acc.num_processes, "zero_stage": zero_stage(acc), "mixed_precision": str(acc.mixed_precision),
                  "master_dtypes": sorted({str(m.dtype) for m in after}),
                  "state_dtypes": sorted(str(d) for d in state_dtypes),
                  "changed_share": changed / max(total, 1)}
        if acc.is_main_process:
            with open(out_path, "w") as handle:
                json.dump(result, handle)
        shutdown_process_group(completed=True)  # as the CLI does: no rank left to gloo's finalizer
    finally:
        trainer.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
