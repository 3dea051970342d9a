"""REDI (docs/algorithms/reference.md §6): `rltk data pairs`, the stage-2 step on the tiny model, and `rltk redi`.

The loss functions themselves (§6 vectors, gradient coefficients, paired = unpaired, α = 0 = SFT)
are tested in test_distill.py; here: the data tooling, that the trainer's step is exactly
``redi_loss`` of the model's log-probs whatever the micro-batching, and the command end to end.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rltk.algos.distill import redi_loss
from rltk.cli import main
from rltk.schema import load_recipe_data
from rltk.validate import build_recipe, load_recipe
from rltk.data.loaders import DataError
from rltk.data.pairs import build_pairs, make_pairs, read_traces
from rltk.trainer.logprobs import forward_logps
from rltk.data.redi import PAIRED, UNPAIRED, read_redi_table
from rltk.trainer.redi import RediTrainer, collate

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def _sample(prompt: str, completion: str, correct: bool, truncated: bool = False) -> dict:
    """A row as `rltk eval` writes it to samples.jsonl."""
    return {"id": prompt, "prompt": f"Q: {prompt}=?\nA: ", "answer": "0", "completion": completion,
            "extracted": None, "correct": correct, "reason": "ok" if correct else "wrong", "truncated": truncated}


SAMPLES = [
    _sample("1+1", "\\boxed{2}", True),
    _sample("1+1", "\\boxed{2}", True),  # duplicate
    _sample("1+1", "2 so \\boxed{2}", True),
    _sample("1+1", "\\boxed{3}", False),
    _sample("1+1", "\\boxed{4}", False),
    _sample("1+1", "\\boxed{5}", False),
    _sample("2+2", "\\boxed{4}", True),  # all correct
    _sample("3+3", "\\boxed{5}", False),  # all wrong (once the truncated one is dropped)
    _sample("3+3", "\\boxed{6", True, truncated=True),
    _sample("4+4", "\\boxed{8}", True),
    _sample("4+4", "\\boxed{9} and many more words", False),  # longer than --max-chars 20
    _sample("5+5", "x", False),  # shorter than --min-chars 2: the prompt has no trace left
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------- rltk data pairs


def test_pairs_counts_dedup_filters_and_both_outputs(tmp_path, capsys):
    samples = _write_jsonl(tmp_path / "samples.jsonl", SAMPLES)
    code = main(["data", "pairs", str(samples), "--out", str(tmp_path / "pairs.jsonl"), "--sft-out",
                 str(tmp_path / "sft.jsonl"), "--min-chars", "2", "--max-chars", "20"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "read 12 rows: 12 traces of 5 prompts" in printed
    assert "dropped: 1 truncated, 2 outside the length limits, 1 duplicates" in printed
    assert "kept: 4 correct and 4 wrong traces" in printed
    assert "pairs: 1; prompts without a pair: 2 all correct, 1 all wrong, 1 with no trace left" in printed
    sft = _read_jsonl(tmp_path / "sft.jsonl")
    assert sft == [{"prompt": "Q: 1+1=?\nA: ", "completion": "\\boxed{2}"},
                   {"prompt": "Q: 1+1=?\nA: ", "completion": "2 so \\boxed{2}"},
                   {"prompt": "Q: 2+2=?\nA: ", "completion": "\\boxed{4}"},
                   {"prompt": "Q: 4+4=?\nA: ", "completion": "\\boxed{8}"}]
    (pair,) = _read_jsonl(tmp_path / "pairs.jsonl")
    assert set(pair) == {"prompt", "chosen", "rejected"} and pair["prompt"] == "Q: 1+1=?\nA: "
    assert pair["chosen"] in {"\\boxed{2}", "2 so \\boxed{2}"}
    assert pair["rejected"] in {"\\boxed{3}", "\\boxed{4}", "\\boxed{5}"}

    stats = make_pairs(str(samples), tmp_path / "unpaired.jsonl", fmt="unpaired", min_chars=2, max_chars=20)
    assert stats.pairs == 1
    rows = _read_jsonl(tmp_path / "unpaired.jsonl")
    assert rows == [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
                    {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]


def test_pair_choice_is_seeded_and_per_prompt(tmp_path):
    samples = _write_jsonl(tmp_path / "samples.jsonl", SAMPLES)
    traces = read_traces(str(samples))

    def choice(seed, kept=traces):
        pairs, _, _ = build_pairs(kept, seed=seed)
        return [(p["chosen"], p["rejected"]) for p in pairs if p["prompt"].startswith("Q: 1+1")]

    assert choice(0) == choice(0)
    assert len({tuple(choice(seed)) for seed in range(20)}) > 1  # the seed matters
    others_removed = [t for t in traces if t.prompt.startswith("Q: 1+1")]
    assert all(choice(seed) == choice(seed, others_removed) for seed in range(5))  # independent of other prompts

    # --sft-per-prompt 1 (the authors' one correct trace per problem): the pair's chosen trace
    for seed in range(5):
        pairs, sft, stats = build_pairs(traces, seed=seed, sft_per_prompt=1)
        assert stats.sft_rows == len(sft) == 3  # 1+1, 2+2, 4+4 have correct traces
        assert sft[0] == {"prompt": pairs[0]["prompt"], "completion": pairs[0]["chosen"]}


def test_open_r1_layout(tmp_path):
    row = {"problem": "What is 1+1?", "generations": ["a \\boxed{2}", "b \\boxed{3}", "c \\boxed{2}", "d"],
           "correctness": {"llama_verification": [True, False, False, True],
                           "math_verify_reparsed_answer": [True, False, True, True]},
           "finish_reasons": ["stop", "stop", "stop", "length"], "problem_is_valid": "Yes", "source": "olympiads"}
    skipped = {**row, "source": "cn_k12"}
    invalid = {**row, "problem_is_valid": "No"}
    source = _write_jsonl(tmp_path / "raw.jsonl", [row, skipped, invalid])
    stats = make_pairs(str(source), tmp_path / "pairs.jsonl", sft_out=tmp_path / "sft.jsonl",
                       exclude_sources=("cn_k12",))
    assert (stats.rows, stats.invalid_problems, stats.traces, stats.truncated_dropped) == (3, 2, 4, 1)
    # correct = every verdict true (the authors' Llama AND Math-Verify rule): only "a"
    assert _read_jsonl(tmp_path / "sft.jsonl") == [{"prompt": "What is 1+1?", "completion": "a \\boxed{2}"}]
    (pair,) = _read_jsonl(tmp_path / "pairs.jsonl")
    assert pair["chosen"] == "a \\boxed{2}" and pair["rejected"] in {"b \\boxed{3}", "c \\boxed{2}"}


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "p", "completion": "c", "correct": tru', "line 2 is not valid JSON"),
    ('{"prompt": "p", "completion": "c"}', "line 2 has no 'correct' field"),
    ('{"prompt": "p", "completion": "c", "correct": "yes"}', "line 2: 'correct' must be a bool"),
    ('[1, 2]', "line 2 is a list"),
])
def test_pairs_bad_line_is_one_line_error(tmp_path, capsys, line, message):
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps(SAMPLES[0]) + "\n" + line + "\n")
    code = main(["data", "pairs", str(samples), "--out", str(tmp_path / "pairs.jsonl")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "pairs.jsonl").exists()


def test_pairs_missing_input_exit_2(tmp_path, capsys):
    assert main(["data", "pairs", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "p.jsonl")]) == 2
    assert "file not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------- the stage-2 step


def _pairs_file(tmp_path: Path, n: int = 6) -> Path:
    rows = [{"prompt": f"Q: {i}+{i + 1}=?\nA: ", "chosen": f"\\boxed{{{2 * i + 1}}}",
             "rejected": f"{i} wrong " * (i % 3 + 1) + "\\boxed{0}"} for i in range(n)]
    return _write_jsonl(tmp_path / "pairs.jsonl", rows)


def _unpaired_file(tmp_path: Path, pairs: Path) -> Path:
    rows = []
    for p in _read_jsonl(pairs):
        rows += [{"prompt": p["prompt"], "completion": p["chosen"], "label": True},
                 {"prompt": p["prompt"], "completion": p["rejected"], "label": False}]
    return _write_jsonl(tmp_path / "unpaired.jsonl", rows)


def _recipe(model_dir: str, out: Path, **redi):
    return build_recipe({"model": {"name_or_path": model_dir}, "trainer": {"output_dir": str(out)},
                         "logging": {"progress": False}, "redi": {"data": "unused", **redi}})


def _grads(model) -> list[torch.Tensor]:
    grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return grads


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b) > 0
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def test_step_loss_is_redi_loss_and_micro_batching_does_not_change_the_gradient(tmp_path, tiny_model_dir):
    table = read_redi_table(str(_pairs_file(tmp_path)))
    assert table.fmt == PAIRED
    trainer = RediTrainer(_recipe(tiny_model_dir, tmp_path / "run"), tiny_model_dir, table)
    rows = trainer.data.rows[:4]
    trainer.micro_batch_size = 4
    whole = trainer.accumulate_gradients(rows, len(rows))
    grads_whole = _grads(trainer.model)

    batch, labels = collate(rows, PAIRED, trainer.tokenizer.pad_token_id)
    assert labels.tolist() == [True] * 4 + [False] * 4
    with torch.no_grad():
        logps = forward_logps(trainer.model, batch).logps
    mask = batch.completion_mask
    expected, metrics = redi_loss(logps[:4], mask[:4], logps[4:], mask[4:], alpha=0.8)
    assert abs(whole["loss"] - float(expected)) < 1e-6
    assert abs(whole["pos_logp"] - metrics["pos_logp"]) < 1e-6 and abs(whole["gap"] - metrics["gap"]) < 1e-6

    trainer.micro_batch_size = 1
    single = trainer.accumulate_gradients(rows, len(rows))
    assert abs(single["loss"] - whole["loss"]) < 1e-6
    assert _max_diff(grads_whole, _grads(trainer.model)) < 1e-6
    assert max(float(g.abs().max()) for g in grads_whole) > 0

    # the unpaired rows of the same traces give the same loss and gradient (reduction "pair")
    unpaired = read_redi_table(str(_unpaired_file(tmp_path, tmp_path / "pairs.jsonl")))
    assert unpaired.fmt == UNPAIRED
    trainer_u = RediTrainer(_recipe(tiny_model_dir, tmp_path / "run_u", micro_batch_size=3), tiny_model_dir, unpaired)
    # rows in file order: (chosen_i, rejected_i) for the 6 pairs; the first 4 pairs are rows 0..7
    rows_u = trainer_u.data.rows[:8]
    result_u = trainer_u.accumulate_gradients(rows_u, len(rows_u))
    assert abs(result_u["loss"] - whole["loss"]) < 1e-6
    assert _max_diff(grads_whole, _grads(trainer_u.model)) < 1e-6


# ------------------------------------------------------------------------------- rltk redi


def _quickstart_args(tmp_path: Path, model_dir: str, *extra: str) -> list[str]:
    return [str(ROOT / "recipes" / "quickstart" / "redi.yaml"), f"model.name_or_path={model_dir}",
            f"trainer.output_dir={tmp_path / 'run'}", "logging.progress=false", "data.num_test=2", "eval.n=1",
            "verifier.num_workers=1", *extra]


def test_redi_cli_two_steps_with_stage_one(tmp_path, tiny_model_dir, capsys):
    pairs = _pairs_file(tmp_path, n=4)
    sft = _write_jsonl(tmp_path / "sft.jsonl", [{"prompt": p["prompt"], "completion": p["chosen"]}
                                                 for p in _read_jsonl(pairs)])
    args = _quickstart_args(tmp_path, tiny_model_dir, f"redi.data={pairs}", f"redi.sft_data={sft}", "sft.steps=2",
                            "sft.batch_size=2", "redi.batch_size=2", "redi.micro_batch_size=1", "redi.epochs=1")
    assert main(["redi", *args]) == 0, capsys.readouterr().err
    assert "REDI: 2 steps on 4 preference rows" in capsys.readouterr().out
    run = tmp_path / "run"
    assert (run / "sft" / "config.json").is_file()  # stage 1 ran on redi.sft_data
    model_dir = run / "redi"
    assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()
    assert not list(run.glob(".redi*"))  # no temporary directory left
    lines = [json.loads(line) for line in (run / "redi_metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for key in ("loss", "pos_logp", "neg_logp", "gap", "lr", "grad_norm"):
        assert all(isinstance(m[key], float) for m in lines), key
    assert lines[0]["lr"] == 0.0 and lines[1]["lr"] > 0  # 10% warmup (1 step), then linear decay
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(model_dir)  # loads back as an HF model


def test_redi_cli_unpaired_with_eval(tmp_path, tiny_model_dir, capsys):
    unpaired = _unpaired_file(tmp_path, _pairs_file(tmp_path, n=2))
    args = _quickstart_args(tmp_path, tiny_model_dir, f"redi.data={unpaired}", "sft.enabled=false",
                            "redi.batch_size=4", "redi.max_steps=1")
    assert main(["redi", *args, "--eval"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "REDI: 1 steps on 4 unpaired rows" in out and "| REDI |" in out
    assert (tmp_path / "run" / "report" / "comparison.md").is_file()
    result = json.loads((tmp_path / "run" / "redi_result.json").read_text())
    assert set(result["eval"]) == {"start", "REDI"}


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "Q: 1\nA: ", "chosen": "\\boxed{1}"}], "line 1 has no 'rejected' column"),
    ([{"prompt": "Q: 1\nA: ", "completion": "\\boxed{1}", "label": True}, {"prompt": "Q: 2\nA: ", "label": False}],
     "line 2 has no 'completion' column"),
    ([{"question": "Q: 1\nA: ", "answer": "1"}], "expected columns prompt/chosen/rejected"),
])
def test_redi_bad_data_is_one_line_error(tmp_path, tiny_model_dir, capsys, rows, message):
    data = _write_jsonl(tmp_path / "bad.jsonl", rows)
    sft = _write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Q: 1\nA: ", "completion": "\\boxed{1}"}])
    args = _quickstart_args(tmp_path, tiny_model_dir, f"redi.data={data}", f"redi.sft_data={sft}")
    assert main(["redi", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run" / "sft").exists()  # failed before stage 1


def test_redi_missing_data_file_and_bad_knobs(tmp_path, tiny_model_dir, capsys):
    for overrides, message in [
        (["redi.sft_data=missing.jsonl"], "redi.sft_data: file not found: missing.jsonl"),
        (["sft.enabled=false", "redi.data=missing.jsonl"], "redi.data: data file not found: missing.jsonl"),
        (["redi.alpha=-1"], "redi.alpha: must be >= 0"),
        (["redi.reduction=mean"], "redi.reduction"),
        (["redi.lr_scheduler=nope"], "redi.lr_scheduler: unknown scheduler 'nope'"),
    ]:
        assert main(["redi", *_quickstart_args(tmp_path, tiny_model_dir, *overrides)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_quickstart_recipe_is_stage_one_on_teacher_traces_then_redi():
    data = load_recipe_data(ROOT / "recipes" / "quickstart" / "redi.yaml")
    recipe = build_recipe(data)
    assert recipe.sft.enabled and recipe.redi.sft_data and recipe.redi.data
    assert recipe.redi.alpha == 0.8 and recipe.redi.warmup_ratio == 0.1 and recipe.redi.lr_scheduler == "linear"
    grpo = load_recipe_data(ROOT / "recipes" / "quickstart" / "grpo.yaml")
    for section in ("model", "data", "rollout", "eval"):  # the same student, task and evaluation as grpo.yaml
        assert data[section] == grpo[section], section


def test_teacher_recipe_is_a_deeper_tiny_model_trained_longer_on_the_same_task():
    """recipes/quickstart/redi_teacher.yaml makes the demonstration's teacher: the student's task,
    sampling and evaluation, a deeper tiny model (same tokenizer), and a longer SFT."""
    teacher = load_recipe_data(ROOT / "recipes" / "quickstart" / "redi_teacher.yaml")
    student = load_recipe_data(ROOT / "recipes" / "quickstart" / "redi.yaml")
    for section in ("data", "rollout", "rewards", "eval"):
        assert teacher[section] == student[section], section
    t, s = build_recipe(teacher), build_recipe(student)
    assert t.model.name_or_path == s.model.name_or_path == "tiny"
    assert t.model.tiny.num_layers > s.model.tiny.num_layers
    assert t.model.tiny.hidden_size == s.model.tiny.hidden_size  # one character tokenizer, one embedding width
    assert t.sft.enabled and t.sft.steps > s.sft.steps and t.redi.data is None


def test_teacher_recipe_end_to_end(tmp_path, capsys):
    """`rltk sft recipes/quickstart/redi_teacher.yaml`, cut to 2 steps: builds the 4-layer tiny model,
    trains it, evaluates it."""
    out = tmp_path / "teacher"
    args = [str(ROOT / "recipes" / "quickstart" / "redi_teacher.yaml"), f"trainer.output_dir={out}", "sft.steps=2",
            "sft.batch_size=4", "sft.num_examples=8", "data.num_test=2", "eval.n=1", "logging.progress=false",
            "verifier.num_workers=1"]
    assert main(["sft", *args]) == 0, capsys.readouterr().err
    assert "held-out avg@1" in capsys.readouterr().out
    config = json.loads((out / "sft" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["hidden_size"] == 128


def test_paper_recipes_carry_the_papers_settings():
    """docs/algorithms/reference.md §6: stage 1 lr 5e-5, batch 128, 5 epochs; stage 2 lr 1e-6, batch 32, 1 epoch, 10% warmup
    then linear decay, α = 0.8; Open-R1 traces; MATH-500 pass@1 over 16 samples."""
    s1 = load_recipe(ROOT / "recipes" / "qwen2.5-math-1.5b" / "sft_stage1.yaml")
    s2 = load_recipe(ROOT / "recipes" / "qwen2.5-math-1.5b" / "redi_stage2.yaml")
    assert s1.model.name_or_path == "Qwen/Qwen2.5-Math-1.5B"
    assert s1.sft.enabled and s1.redi.data is None  # stage 1 only
    assert (s1.sft.lr, s1.sft.batch_size * 8, s1.redi.sft_epochs) == (5e-5, 128, 5)
    assert not s2.sft.enabled and s2.model.name_or_path == str(Path(s1.trainer.output_dir) / s1.sft.output_subdir)
    r = s2.redi
    assert (r.lr, r.batch_size, r.epochs, r.warmup_ratio, r.lr_scheduler, r.alpha) == (1e-6, 32, 1, 0.1, "linear", 0.8)
    assert Path(s1.redi.sft_data).parent == Path(r.data).parent
    for recipe in (s1, s2):
        assert recipe.data.source == "open-r1/OpenR1-Math-Raw" and recipe.redi.format_prompts
        assert recipe.data.eval_source == "HuggingFaceH4/MATH-500" and recipe.eval.n == 16 and 1 in recipe.eval.ks


def test_stage_one_reads_sft_data_as_written_for_sft_epochs(tmp_path, monkeypatch):
    from rltk.workflows import sft_recipe

    rows = [{"prompt": f"Q: {i}+1=?\nA: ", "completion": f"\\boxed{{{i + 1}}}"} for i in range(10)]
    sft = _write_jsonl(tmp_path / "sft.jsonl", rows)
    monkeypatch.setenv("WORLD_SIZE", "1")
    recipe = build_recipe({"sft": {"enabled": True, "batch_size": 4, "num_examples": 3},
                           "redi": {"sft_data": str(sft), "sft_epochs": 2}})
    r = sft_recipe(recipe)
    assert r.sft.steps == 5 and r.sft.num_examples is None  # ceil(2 epochs x 10 rows / 4), every row
    assert (r.data.source, r.data.prompt_field, r.data.solution_field) == (str(sft), "prompt", "completion")
    from rltk.data.recipe import build_prompts, load_split

    examples = load_split(r.data, r.data.train_split, None)
    assert build_prompts(examples, r.data, None) == [row["prompt"] for row in rows]  # prompts as written
    assert [e.solution for e in examples] == [row["completion"] for row in rows]
    assert recipe.sft.steps == 300 and recipe.data.source == "builtin"  # the recipe itself is unchanged


def test_conversational_rows_use_the_chat_template(tmp_path, tiny_model_dir):
    from rltk.models import load_tokenizer
    from rltk.data.redi import tokenize_table

    rows = [{"prompt": [{"role": "user", "content": "1+1"}], "chosen": [{"role": "assistant", "content": "2"}],
             "rejected": [{"role": "assistant", "content": "3"}]}]
    table = read_redi_table(str(_write_jsonl(tmp_path / "chat.jsonl", rows)))
    recipe = _recipe(tiny_model_dir, tmp_path / "run")
    tokenizer = load_tokenizer(tiny_model_dir)
    with pytest.raises(DataError, match="line 1: .*chat"):  # the tiny tokenizer has no chat template
        tokenize_table(table, tokenizer, recipe)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    (row,) = tokenize_table(table, tokenizer, recipe).rows
    assert tokenizer.decode(row.prompt) == "user: 1+1\nassistant: "
    assert [tokenizer.decode(c) for c in row.completions] == ["2\n<eos>", "3\n<eos>"]


def _ddp_worker(model_dir: str, pairs: str, out: str, mode: str = "grad") -> None:
    """Run by torch.distributed.run / accelerate launch: 4 pairs split over the processes. Mode
    ``grad``: one step's loss and gradient. Mode ``step`` (DeepSpeed, whose gradients live in ZeRO's
    buffers): one whole optimizer step's loss, gradient norm and the updated weights."""
    torch.set_num_threads(1)
    recipe = _recipe(model_dir, Path(out).parent / "ddp_run", micro_batch_size=1, lr=1e-2, warmup_ratio=0.0)
    trainer = RediTrainer(recipe, model_dir, read_redi_table(pairs))
    result = {"world": trainer.accelerator.num_processes}
    if mode == "grad":
        metrics = trainer.accumulate_gradients(trainer.local_rows([0, 1, 2, 3]), 4)
        result["grad"] = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]).tolist()
    else:
        metrics = trainer.optimize([0, 1, 2, 3])
        state = trainer.accelerator.get_state_dict(trainer.model)  # gathered (collective)
        result.update(grad_norm=metrics["grad_norm"], weights=_flat_weights(state))
    result["loss"] = metrics["loss"]
    if trainer.accelerator.is_main_process:
        Path(out).write_text(json.dumps(result))
    trainer.accelerator.wait_for_everyone()


def _flat_weights(state: dict) -> list[float]:
    return torch.cat([state[name].detach().float().flatten() for name in sorted(state)]).tolist()


@pytest.mark.distributed
def test_ddp_two_processes_match_one(tmp_path, tiny_model_dir):
    import os
    import sys

    from tests.conftest import launch_with_free_port

    pairs = str(_pairs_file(tmp_path))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true"}
    launch_with_free_port(lambda port: ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                         "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "tests.test_redi",
                                         tiny_model_dir, pairs, str(tmp_path / "two.json")], env))
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world"] == 2

    trainer = RediTrainer(_recipe(tiny_model_dir, tmp_path / "one", lr=1e-2), tiny_model_dir, read_redi_table(pairs))
    one = trainer.accumulate_gradients(trainer.data.rows[:4], 4)
    grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    assert abs(one["loss"] - two["loss"]) < 1e-6
    assert float((grads - torch.tensor(two["grad"])).abs().max()) < 1e-6


@pytest.mark.distributed
def test_zero2_two_processes_match_one(tmp_path, tiny_model_dir, deepspeed_ops):
    """REDI under DeepSpeed ZeRO-2 (launch/zero2.yaml, 2 processes over gloo): one optimizer step of
    2 micro-batches per rank equals the 1-process step (loss, gradient norm, updated weights)."""
    from tests.test_deepspeed import cpu_config, launch_deepspeed

    pairs = str(_pairs_file(tmp_path))
    launch_deepspeed(cpu_config(tmp_path, "zero2"),
                     [str(Path(__file__)), tiny_model_dir, pairs, str(tmp_path / "two.json"), "step"])
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world"] == 2

    recipe = _recipe(tiny_model_dir, tmp_path / "one", micro_batch_size=1, lr=1e-2, warmup_ratio=0.0)
    trainer = RediTrainer(recipe, tiny_model_dir, read_redi_table(pairs))
    before = torch.tensor(_flat_weights(trainer.model.state_dict()))
    one = trainer.optimize([0, 1, 2, 3])
    after = torch.tensor(_flat_weights(trainer.model.state_dict()))
    assert abs(one["loss"] - two["loss"]) < 1e-6
    assert abs(one["grad_norm"] - two["grad_norm"]) < 1e-5 * one["grad_norm"]
    assert float((after - before).abs().max()) > 1e-3  # the step moved the weights
    assert float((after - torch.tensor(two["weights"])).abs().max()) < 1e-5


if __name__ == "__main__":  # the 2-process worker (test_ddp_two_processes_match_one, test_zero2_...)
    import sys

    _ddp_worker(*sys.argv[1:])


def test_save_refuses_non_finite_weights_and_keeps_the_previous_model(tmp_path, tiny_model_dir):
    from rltk.trainer.guard import TrainingError

    trainer = RediTrainer(_recipe(tiny_model_dir, tmp_path / "run"), tiny_model_dir,
                          read_redi_table(str(_pairs_file(tmp_path))))
    good = trainer.save()
    before = sorted(p.name for p in good.iterdir())
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(TrainingError, match="refusing to save a checkpoint: the weights or the optimizer state hold"):
        trainer.save()
    assert sorted(p.name for p in good.iterdir()) == before  # the previous model is untouched
