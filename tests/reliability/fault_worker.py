"""``rltk train`` with one injected fault, for the crash and numerical-fault tests.

    python fault_worker.py kill_in_checkpoint STEP -- train RECIPE [--resume]
        SIGKILL this process while checkpoint STEP is being written: its model and optimizer
        state are on disk in the temporary directory, its completion marker is not.
    python fault_worker.py nan_loss_from STEP -- train RECIPE
        every loss from rollout batch STEP on is NaN.
"""
import os
import signal
import sys

import torch


def kill_in_checkpoint(step: int) -> None:
    from rltk.trainer import checkpoint

    original = checkpoint.atomic_write_json

    def dying(path, data):
        if data.get("step") == step:
            os.kill(os.getpid(), signal.SIGKILL)
        original(path, data)

    checkpoint.atomic_write_json = dying


def nan_loss_from(step: int) -> None:
    from rltk.algos.pipeline import AlgorithmPipeline

    original = AlgorithmPipeline.per_token_loss

    def poisoned(self, logps, rollouts, advantages):
        per_token, metrics = original(self, logps, rollouts, advantages)
        if rollouts.step >= step:
            per_token = per_token * torch.tensor(float("nan"))
        return per_token, metrics

    AlgorithmPipeline.per_token_loss = poisoned


if __name__ == "__main__":
    fault, step, separator, *args = sys.argv[1:]
    assert separator == "--"
    {"kill_in_checkpoint": kill_in_checkpoint, "nan_loss_from": nan_loss_from}[fault](int(step))
    from rltk.cli import main

    sys.exit(main(args))
