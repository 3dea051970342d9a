"""2-process DeepSpeed ZeRO-2 run for tests/reliability/test_numerical.py: the weight guard under DeepSpeed.

    accelerate launch --config_file zero2-cpu.yaml guard_worker.py RECIPE OUT [nan_state|overflow]

``nan_state``: step 1 trains and is checkpointed; then rank 0 alone gets a NaN in its partition of
Adam's second moment. DeepSpeed applies step 2 inside its engine, so the guard cannot skip it:
every rank must stop with the same one-line TrainingError, and a checkpoint must be refused.
``overflow`` (a recipe with lr 1e38): the engine's AdamW raises an overflow inside the first
backward; every rank must stop with one line. Rank 0 writes what it saw to OUT.
"""
import json
import sys

import torch

from rltk.validate import build_recipe
from rltk.trainer.guard import TrainingError, base_optimizer
from rltk.trainer.rl import RLTrainer


def main(recipe_path: str, out_path: str, mode: str = "nan_state") -> None:
    torch.set_num_threads(1)
    trainer = RLTrainer(build_recipe(json.loads(open(recipe_path).read())))
    acc = trainer.accelerator
    try:
        if mode == "overflow":
            try:
                trainer.train_batch()
                result = {"step": "no error"}
            except TrainingError as exc:
                result = {"step": str(exc)}
            if acc.is_main_process:
                with open(out_path, "w") as handle:
                    json.dump(result, handle)
            return
        trainer.train_batch()
        good = trainer.save()
        base = base_optimizer(trainer.optimizer)
        partition = sum(p.numel() for group in base.param_groups for p in group["params"])
        total = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        result = {"world": acc.num_processes, "base": type(base).__name__, "partition": partition, "total": total,
                  "good": str(good)}
        if acc.process_index == 0:
            next(iter(base.state.values()))["exp_avg_sq"].view(-1)[0] = float("nan")
        for name, action in (("step", trainer.train_batch), ("save", trainer.save)):
            try:
                action()
                result[name] = "no error"
            except TrainingError as exc:
                result[name] = str(exc)
        if acc.is_main_process:
            with open(out_path, "w") as handle:
                json.dump(result, handle)
        acc.wait_for_everyone()
    finally:
        trainer.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
