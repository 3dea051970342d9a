"""``rltk compare --seeds``: the per-seed runs' pass@k aggregated into means with 95% intervals over
seeds (Student's t) and over problems (rltk/eval/seeds.py), from fake runs with known values."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rltk.eval import seeds as S

# per seed, per variant: the correct counts c of 4 problems with n = 4 samples each
COUNTS = {
    0: {"start": [1, 2, 0, 4], "grpo": [2, 2, 1, 4], "nsr": [1, 3, 1, 4]},
    1: {"start": [0, 2, 1, 4], "grpo": [3, 2, 1, 4], "nsr": [2, 3, 0, 4]},
    2: {"start": [1, 1, 1, 3], "grpo": [4, 3, 1, 4], "nsr": [1, 3, 2, 4]},
}


def problems(counts):
    return [{"id": f"p{i}", "n": 4, "c": c} for i, c in enumerate(counts)]


def test_t_quantiles_and_a_single_seed():
    assert S.t_quantile(2) == 4.303 and S.t_quantile(27) == 2.060 and S.t_quantile(40) == 1.96
    assert S.seed_interval([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        S.t_quantile(0)


def test_aggregate_means_and_intervals_by_hand():
    per_seed = {s: {v: problems(c) for v, c in runs.items()} for s, runs in COUNTS.items()}
    stats = S.aggregate(per_seed, [1, 2])
    # pass@1 of grpo per seed: mean of c/4 = 9/16, 10/16, 12/16
    seed_means = [9 / 16, 10 / 16, 12 / 16]
    mean = sum(seed_means) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in seed_means) / 2)
    assert stats["grpo"][1]["mean"] == pytest.approx(mean)
    assert stats["grpo"][1]["seed_half"] == pytest.approx(4.303 * sd / math.sqrt(3))
    # over problems: each seed's variance of c/4 over its 4 problems / 4, summed, sqrt, / 3 seeds, × 1.96
    def var(xs):
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    se2 = sum(var([c / 4 for c in COUNTS[s]["grpo"]]) / 4 for s in COUNTS)
    assert stats["grpo"][1]["problem_half"] == pytest.approx(1.96 * math.sqrt(se2) / 3)
    # pass@2 = 1 - C(4-c, 2) / C(4, 2) per problem: c = 0, 1, 2, 3, 4 -> 0, 1/2, 5/6, 1, 1
    p2 = {0: 0.0, 1: 0.5, 2: 5 / 6, 3: 1.0, 4: 1.0}
    nsr2 = [sum(p2[c] for c in COUNTS[s]["nsr"]) / 4 for s in COUNTS]
    assert stats["nsr"][2]["mean"] == pytest.approx(sum(nsr2) / 3)
    assert stats["start"][2]["seeds"] == 3.0
    assert "diff" not in stats["grpo"][1]  # no baseline asked for
    # paired differences to grpo at pass@1: nsr 9/16, 9/16, 10/16 against grpo 9/16, 10/16, 12/16
    paired = S.aggregate(per_seed, [1], baseline="grpo")
    diffs = [0.0, -1 / 16, -2 / 16]
    d_mean = sum(diffs) / 3
    d_sd = math.sqrt(sum((d - d_mean) ** 2 for d in diffs) / 2)
    assert paired["nsr"][1]["diff"] == pytest.approx(d_mean)
    assert paired["nsr"][1]["diff_half"] == pytest.approx(4.303 * d_sd / math.sqrt(3))
    assert paired["grpo"][1]["diff"] == 0.0 and paired["grpo"][1]["diff_half"] == 0.0
    assert f"| nsr | 3 | {d_mean:+.3f} ± " in S.format_table(paired, "grpo")
    table = S.format_table(stats)
    assert table.splitlines()[0] == "| variant | seeds | pass@1 | pass@2 |"
    assert f"| grpo | 3 | {mean:.3f} ± {stats['grpo'][1]['seed_half']:.3f} (± " in table


def fake_run(run_dir: Path, counts: list[int], *, with_start: list[int] | None = None, steps: int = 20) -> None:
    """A finished run as train() leaves it: result.json and the final (and maybe step-0) eval reports."""
    def report(c):
        per = problems(c)
        return {"summary": {"pass@k": {"1": sum(x["c"] for x in per) / 16, "2": 0.0}, "avg@n": 0.0},
                "protocol": {}, "per_problem": per}

    step_dir = run_dir / "eval" / f"step-{steps:06d}"
    step_dir.mkdir(parents=True)
    (step_dir / "report.json").write_text(json.dumps(report(counts)))
    if with_start is not None:
        (run_dir / "eval" / "step-000000").mkdir()
        (run_dir / "eval" / "step-000000" / "report.json").write_text(json.dumps(report(with_start)))
    (run_dir / "result.json").write_text(json.dumps({"final_checkpoint": str(run_dir / "checkpoints" /
                                                                           f"step-{steps:06d}")}))


def test_compare_seeds_runs_each_seed_and_tabulates(tmp_path, monkeypatch, tiny_model_dir):
    """compare_seeds calls compare once per seed with trainer.seed set and its own directory, reads
    each run's final report and the warm start's step-0 report, and writes the aggregated table."""
    from rltk import workflows

    calls = []

    def fake_compare(base, overrides, variants, output_dir):
        seed = int(overrides[-1].split("=")[1])
        calls.append((overrides, output_dir))
        out = Path(output_dir)
        for i, name in enumerate(variants):
            fake_run(out / name, COUNTS[seed][name], with_start=COUNTS[seed]["start"] if i == 0 else None)
        return "", out

    monkeypatch.setattr(workflows, "compare", fake_compare)
    base = {"model": {"name_or_path": tiny_model_dir}, "trainer": {"output_dir": str(tmp_path / "run")}}
    table, out = workflows.compare_seeds(base, ["trainer.steps=20"], ["grpo", "nsr"], None, [0, 1, 2])
    assert out == tmp_path / "run" / "compare"
    assert calls == [(["trainer.steps=20", f"trainer.seed={s}"], str(out / f"seed-{s}")) for s in (0, 1, 2)]
    stored = json.loads((out / "comparison.json").read_text())
    direct = S.aggregate({s: {v: problems(c) for v, c in runs.items()} for s, runs in COUNTS.items()}, [1, 2])
    assert stored["seeds"] == [0, 1, 2]
    assert list(stored["stats"]) == ["start", "grpo", "nsr"]
    for variant in direct:
        for k in (1, 2):
            assert stored["stats"][variant][str(k)]["mean"] == pytest.approx(direct[variant][k]["mean"])
    assert stored["stats"]["nsr"]["1"]["diff"] == pytest.approx(-1 / 16)  # paired to the first variant, grpo
    assert "Paired difference to grpo" in table
    assert (out / "comparison.png").stat().st_size > 1000 and table in (out / "comparison.md").read_text()
    assert (out / "comparison_diff.png").stat().st_size > 1000  # the paired differences to grpo, with bands
    assert "![pass@k − grpo](comparison_diff.png)" in (out / "comparison.md").read_text()
    with pytest.raises(workflows.ConfigError, match="^--seeds: expected distinct seeds, got 1,1"):
        workflows.compare_seeds(base, [], ["grpo"], None, [1, 1])


def test_plot_range_holds_negative_differences_and_their_bands():
    """Accuracies are drawn from 0; paired differences below 0 get a range that holds every band whole."""
    from rltk.eval.report import y_limits

    assert y_limits({"a": {1: 0.2, 8: 0.5}}) == (0.0, pytest.approx(0.575))
    assert y_limits({"a": {1: 0.01}}) == (0.0, 0.05)
    assert y_limits({"a": {1: 0.9, 8: 1.0}}) == (0.0, 1.02)
    low, high = y_limits({"a": {1: -0.05, 8: 0.02}}, bands={"a": {1: (-0.2, 0.1), 8: (-0.01, 0.05)}})
    assert (low, high) == (pytest.approx(-0.23), pytest.approx(0.115))
    assert y_limits({"a": {1: -0.1, 8: -0.2}}) == (pytest.approx(-0.23), pytest.approx(0.01))
