"""What the commands do, as library functions: train, SFT, evaluate, compare, quickstart."""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any


from rltk.schema import ConfigError, Recipe

from rltk.validate import build_recipe

log = logging.getLogger(__name__)


def _policy_path(recipe: Recipe) -> str | None:
    """Run the SFT warm start first when the recipe enables it; its output is the RL start."""
    if not recipe.sft.enabled:
        return None
    from rltk.trainer.sft import run_sft

    return str(run_sft(recipe))


def train(recipe: Recipe, *, resume: bool = False, evaluate_before: bool = True, overwrite: bool = False,
          allow_changes: bool = False, run=None) -> dict[str, Any]:
    """Optional SFT warm start, then RL; returns before/after evaluation reports and paths. The
    output directory is claimed first (rltk/trainer/run_dir.py): one holding another run is refused
    unless ``resume`` continues it or ``overwrite`` moves it aside; ``run`` is an earlier claim."""
    from rltk.trainer.rl import RLTrainer
    from rltk.trainer.run_dir import claim

    run = run or claim(recipe, "rl", resume=resume, overwrite=overwrite, allow_changes=allow_changes)
    policy = _policy_path(recipe)
    trainer = RLTrainer(recipe, policy_path=policy, resume=resume, run=run)
    try:
        return trainer.train(evaluate_before=evaluate_before)
    finally:
        trainer.close()


def evaluate_model(recipe: Recipe, model_path: str, out_dir: str | Path, *, save_samples: bool = True) -> dict:
    """pass@k report of ``model_path`` on the recipe's held-out problems (``rltk eval``)."""
    return evaluate_model_sets(recipe, model_path, out_dir, save_samples=save_samples, sets=None)[None]


def evaluate_model_sets(recipe: Recipe, model_path: str, out_dir: str | Path, *, save_samples: bool = True,
                        sets: list[str] | None = None) -> dict[str | None, dict]:
    """Reports of ``model_path`` on named ``eval.sets`` (``sets``: their names, each written under
    ``out_dir/<name>``), or with ``sets=None`` on the recipe's held-out data (key ``None``, written to
    ``out_dir``). The model and the engine are built once for all sets."""
    from dataclasses import replace

    from accelerate import Accelerator

    from rewards.math import MathVerifier
    from rltk.data.recipe import build_prompts, drop_long_prompts, heldout_description, load_test_split
    from rltk.eval.runner import EvalSettings, evaluate
    from rltk.models import load_model, load_tokenizer
    from rltk.engines.factory import make_engine, require_engine

    e, d = recipe.eval, recipe.data
    chosen: list = [None]
    if sets is not None:
        by_name = {s.name: s for s in e.sets}
        unknown = [name for name in sets if name not in by_name]
        if unknown or not sets:
            raise ConfigError(f"eval sets: unknown set '{unknown[0] if unknown else ''}'; the recipe's eval.sets are "
                              f"{', '.join(by_name) or 'empty'}")
        chosen = [by_name[name] for name in sets]
    require_engine(recipe.rollout)  # a missing vLLM fails before the model loads
    accelerator = Accelerator()
    tokenizer = load_tokenizer(model_path, recipe.model.trust_remote_code)
    model = load_model(model_path, recipe.model, trainable=False).to(accelerator.device)
    max_new = e.max_new_tokens or recipe.rollout.max_new_tokens
    engine = make_engine(recipe.rollout, lambda: model, tokenizer, d.max_prompt_length, accelerator=accelerator,
                         model_cfg=recipe.model, max_new_tokens=max_new)
    settings = EvalSettings(n=e.n, ks=tuple(e.ks) if e.ks else None, temperature=e.temperature, top_p=e.top_p,
                            max_new_tokens=max_new, batch_size=e.batch_size, maj=e.maj, seed=recipe.trainer.seed)
    reports: dict[str | None, dict] = {}
    with MathVerifier(deadline_s=recipe.verifier.deadline_s, num_workers=recipe.verifier.num_workers) as verifier:
        for spec in chosen:
            data, num, out = d, e.num_problems or d.num_test, Path(out_dir)
            if spec is not None:
                data = replace(d, eval_source=spec.source, test_split=spec.split, subset=spec.subset,
                               prompt_field=spec.prompt_field or d.prompt_field,
                               answer_field=spec.answer_field or d.answer_field,
                               extract_boxed_answer=d.extract_boxed_answer if spec.extract_boxed_answer is None
                               else spec.extract_boxed_answer)
                num, out = spec.num_problems, out / spec.name
            examples = load_test_split(data, num, seed=recipe.trainer.seed)
            examples, prompts, skipped = drop_long_prompts(examples, build_prompts(examples, data, tokenizer),
                                                           tokenizer, data.max_prompt_length)
            protocol = {"model": model_path, "template": data.template, "data": data.eval_source or data.source,
                        "heldout": heldout_description(data), "skipped_long_prompts": skipped,
                        "engine": recipe.rollout.engine}
            if spec is not None:
                protocol["eval_set"] = spec.name
            reports[None if spec is None else spec.name] = evaluate(
                engine, examples, prompts, verifier, settings, accelerator=accelerator, out_dir=out,
                protocol=protocol, progress=recipe.logging.progress, save_samples=save_samples)
    return reports


def eval_recipe_from_args(args) -> Recipe:
    """The recipe ``rltk eval`` runs with: ``--recipe`` (or defaults) plus flags and overrides."""
    from rltk.schema import load_recipe_data

    data = load_recipe_data(args.recipe) if args.recipe else {}
    overrides = list(args.overrides)
    flag_map = {"data": "data.eval_source", "split": "data.test_split", "n": "eval.n",
                "num_problems": "eval.num_problems", "temperature": "eval.temperature", "top_p": "eval.top_p",
                "max_new_tokens": "eval.max_new_tokens", "seed": "trainer.seed"}
    for flag, key in flag_map.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.levels:
        overrides.append(f"data.levels=[{args.levels}]")
    if args.k:
        overrides.append(f"eval.ks=[{args.k}]")
    if args.data and args.data != "builtin" and not args.recipe:
        overrides.append("data.template=boxed")
    return build_recipe(data, overrides)


def eval_name(model: str) -> str:
    """The directory name of ``model``'s reports under ``runs/eval`` (``rltk eval`` without ``--out``):
    the model as given — a local path relative to the working directory when it lies inside it, else
    absolute; a Hub id as is — with a leading ``runs/`` dropped and every separator or other character
    outside ``[A-Za-z0-9._-]`` as ``-``: ``runs/quickstart/checkpoints/step-000400/model`` ->
    ``quickstart-checkpoints-step-000400-model``, ``Qwen/Qwen2.5-Math-1.5B`` -> ``Qwen-Qwen2.5-Math-1.5B``.
    A name longer than 120 characters keeps its last 100 and a hash of the whole."""
    import hashlib
    import os
    import re

    path = Path(os.path.expanduser(model.rstrip("/")))
    if path.exists():
        path = path.resolve()
        if path.is_relative_to(Path.cwd().resolve()):
            path = path.relative_to(Path.cwd().resolve())
    parts = [p for p in path.parts if p not in (path.anchor, ".")]
    if len(parts) > 1 and parts[0] == "runs":
        parts = parts[1:]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(parts)).strip("-.") or "model"
    if len(name) > 120:
        name = f"{name[-100:].lstrip('-.')}-{hashlib.sha1(model.encode()).hexdigest()[:8]}"
    return name


def _same_model(stored, model: str) -> bool:
    """Whether a report's ``protocol.model`` names ``model``: the same string, or the same local path."""
    if not isinstance(stored, str):
        return False
    if stored.rstrip("/") == model.rstrip("/"):
        return True
    a, b = Path(stored), Path(model)
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def eval_out_dir(model: str, out: str | None, sets: list[str] | None) -> Path:
    """Where ``rltk eval`` writes ``model``'s reports: ``out``, else ``runs/eval/<eval_name(model)>``.
    Another model's report is never overwritten: a ``report.json`` there (in ``<dir>/<set>/`` for each
    of ``sets``) that names another model — or none — is refused with one line before anything loads;
    the same model's report is replaced."""
    import json

    directory = Path(out) if out else Path("runs/eval") / eval_name(model)
    for report in [directory / "report.json"] if sets is None else [directory / name / "report.json" for name in sets]:
        if not report.is_file():
            continue
        try:
            stored = json.loads(report.read_text())["protocol"]["model"]
        except (OSError, ValueError, KeyError, TypeError):
            stored = None
        if not _same_model(stored, model):
            raise ConfigError(f"{report.parent} holds the report of another model ({stored}); rltk eval does not "
                              f"overwrite it: pass --out with another directory, or move that one")
    return directory


def sft_and_evaluate(recipe: Recipe) -> tuple[Path, dict]:
    """``rltk sft``: the warm start alone, then its held-out pass@k."""
    from rltk.trainer.sft import run_sft

    from rltk.trainer.run_dir import output_dir

    path = run_sft(recipe, force=True)
    report = evaluate_model(recipe, str(path), output_dir(recipe) / "eval" / "sft")
    return path, report["summary"]


# ---------------------------------------------------------------------------------- compare

# Algorithm sections of the named variants; each replaces the recipe's advantage/loss/aggregation.
VARIANTS: dict[str, dict[str, Any]] = {
    "grpo": {"advantage": [{"name": "grpo"}]},
    "dr_grpo": {"advantage": [{"name": "dr_grpo"}], "aggregation": "seq_mean_token_sum_norm"},
    "dapo": {"advantage": [{"name": "grpo"}, {"name": "zero_variance_filter"}],
             "loss": {"name": "ppo_clip", "epsilon_low": 0.2, "epsilon_high": 0.28}, "aggregation": "token_mean"},
    "rloo": {"advantage": [{"name": "rloo"}]},
    "reinforce": {"advantage": [{"name": "reinforce", "baseline": "batch_mean"}]},
    "psr": {"advantage": [{"name": "psr"}]},
    "nsr": {"advantage": [{"name": "nsr"}]},
    "w_reinforce": {"advantage": [{"name": "w_reinforce", "lam": 0.1}]},
    "ace": {"advantage": [{"name": "grpo"}, {"name": "ace", "alpha": 1.0}]},
    "resrl": {"advantage": [{"name": "grpo"}, {"name": "resrl"}]},
    "weighted_grpo": {"advantage": [{"name": "weighted_grpo", "lam": 1.0}], "sampler": {"name": "pairing", "probe_size": 256}},
    "garl_binary": {"advantage": [{"name": "garl", "mode": "binary", "q": 0.75}], "aggregation": "seq_mean_token_sum"},
    "garl": {"advantage": [{"name": "garl", "mode": "likelihood", "q": 0.75}], "aggregation": "seq_mean_token_sum"},
    "paft": {"advantage": [{"name": "grpo"}], "loss": {"name": "paft", "mode": "likelihood", "q": 0.75},
             "aggregation": "seq_mean_token_sum"},
}


def variant_data(base: dict[str, Any], variant: str) -> dict[str, Any]:
    """The raw recipe of one variant: a named algorithm preset, or a recipe file path."""
    if variant in VARIANTS:
        data = copy.deepcopy(base)
        data.setdefault("algorithm", {}).update(copy.deepcopy(VARIANTS[variant]))
        return data
    if Path(variant).is_file():
        from rltk.schema import load_recipe_data

        return load_recipe_data(variant)
    raise ConfigError(f"--variants: unknown variant '{variant}'; named variants: {', '.join(VARIANTS)}, "
                      "or a path to a recipe file")


def variant_name(variant: str) -> str:
    """A variant's name in the table and its run directory under the comparison: the preset's name,
    or a recipe file's stem (``/abs/path/nsr_lr.yaml`` -> ``nsr_lr``), never a path."""
    return variant if variant in VARIANTS else Path(variant).stem


def compare(base: dict[str, Any], overrides: list[str], variants: list[str], output_dir: str | None):
    """Train every variant from the same warm start, seed and data; one pass@k table and plot.

    A variant whose run directory holds a finished run of exactly its recipe is not trained again:
    its saved reports are used, so a long comparison can be run a few variants at a time (or
    resumed after an interruption) and the last call tabulates and plots them all. An unfinished
    run of its recipe (or one differing only in rltk.trainer.run_dir.SAFE_KEYS) is resumed; a run
    of another recipe is never replaced: that is a one-line error naming the changed keys.
    """
    from rltk.eval.report import write_comparison, write_learning_curves

    variants = [v.strip() for v in variants if v.strip()]
    names = [variant_name(v) for v in variants]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"--variants: two variants would share the run directory '{twice[0]}'; name the recipe "
                          "files differently")
    recipes = {n: build_recipe(variant_data(base, v), overrides) for n, v in zip(names, variants)}  # validate all first
    first = next(iter(recipes.values()))
    out = Path(output_dir or Path(first.trainer.output_dir) / "compare").expanduser()
    start_model = _shared_warm_start(first, out)
    reports: dict[str, dict] = {}
    for name, recipe in recipes.items():
        recipe.trainer.output_dir = str(out / name)
        recipe.sft.enabled = False
        if start_model:
            recipe.model.name_or_path = start_model
        result = _finished_run(recipe, out / name) or train(recipe, evaluate_before="start" not in reports,
                                                            resume=_resumable_variant(recipe, out / name))
        if "before" in result:
            reports["start"] = result["before"]
        reports[name] = result["after"]
    title = f"pass@k after RL (seed {first.trainer.seed})"
    table = write_comparison(out, reports, title)
    curves = {name: _eval_curve(out / name) for name in recipes}
    if "start" in reports:  # every variant starts from the same evaluated warm start
        start = reports["start"]["summary"]["avg@n"]
        curves = {name: dict(sorted({0: start, **curve}.items())) for name, curve in curves.items()}
    if any(len(c) > 2 for c in curves.values()):  # evaluated during training: pass rate against step
        table += "\n\n" + write_learning_curves(out, curves, f"held-out avg@{first.eval.n} (seed {first.trainer.seed})",
                                                  f"avg@{first.eval.n}")
    return table, out


def compare_seeds(base: dict[str, Any], overrides: list[str], variants: list[str], output_dir: str | None,
                  seeds: list[int]):
    """:func:`compare` once per seed (``trainer.seed``; each seed its own warm start, shared by its
    variants) under ``<output_dir>/seed-<s>``, then one table of each variant's mean pass@k over seeds
    with 95% intervals over seeds and over problems, the paired differences to the first variant,
    and a plot with bands (rltk/eval/seeds.py). Finished variants are reused as by :func:`compare`,
    so seeds can be added later."""
    from rltk.eval.seeds import aggregate, final_report, start_report, write_seed_comparison

    if len(set(seeds)) != len(seeds) or not seeds:
        raise ConfigError(f"--seeds: expected distinct seeds, got {','.join(map(str, seeds)) or 'none'}")
    first = build_recipe(variant_data(base, variants[0].strip()), overrides)
    out = Path(output_dir or Path(first.trainer.output_dir) / "compare").expanduser()
    names = [variant_name(v.strip()) for v in variants if v.strip()]
    per_seed: dict[int, dict[str, list[dict]]] = {}
    ks: set[int] = set()
    for seed in seeds:
        _, seed_out = compare(base, [*overrides, f"trainer.seed={seed}"], variants, str(out / f"seed-{seed}"))
        started = next((seed_out / n for n in names if (seed_out / n / "eval" / f"step-{0:06d}").is_dir()), None)
        runs = {"start": start_report(started)["per_problem"]} if started is not None else {}
        for name in names:
            report = final_report(seed_out / name)
            runs[name] = report["per_problem"]
            ks |= {int(k) for k in report["summary"]["pass@k"]}
        per_seed[seed] = runs
    stats = aggregate(per_seed, sorted(ks), baseline=names[0])
    table = write_seed_comparison(out, stats, f"pass@k after RL, mean over seeds {','.join(map(str, seeds))}", seeds,
                                  baseline=names[0])
    return table, out


def _finished_run(recipe: Recipe, run_dir: Path) -> dict[str, dict] | None:
    """The before/after summaries (as reports) of a run in ``run_dir`` that finished with exactly
    ``recipe`` (its ``result.json`` and ``recipe.json``), or None."""
    import json

    result, saved = run_dir / "result.json", run_dir / "recipe.json"
    if not (result.is_file() and saved.is_file()):
        return None
    if json.loads(saved.read_text()) != json.loads(json.dumps(recipe.to_dict())):
        return None
    summaries = json.loads(result.read_text())
    log.info("compare: %s already finished with this recipe; reusing its reports", run_dir)
    return {k: {"summary": summaries[k]} for k in ("before", "after") if k in summaries}


def _resumable_variant(recipe: Recipe, run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run to continue (of this recipe up to the safe keys); a run of
    another recipe is a ConfigError, so a comparison never replaces a run it did not make."""
    from rltk.trainer import run_dir as rd

    if not rd.run_contents(run_dir):
        return False
    identity = rd.read_identity(run_dir)
    if identity is None:
        return True  # a run from an older rltk: --resume checks it against its recipe.json
    changes = [c for c in rd.recipe_changes(identity.get("recipe") or {}, rd.plain_recipe(recipe))
               if not rd.is_safe_key(c[0])]
    if identity.get("kind") != "rl" or changes:
        what = rd.format_changes(changes) if changes else f"a {identity.get('kind')} run"
        raise ConfigError(f"compare: {run_dir} holds a run of another recipe ({what}); move it away or use "
                          "another --output-dir")
    return True


def _eval_curve(run_dir: Path) -> dict[int, float]:
    """Held-out avg@n by step from a run's metrics.jsonl."""
    import json

    curve = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "eval/avg@n" in row:
            curve[int(row["step"])] = float(row["eval/avg@n"])
    return curve


def _shared_warm_start(recipe: Recipe, out: Path) -> str | None:
    if not recipe.sft.enabled:
        return None
    from rltk.trainer.sft import run_sft

    shared = copy.deepcopy(recipe)
    shared.trainer.output_dir = str(out)
    return str(run_sft(shared))


# ---------------------------------------------------------------------------------- quickstart


def quickstart(recipe: Recipe, *, overwrite: bool = False) -> str:
    """Tiny model + built-in task: SFT warm start, RL, pass@k before/after, report, summary.
    ``overwrite`` moves an earlier quickstart run in the output directory aside first."""
    from rltk.eval.report import write_comparison
    from rltk.trainer.run_dir import claim, output_dir, plain_recipe
    from rltk.trainer.sft import run_sft

    start = time.perf_counter()
    run = claim(recipe, "rl", overwrite=overwrite, resumable=False)  # before the warm start writes into it
    sft_path = run_sft(recipe)
    sft_seconds = time.perf_counter() - start
    recipe.model.name_or_path = str(sft_path)
    recipe.sft.enabled = False
    run.recipe = plain_recipe(recipe)  # the recipe RL runs with: the warm start as its model
    start = time.perf_counter()
    result = train(recipe, run=run)
    rl_seconds = time.perf_counter() - start
    out = output_dir(recipe)
    reports = {"warm start (SFT)": result["before"], f"after RL ({_algo_name(recipe)})": result["after"]}
    table = write_comparison(out / "report", reports, f"built-in task, seed {recipe.trainer.seed}")
    before, after = result["before"]["summary"], result["after"]["summary"]
    n, t = recipe.eval.n, recipe.trainer
    lines = [
        f"rltk quickstart: seed {t.seed}, built-in task levels {recipe.data.levels}, "
        f"{after['num_problems']} held-out problems",
        f"SFT warm start: {recipe.sft.steps} steps in {sft_seconds:.0f} s -> {sft_path}",
        f"RL ({_algo_name(recipe)}): {t.steps} steps x {t.prompts_per_step} prompts x {recipe.rollout.group_size} "
        f"samples in {rl_seconds:.0f} s (incl. evaluation)",
        f"held-out avg@{n}: {before['avg@n']:.3f} -> {after['avg@n']:.3f} "
        f"({100 * (after['avg@n'] - before['avg@n']):+.1f} points)",
        table,
        f"report: {out / 'report' / 'comparison.md'} (curve: comparison.png)",
        f"final model: {result['model_dir']}",
    ]
    return "\n".join(lines)


def _algo_name(recipe: Recipe) -> str:
    names = [a["name"] if isinstance(a, dict) else a for a in recipe.algorithm.advantage]
    return "+".join(names)


# ---------------------------------------------------------------------------------- REDI


def run_redi(recipe: Recipe, *, evaluate: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """``rltk redi`` (docs/algorithms/redi.md): stage 1 (the SFT warm start, when ``sft.enabled``, on
    the recipe's data or on ``redi.sft_data``), stage 2 (:class:`rltk.trainer.redi.RediTrainer`,
    when ``redi.data``), then optionally the held-out pass@k of the start and final models. Returns
    paths, counts and (with ``evaluate``) the pass@k table; ``<output_dir>/redi_result.json`` holds
    the same. ``overwrite`` moves a run already in ``trainer.output_dir`` aside."""
    from accelerate import PartialState

    from rltk.data.redi import read_redi_table
    from rltk.io import atomic_write_json
    from rltk.models import resolve_model_path
    from rltk.trainer.redi import RediTrainer
    from rltk.trainer.run_dir import check_recipe_paths, claim, output_dir
    from rltk.trainer.sft import run_sft

    cfg = recipe.redi
    check_recipe_paths(recipe)  # both stages' directories, before anything is read or written
    _check_scheduler(cfg.lr_scheduler)
    if cfg.data is None and not recipe.sft.enabled:
        raise ConfigError("redi.data: not set and sft.enabled is false, so there is nothing to train; point "
                          "redi.data at a pairs file (`rltk data pairs`) or enable stage 1")
    if cfg.sft_data and not recipe.sft.enabled:
        log.warning("sft.enabled is false: stage 1 is skipped and redi.sft_data unused")
    elif cfg.sft_data:
        _check_source("redi.sft_data", cfg.sft_data)
    table = read_redi_table(cfg.data) if cfg.data else None  # bad data fails before stage 1
    run = claim(recipe, "redi", overwrite=overwrite, resumable=False)  # before stage 1 writes anything
    out = output_dir(recipe)
    result: dict[str, Any] = {}
    if recipe.sft.enabled:
        start = time.perf_counter()
        result["sft_dir"] = start_model = str(run_sft(sft_recipe(recipe)))
        result["sft_seconds"] = time.perf_counter() - start
    else:
        start_model = resolve_model_path(recipe.model, out)
    result["start_model"] = start_model
    result["model_dir"] = start_model
    if table is not None:
        result.update(RediTrainer(recipe, start_model, table, run=run).train())
    run.start()  # (stage 1 only: the identity goes with the result)
    if evaluate:
        result["table"] = _evaluate_redi(recipe, result, out, with_start=table is not None)
    if PartialState().is_main_process:
        atomic_write_json(out / "redi_result.json", result)
    return result


def sft_recipe(recipe: Recipe) -> Recipe:
    """The recipe REDI's stage 1 runs with: ``redi.sft_data`` (prompt/completion rows) in place of
    the data section when set, and ``sft.steps`` from ``redi.sft_epochs`` when set."""
    import math
    import os

    from rltk.data.recipe import load_split

    r = copy.deepcopy(recipe)
    if recipe.redi.sft_data:
        d = r.data
        d.source, d.subset, d.train_split = recipe.redi.sft_data, None, "train"
        d.eval_source = recipe.data.eval_source or recipe.data.source  # the recipe's held-out set: none carved from the traces
        d.prompt_field, d.answer_field, d.solution_field = "prompt", "completion", "completion"
        d.extract_boxed_answer = False
        if not recipe.redi.format_prompts:  # prompts as written (run_sft appends the EOS to completions)
            d.template, d.chat_template, d.system_prompt = "{question}", False, None
        r.sft.num_examples = None  # every row of the file
    if recipe.redi.sft_epochs:
        rows = len(load_split(r.data, r.data.train_split, r.sft.num_examples, seed=r.trainer.seed))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        r.sft.steps = max(1, math.ceil(recipe.redi.sft_epochs * rows / (r.sft.batch_size * world)))
        log.info("stage 1: %g epochs over %d examples = %d steps of %d", recipe.redi.sft_epochs, rows, r.sft.steps,
                 r.sft.batch_size * world)
    return r


def _check_source(key: str, source: str) -> None:
    """Fail before any training when a local data file named in the recipe is missing."""
    from rltk.data.loaders import DataError

    path = Path(source)
    if path.suffix in (".jsonl", ".json", ".parquet") and not path.exists():
        raise DataError(f"{key}: file not found: {source}")


def _check_scheduler(name: str) -> None:
    from transformers.trainer_utils import SchedulerType

    try:
        SchedulerType(name)
    except ValueError:
        names = ", ".join(s.value for s in SchedulerType)
        raise ConfigError(f"redi.lr_scheduler: unknown scheduler '{name}'; use one of {names}") from None


def _evaluate_redi(recipe: Recipe, result: dict[str, Any], out: Path, *, with_start: bool) -> str:
    """pass@k of the start model (SFT or base) and the final model; ``<output_dir>/report``."""
    from accelerate import PartialState

    from rltk.eval.report import write_comparison

    start_name = "SFT (stage 1)" if "sft_dir" in result else "start"
    reports = {}
    if with_start:
        reports[start_name] = evaluate_model(recipe, result["start_model"], out / "eval" / "start")
        reports["SFT + REDI" if "sft_dir" in result else "REDI"] = evaluate_model(recipe, result["model_dir"],
                                                                                  out / "eval" / "redi")
    else:
        reports[start_name] = evaluate_model(recipe, result["model_dir"], out / "eval" / "start")
    result["eval"] = {name: r["summary"] for name, r in reports.items()}
    if not PartialState().is_main_process:
        return ""
    return write_comparison(out / "report", reports, f"REDI, held-out pass@k (seed {recipe.trainer.seed})")
