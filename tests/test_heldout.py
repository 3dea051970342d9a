"""Held-out data never overlaps training rows (issue "Real-scale correctness", item 3).

For every kind of ``data`` section (built-in task, one JSONL/JSON/Parquet file, a directory with or
without ``test*`` files, ``eval_source`` equal to or apart from ``source``, a Hub dataset with and
without a test split) the rows ``load_split`` gives training and the rows ``load_test_split`` gives
evaluation share no id, no question text and no (question, answer) pair. Ids alone would prove
nothing: they default to ``<split>-<row>``, so the question text is compared too.

Hub datasets are read offline: a local directory is passed to ``datasets.load_dataset`` exactly as
a Hub id is (``_local_files`` patched out), so ``datasets``' own refusal of a missing split reaches
the code that decides to carve.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from rltk.schema import ConfigError, DataConfig

from rltk.validate import build_recipe
from rltk.data import heldout
from rltk.data.heldout import carve, heldout_kind, plan_heldout, question_key
from rltk.data.loaders import DataError, Example, named_split_files, split_files, unknown_split
from rltk.data.recipe import check_heldout, heldout_description, load_split, load_test_split


def _rows(n: int, start: int = 0) -> list[dict]:
    return [{"problem": f"What is {i} plus 7?", "answer": str(i + 7)} for i in range(start, start + n)]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _parquet(path: Path, rows: list[dict]) -> str:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: [r[k] for r in rows] for k in rows[0]}), path)
    return str(path)


def _assert_disjoint(train: list[Example], test: list[Example]) -> None:
    assert train and test
    assert not {e.id for e in train} & {e.id for e in test}
    assert not {question_key(e.question) for e in train} & {question_key(e.question) for e in test}
    assert not {(e.question, e.answer) for e in train} & {(e.question, e.answer) for e in test}


@pytest.fixture(autouse=True)
def _fresh_caches():
    heldout._CARVES.clear()
    heldout._HUB_SPLITS.clear()
    yield
    heldout._CARVES.clear()
    heldout._HUB_SPLITS.clear()


@pytest.fixture
def as_hub(monkeypatch):
    """Read local directories the way a Hub id is read (``datasets.load_dataset(source, subset, split=...)``)."""
    from rltk.data import loaders

    monkeypatch.setattr(loaders, "_local_files", lambda source, split, other_split=None: None)
    monkeypatch.setattr(heldout, "_local_kind", lambda source: None)


def _configs(tmp_path: Path) -> dict[str, tuple[DataConfig, str]]:
    """Every data configuration -> (its data section, the held-out kind it must get)."""
    single = _jsonl(tmp_path / "one.jsonl", _rows(60))
    array = tmp_path / "array.json"
    array.write_text(json.dumps(_rows(60)))
    split_dir = tmp_path / "split_dir"
    _jsonl(split_dir / "train.jsonl", _rows(50))
    _jsonl(split_dir / "test.jsonl", _rows(10, start=100))
    named_test_only = tmp_path / "train_and_unnamed"  # train.jsonl + an unnamed file: no test split
    _jsonl(named_test_only / "train.jsonl", _rows(40))
    _jsonl(named_test_only / "extra.jsonl", _rows(40, start=200))
    test_and_other = tmp_path / "test_and_other"  # test.jsonl + an unnamed file: test is never trained on
    _jsonl(test_and_other / "test.jsonl", _rows(10, start=300))
    _jsonl(test_and_other / "part-0.jsonl", _rows(40))
    return {
        "builtin": (DataConfig(source="builtin", num_train=1500, num_test=200), "test_split"),
        "builtin levels 1-6": (DataConfig(source="builtin", levels=[1, 2, 3, 4, 5, 6], num_train=1000, num_test=100),
                               "test_split"),
        "jsonl file": (DataConfig(source=single, num_test=12), "carved"),
        "json array file": (DataConfig(source=str(array), num_test=12), "carved"),
        "parquet file": (DataConfig(source=_parquet(tmp_path / "one.parquet", _rows(60)), num_test=12), "carved"),
        "directory train/test": (DataConfig(source=str(split_dir), num_test=10), "test_split"),
        "directory of train parquet shards": (
            DataConfig(source=str(Path(_parquet(tmp_path / "pq" / "train-00000-of-00001.parquet", _rows(30))).parent),
                       num_test=5), "carved"),
        "directory with one file": (DataConfig(source=str(Path(_jsonl(tmp_path / "dir1" / "data.jsonl",
                                                                      _rows(30))).parent), num_test=6), "carved"),
        "directory train + unnamed file": (DataConfig(source=str(named_test_only), num_test=8), "carved"),
        "directory test + unnamed file": (DataConfig(source=str(test_and_other), num_test=10), "test_split"),
        "eval_source = source": (DataConfig(source=single, eval_source=single, num_test=12), "carved"),
        "eval_source apart": (DataConfig(source=single, eval_source=_jsonl(tmp_path / "other.jsonl",
                                                                             _rows(10, start=500)), num_test=10),
                              "eval_source"),
    }


CONFIG_NAMES = ["builtin", "builtin levels 1-6", "jsonl file", "json array file", "parquet file",
                "directory train/test", "directory of train parquet shards", "directory with one file",
                "directory train + unnamed file", "directory test + unnamed file", "eval_source = source",
                "eval_source apart"]


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_train_and_eval_rows_are_disjoint(tmp_path, name):
    cfg, kind = _configs(tmp_path)[name]
    train = load_split(cfg, cfg.train_split, cfg.num_train)
    test = load_test_split(cfg, cfg.num_test)
    _assert_disjoint(train, test)
    assert plan_heldout(cfg).kind == kind
    assert len(test) == cfg.num_test
    assert check_heldout(cfg, train, test) == heldout_description(cfg)
    if kind == "carved":  # every other row trains; the held-out rows keep their training-split ids
        assert len(load_split(cfg, cfg.train_split, None)) + len(test) == heldout.carve_for(cfg).distinct
        assert all(e.id.startswith("train-") for e in test)


def test_the_carve_is_named_in_one_log_line(tmp_path, caplog):
    cfg = DataConfig(source=_jsonl(tmp_path / "train.jsonl", _rows(7500)), num_test=200)
    with caplog.at_level("INFO"):
        load_test_split(cfg, 200)
    line = f"held-out: 200 rows carved from {cfg.source} (it has no 'test' split;"
    assert line in caplog.text and "training uses the other 7,300" in caplog.text
    assert heldout_description(cfg).startswith(line)


def test_directory_files_are_split_by_name():
    names = ["d/train.jsonl", "d/test.jsonl", "d/train_eval.jsonl", "d/part-0.jsonl"]
    assert split_files(names, "train", "test") == ["d/train.jsonl", "d/train_eval.jsonl"]
    assert split_files(names, "train", "train_eval") == ["d/train.jsonl"]  # the longer name owns the file
    assert named_split_files(names, "train_eval", "train") == ["d/train_eval.jsonl"]
    assert split_files(["d/test.jsonl", "d/part-0.jsonl"], "train", "test") == ["d/part-0.jsonl"]
    assert split_files(["d/part-0.jsonl"], "train", "test") == ["d/part-0.jsonl"]
    assert named_split_files(["d/part-0.jsonl"], "test", "train") == []  # no test split: carve
    assert split_files(["d/part-0.jsonl"], "test") == ["d/part-0.jsonl"]  # without other_split: as before


def test_the_decision_rule():
    assert heldout_kind(separate_eval_source=True, same_split=True, has_test_split=False) == "eval_source"
    assert heldout_kind(separate_eval_source=False, same_split=True, has_test_split=True) == "training_split"
    assert heldout_kind(separate_eval_source=False, same_split=False, has_test_split=True) == "test_split"
    assert heldout_kind(separate_eval_source=False, same_split=False, has_test_split=False) == "carved"


def test_the_carve_is_deterministic_sized_and_ignores_row_order_and_seed(tmp_path):
    rows = _rows(300)
    cfg = DataConfig(source=_jsonl(tmp_path / "a.jsonl", rows), num_test=30, heldout_size=25)
    first = load_test_split(cfg, None)
    heldout._CARVES.clear()
    assert load_test_split(cfg, None, seed=7) == first and len(first) == 25  # heldout_size wins over num_test
    random.Random(0).shuffle(rows)
    shuffled = DataConfig(source=_jsonl(tmp_path / "b.jsonl", rows), num_test=30, heldout_size=25)
    assert {e.question for e in load_test_split(shuffled, None)} == {e.question for e in first}
    assert len(load_split(cfg, "train", None)) == 275
    assert len(load_split(cfg, "train", 100)) == 100  # num_train caps the rest, in source order
    assert load_test_split(cfg, 10) == first[:10]  # eval.num_problems below the slice
    assert load_test_split(cfg, 500) == first  # never more than the slice: the rest are training rows


def test_duplicate_questions_never_straddle_the_carve():
    rows = [Example(f"train-{i}", f"q {i % 50}", str(i % 50)) for i in range(100)]  # every question twice
    result = carve(rows, 10)
    assert len(result.heldout) == 10 and len(result.rest) == 80 and result.distinct == 50
    _assert_disjoint(result.rest, result.heldout)
    assert carve([Example("x", "  a  b ", "1"), Example("y", "a b", "1"), Example("z", "c", "2")], 1).distinct == 2
    with pytest.raises(ValueError):
        carve(rows, 50)


def test_eval_source_spelled_differently_is_the_same_source(tmp_path, monkeypatch):
    path = _jsonl(tmp_path / "data" / "train.jsonl", _rows(40))
    monkeypatch.chdir(tmp_path)
    cfg = DataConfig(source=path, eval_source="./data/../data/train.jsonl", num_test=8)
    assert plan_heldout(cfg).kind == "carved"
    _assert_disjoint(load_split(cfg, "train", None), load_test_split(cfg, 8))


def test_hub_dataset_without_a_test_split_is_carved(tmp_path, as_hub):
    import datasets

    source = str(Path(_jsonl(tmp_path / "hub" / "train.jsonl", _rows(40))).parent)
    with pytest.raises(ValueError) as info:  # what datasets says when a split is missing
        datasets.load_dataset(source, split="test")
    assert unknown_split(info.value) == ["train"]
    assert unknown_split(ValueError("something else")) is None
    assert unknown_split(RuntimeError("wrapped")) is None

    cfg = DataConfig(source=source, num_test=8)
    train, test = load_split(cfg, "train", None), load_test_split(cfg, 8)
    _assert_disjoint(train, test)
    assert len(train) == 32 and len(test) == 8
    assert "(it has no 'test' split; its splits: train;" in heldout_description(cfg)


def test_hub_dataset_with_a_test_split_keeps_it(tmp_path, as_hub):
    source = tmp_path / "hub"
    _jsonl(source / "train.jsonl", _rows(40))
    _jsonl(source / "test.jsonl", _rows(8, start=100))
    cfg = DataConfig(source=str(source), num_test=8)
    train, test = load_split(cfg, "train", None), load_test_split(cfg, 8)
    _assert_disjoint(train, test)
    assert len(train) == 40 and plan_heldout(cfg).kind == "test_split"


def test_directory_of_only_test_files_has_no_training_rows(tmp_path):
    cfg = DataConfig(source=str(Path(_jsonl(tmp_path / "d" / "test.jsonl", _rows(10))).parent), num_test=5)
    with pytest.raises(DataError, match="has no files for split 'train'"):
        load_split(cfg, "train", None)


def test_evaluating_the_training_split_is_refused_for_training(tmp_path):
    """``rltk eval --split train`` (teacher traces) keeps working; a training run refuses it."""
    cfg = DataConfig(source="builtin", test_split="train", num_train=50, num_test=10)
    train, test = load_split(cfg, "train", 50), load_test_split(cfg, 10)
    assert test == train[:10] and "these are training rows" in heldout_description(cfg)
    with pytest.raises(DataError, match="data.test_split = data.train_split"):
        check_heldout(cfg, train, test)
    copy = DataConfig(source=_jsonl(tmp_path / "a.jsonl", _rows(40)),
                      eval_source=_jsonl(tmp_path / "copy.jsonl", _rows(40)[:8]), num_test=8)
    with pytest.raises(DataError, match="every one of the 8 held-out problems"):
        check_heldout(copy, load_split(copy, "train", None), load_test_split(copy, 8))


def test_oversized_heldout_is_one_line_at_load(tmp_path):
    dup = [r for r in _rows(10) for _ in range(3)]  # 30 rows, 10 distinct questions
    cfg = DataConfig(source=_jsonl(tmp_path / "dup.jsonl", dup), heldout_size=10)
    for load in (lambda: load_split(cfg, "train", None), lambda: load_test_split(cfg, 10)):
        with pytest.raises(DataError) as info:
            load()
        message = str(info.value)
        assert "\n" not in message and message.startswith("data.heldout_size = 10:") and "10 distinct" in message
    unset = DataConfig(source=cfg.source, num_test=None)
    with pytest.raises(DataError, match="data.num_test is null; set data.heldout_size"):
        load_test_split(unset, None)


def test_oversized_heldout_fails_when_the_recipe_loads(tmp_path):
    source = _jsonl(tmp_path / "small.jsonl", _rows(60))
    with pytest.raises(ConfigError, match=r"^data.num_test \(data.heldout_size unset\) = 200: .* only 60 rows"):
        build_recipe({"data": {"source": source}})  # default num_test 200 > 60 rows
    with pytest.raises(ConfigError, match="^data.heldout_size = 60:"):
        build_recipe({"data": {"source": source, "heldout_size": 60}})
    with pytest.raises(ConfigError, match="data.heldout_size: must be > 0"):
        build_recipe({"data": {"source": source, "heldout_size": 0}})
    assert build_recipe({"data": {"source": source, "heldout_size": 59}}).data.heldout_size == 59
    build_recipe({"data": {"source": source, "eval_source": "builtin"}})  # held out elsewhere: no carve
    pq_dir = Path(_parquet(tmp_path / "pq" / "part.parquet", _rows(5))).parent
    with pytest.raises(ConfigError, match="only 5 rows"):
        build_recipe({"data": {"source": str(pq_dir), "num_test": 5}})


@pytest.mark.parametrize("command", ["train", "check"])
def test_cli_exits_2_with_one_line_for_an_oversized_heldout(tmp_path, capsys, command):
    from rltk.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"source": _jsonl(tmp_path / "small.jsonl", _rows(20)),
                                               "heldout_size": 20},
                                      "trainer": {"output_dir": str(tmp_path / "run")}}))
    args = [command, str(recipe)] + (["--launch", str(Path(__file__).parents[1] / "launch" / "ddp.yaml")]
                                     if command == "check" else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rltk: error: data.heldout_size = 20:") and "\n" not in err


def _file_recipe(tmp_path: Path, model_dir: str, **data):
    from tests.conftest import small_recipe_data

    source = _jsonl(tmp_path / "train.jsonl", _rows(72))
    recipe = small_recipe_data(model_dir, tmp_path / "run", data={"source": source, "template": "compact",
                                                                   "num_train": None, **data})
    return build_recipe(recipe)


def test_the_trainer_and_rltk_eval_report_the_carved_heldout(tmp_path, tiny_model_dir):
    from rltk.trainer.rl import RLTrainer
    from rltk.workflows import evaluate_model

    recipe = _file_recipe(tmp_path, tiny_model_dir)
    trainer = RLTrainer(recipe)
    try:
        _assert_disjoint(trainer.train_examples, trainer.test_examples)
        assert (len(trainer.train_examples), len(trainer.test_examples)) == (64, 8)
        assert trainer.heldout.startswith(f"held-out: 8 rows carved from {recipe.data.source}")
        assert trainer.evaluate("t")["protocol"]["heldout"] == trainer.heldout
    finally:
        trainer.close()
    report = evaluate_model(recipe, tiny_model_dir, tmp_path / "eval", save_samples=False)
    assert report["protocol"]["heldout"] == trainer.heldout
    assert {p["id"] for p in report["per_problem"]} == {e.id for e in trainer.test_examples}


def test_the_trainer_refuses_to_evaluate_on_its_training_split(tmp_path, tiny_model_dir):
    from rltk.trainer.rl import RLTrainer

    with pytest.raises(DataError, match="data.test_split = data.train_split = 'train'"):
        RLTrainer(_file_recipe(tmp_path, tiny_model_dir, test_split="train"))


def test_a_split_name_that_prefixes_another_never_reads_its_files(tmp_path):
    folder = tmp_path / "d"
    _jsonl(folder / "train_eval.jsonl", _rows(30))
    _jsonl(folder / "train.jsonl", _rows(6, start=100))
    cfg = DataConfig(source=str(folder), train_split="train_eval", test_split="train", num_test=6)
    train, test = load_split(cfg, "train_eval", None), load_test_split(cfg, 6)
    _assert_disjoint(train, test)
    assert (len(train), len(test), plan_heldout(cfg).kind) == (30, 6, "test_split")
