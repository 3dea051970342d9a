"""Named eval sets (``eval.sets``, ``rltk eval --sets``): one report per set, the set's own split and
columns over the recipe's ``data`` fallbacks, the model built once, bad names rejected in one line."""
from __future__ import annotations

import json

import pytest

from rltk.schema import ConfigError

from rltk.validate import build_recipe
from tests.conftest import small_recipe_data


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_eval_sets_write_one_report_per_set(tmp_path, tiny_model_dir, monkeypatch):
    import rltk.models
    from rltk.cli import main

    first = _write(tmp_path / "first.jsonl", [{"problem": f"Q: {a}+1=? A:", "answer": str(a + 1)} for a in range(3)])
    second = _write(tmp_path / "second.jsonl", [{"question": f"Q: {a}+2=? A:", "final": str(a + 2)} for a in range(5)])
    data = small_recipe_data(tiny_model_dir, tmp_path / "run")
    data["eval"]["sets"] = [{"name": "first", "source": first, "split": "train"},
                            {"name": "second", "source": second, "split": "train", "prompt_field": "question",
                             "answer_field": "final", "num_problems": 4}]
    recipe_path = tmp_path / "recipe.yaml"
    import yaml

    recipe_path.write_text(yaml.safe_dump(data))
    loads = []
    original = rltk.models.load_model
    monkeypatch.setattr(rltk.models, "load_model", lambda *a, **k: (loads.append(a[0]), original(*a, **k))[1])
    out = tmp_path / "eval"
    assert main(["eval", "--model", tiny_model_dir, "--recipe", str(recipe_path), "--sets", "all", "--out", str(out),
                 "--n", "2"]) == 0
    assert len(loads) == 1  # one model for both sets
    for name, problems in [("first", 3), ("second", 4)]:
        report = json.loads((out / name / "report.json").read_text())
        assert report["protocol"]["eval_set"] == name and report["summary"]["num_problems"] == problems
        assert {"report.md", "passk.png", "samples.jsonl"} <= {p.name for p in (out / name).iterdir()}
    samples = (out / "second" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 4 * 2 and json.loads(samples[0])["answer"] == "2"  # the set's own answer column


def test_unknown_set_and_bad_set_config_fail_in_one_line(tmp_path, tiny_model_dir):
    from rltk.workflows import evaluate_model_sets

    recipe = build_recipe({"eval": {"sets": [{"name": "math500", "source": "HuggingFaceH4/MATH-500"}]}})
    with pytest.raises(ConfigError, match="eval sets: unknown set 'aime'; the recipe's eval.sets are math500"):
        evaluate_model_sets(recipe, tiny_model_dir, tmp_path / "out", sets=["aime"])
    assert not (tmp_path / "out").exists()
    for sets, message in [([{"name": "a", "source": "x/y"}, {"name": "a", "source": "x/z"}], "eval.sets: names must "
                                                                                           "be unique"),
                          ([{"name": "a b", "source": "x/y"}], "eval.sets[0].name: 'a b' must be letters"),
                          ([{"name": "a", "source": "x/y", "num_problems": 0}], "eval.sets[0].num_problems: must be"),
                          ([{"source": "x/y"}], "eval.sets[0]: missing required key 'name'")]:
        with pytest.raises(ConfigError) as info:
            build_recipe({"eval": {"sets": sets}})
        assert str(info.value).startswith(message) and "\n" not in str(info.value)
