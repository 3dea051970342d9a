"""User code that fails (issue "Reliability", item 7): a user stage (``{name: "pkg.mod:fn"}``), sampler
or reward function that cannot be imported, has a syntax error, raises, or returns the wrong type
or shape. Every failure is one line naming the stage or reward and its function:

* at recipe load (``rltk train``): exit status 2, ``rltk: error: ...``, no traceback, nothing written;
* in training: exit status 1, ``rltk: training stopped: step N: ...``, and the last good checkpoint
  is intact.

The broken functions live in ``tests/broken_user_code.py``; modules that cannot be imported are
written here, into a directory on ``sys.path``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from rltk.cli import main
from rltk.validate import build_recipe
from rltk.trainer.guard import TrainingError
from rltk.trainer.rl import RLTrainer
from tests import broken_user_code
from tests.conftest import small_recipe_data
from tests.reliability.test_bad_recipes import check_outcome

BROKEN = "tests.broken_user_code"


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    """A directory on sys.path with a module that has a syntax error and one that raises on import."""
    root = tmp_path / "user_modules"
    root.mkdir()
    (root / "my_syntax_error.py").write_text("import torch\n\ndef estimator(rollouts)\n    return rollouts\n")
    (root / "my_import_error.py").write_text("import torch\nraise RuntimeError('MY_API_KEY is not set')\n\n"
                                             "def estimator(rollouts):\n    return rollouts\n")
    monkeypatch.syspath_prepend(str(root))
    for name in ("my_syntax_error", "my_import_error"):
        sys.modules.pop(name, None)
    yield root
    for name in ("my_syntax_error", "my_import_error"):
        sys.modules.pop(name, None)


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(data))
    return path


def _load_fails(tmp_path, monkeypatch, capsys, data: dict, *expected: str) -> str:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    code = main(["train", str(_write(tmp_path, data))])
    err = capsys.readouterr().err
    for text in expected[1:]:
        assert text in err, (text, err)
    check_outcome(code, err, expected[0], cwd)
    assert not (tmp_path / "run").exists()  # nothing written: the recipe failed before the trainer started
    return err


def _algorithm(**sections) -> dict:
    return {"algorithm": sections}


LOAD_TIME = {
    # name: (recipe sections, [first expected part, further parts...])
    "syntax_error": (_algorithm(advantage=[{"name": "my_syntax_error:estimator"}]),
                     ["importing module 'my_syntax_error' failed with SyntaxError", "line 3"]),
    "raises_on_import": (_algorithm(advantage=[{"name": "my_import_error:estimator"}]),
                         ["importing module 'my_import_error' failed with RuntimeError: MY_API_KEY is not set"]),
    "missing_module": (_algorithm(advantage=[{"name": "my_missing_module:estimator"}]),
                       ["cannot import module 'my_missing_module'"]),
    "estimator_raises": (_algorithm(advantage=[{"name": f"{BROKEN}:raising_estimator"}]),
                         [f"advantage '{BROKEN}:raising_estimator' ({BROKEN}.raising_estimator) raised StageBug: "
                          "my estimator is broken", "synthetic batch"]),
    "estimator_returns_list": (_algorithm(advantage=[{"name": f"{BROKEN}:list_estimator"}]),
                               [f"({BROKEN}.list_estimator) returned a list; expected rltk.algos.Advantages"]),
    "estimator_wrong_length": (_algorithm(advantage=[{"name": f"{BROKEN}:wrong_length_estimator"}]),
                               ["returned advantages of shape [5]; expected [N] = [4] or [N, T] = [4, 2]"]),
    "estimator_int_values": (_algorithm(advantage=[{"name": f"{BROKEN}:int_estimator"}]),
                             ["returned Advantages with torch.int64 values; expected a float tensor"]),
    "modifier_float_keep": (_algorithm(advantage=[{"name": "grpo"}, {"name": f"{BROKEN}:bad_keep_modifier"}]),
                            [f"modifier '{BROKEN}:bad_keep_modifier'", "Advantages.keep torch.float32 of shape [4]"]),
    "scalar_loss": (_algorithm(loss={"name": f"{BROKEN}:scalar_loss"}),
                    [f"loss '{BROKEN}:scalar_loss' ({BROKEN}.scalar_loss) returned a per-token loss of shape []; "
                     "expected [N, T] = [4, 2] (a scalar", "algorithm.aggregation"]),
    "loss_returns_dict": (_algorithm(loss={"name": f"{BROKEN}:dict_loss"}),
                          ["returned a dict; expected a per-token tensor [4, 2] or rltk.algos.LossOutput"]),
    "loss_float_metric": (_algorithm(loss={"name": f"{BROKEN}:bad_metric_loss"}),
                          ["returned token metric 'ratio' that is a float"]),
    "term_raises": (_algorithm(terms=[{"name": f"{BROKEN}:raising_term"}]),
                    [f"term '{BROKEN}:raising_term' ({BROKEN}.raising_term) raised RuntimeError"]),
    "aggregation_not_scalar": (_algorithm(aggregation={"name": f"{BROKEN}:vector_aggregation"}),
                               ["returned a tensor of shape [4]; expected a scalar tensor (shape [])"]),
    "normalizer_not_a_number": (_algorithm(aggregation={"name": f"{BROKEN}:nan_normalizer_aggregation"}),
                                ["normalizer returned a str; expected a finite number >= 0"]),
    "sampler_not_a_sampler": (_algorithm(sampler={"name": f"{BROKEN}:NotASampler"}),
                              [f"sampler '{BROKEN}:NotASampler' ({BROKEN}.NotASampler) built a NotASampler; a sampler "
                               "must subclass rltk.algos.Sampler"]),
    "reward_syntax_error": ({"rewards": [{"name": "my_syntax_error:estimator"}]},
                            ["rewards[0]: cannot load reward function 'my_syntax_error:estimator': importing module "
                             "'my_syntax_error' failed with SyntaxError"]),
    "reward_raises_on_import": ({"rewards": [{"name": "my_import_error:estimator"}]},
                                ["failed with RuntimeError: MY_API_KEY is not set"]),
    "reward_missing_function": ({"rewards": [{"name": f"{BROKEN}:no_such_reward"}]},
                                [f"module '{BROKEN}' has no attribute 'no_such_reward'"]),
    "reward_without_kwargs": ({"rewards": [{"name": f"{BROKEN}:positional_only_reward"}]},
                              [f"reward function '{BROKEN}:positional_only_reward' cannot be called as TRL calls "
                               "it, fn(prompts=..., completions=..., completion_ids=..., trainer_state=..., "
                               "**dataset_columns): it takes no **kwargs"]),
}


@pytest.mark.parametrize("case", list(LOAD_TIME))
def test_broken_user_code_fails_at_load_with_one_line(case, tmp_path, tiny_model_dir, user_modules, monkeypatch,
                                                      capsys):
    sections, expected = LOAD_TIME[case]
    data = small_recipe_data(tiny_model_dir, tmp_path / "run", **sections)
    _load_fails(tmp_path, monkeypatch, capsys, data, *expected)


def _train_batches(tmp_path, model_dir: str, batches: int, **sections) -> None:
    trainer = RLTrainer(build_recipe(small_recipe_data(model_dir, tmp_path / "run", **sections)))
    try:
        for _ in range(batches):
            trainer.train_batch()
    finally:
        trainer.close()


def _reward(name: str) -> dict:
    return {"rewards": [{"name": "math"}, {"name": f"{BROKEN}:{name}"}]}


TRAIN_TIME = {
    "reward_raises": (_reward("raising_reward"), 1,
                      f"step 1: reward '{BROKEN}:raising_reward' ({BROKEN}.raising_reward) raised "
                      "ZeroDivisionError: float division by zero"),
    "reward_too_few_values": (_reward("short_reward"), 1, "returned 15 values for 16 completions"),
    "reward_strings": (_reward("string_reward"), 1, "returned str '1.0' for completion 0; expected a number or None"),
    "reward_nan": (_reward("nan_reward"), 1, "returned nan for completion 0; rewards must be finite"),
    "reward_scalar": (_reward("scalar_reward"), 1, "returned float; expected a list of 16 numbers"),
    "estimator_from_step_2": (_algorithm(advantage=[{"name": f"{BROKEN}:estimator_failing_from_step_2"}]), 2,
                              f"step 2: advantage '{BROKEN}:estimator_failing_from_step_2' "
                              f"({BROKEN}.estimator_failing_from_step_2) raised KeyError: 'missing_column'"),
    "sampler_raises": (_algorithm(sampler={"name": f"{BROKEN}:RaisingSampler"}), 1,
                       f"step 1: sampler '{BROKEN}:RaisingSampler' ({BROKEN}.RaisingSampler) next_indices raised "
                       "IndexError: sampler ran out of prompts"),
}


@pytest.mark.parametrize("case", list(TRAIN_TIME))
def test_broken_user_code_stops_training_with_one_line(case, tmp_path, tiny_model_dir):
    sections, batches, expected = TRAIN_TIME[case]
    with pytest.raises(TrainingError) as info:
        _train_batches(tmp_path, tiny_model_dir, batches, **sections)
    message = str(info.value)
    assert expected in message, message
    assert "\n" not in message
    assert "no checkpoint was written yet" in message
    assert isinstance(info.value.__cause__, Exception)  # the original error is chained for rltk -v


def test_tensor_rewards_and_none_are_accepted(tmp_path, tiny_model_dir):
    _train_batches(tmp_path, tiny_model_dir, 1, **_reward("tensor_reward"))


def test_failure_at_step_2_exits_1_with_one_line_and_keeps_the_checkpoint(tmp_path, tiny_model_dir, monkeypatch,
                                                                         capsys):
    """``rltk train`` with a loss that raises at step 2: step 1's checkpoint is written and kept;
    stderr ends with one line naming the step, the loss and its function; exit status 1."""
    from rltk.trainer.checkpoint import latest_checkpoint

    data = small_recipe_data(tiny_model_dir, tmp_path / "run", trainer={"steps": 3, "save_every": 1},
                             algorithm={"loss": {"name": f"{BROKEN}:loss_failing_from_step_2"}})
    data["eval"]["num_problems"] = 2
    monkeypatch.chdir(tmp_path)
    code = main(["train", str(_write(tmp_path, data))])
    err = capsys.readouterr().err
    assert code == 1, err[-2000:]
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith(f"rltk: training stopped: step 2: loss '{BROKEN}:loss_failing_from_step_2' "
                           f"({BROKEN}.loss_failing_from_step_2) raised StageBug: division by a zero-length group; "
                           "the last good checkpoint "), last
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint is not None and checkpoint.name == "step-000001"
    assert str(checkpoint) in last and "is intact" in last


def test_reward_failing_in_training_names_the_step(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(broken_user_code.CALLS, "count", 0)
    with pytest.raises(TrainingError, match=rf"^step 2: reward '{BROKEN}:reward_failing_from_call_2' "
                                            rf"\({BROKEN}\.reward_failing_from_call_2\) raised ConnectionError: "
                                            "reward server unreachable"):
        _train_batches(tmp_path, tiny_model_dir, 2, **_reward("reward_failing_from_call_2"))
