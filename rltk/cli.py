"""``rltk`` command line: parse, load the recipe, call the library (docs/design.md §6).

Every user mistake (bad recipe, missing file, unknown stage, missing dataset column) ends with one
line on stderr and exit code 2; no traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from rltk.schema import ConfigError

EXIT_USAGE = 2
EXIT_FAILURE = 1
QUICKSTART_RECIPE = Path(__file__).with_name("resources") / "quickstart.yaml"


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="YAML recipe")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.lr=2e-6 algorithm.advantage[1].alpha=0.5")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rltk", description="LLM post-training RL toolkit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    quick = sub.add_parser("quickstart", help="tiny model + built-in task: SFT warm start, GRPO, pass@k before/after")
    quick.add_argument("--output-dir", default="runs/quickstart")
    quick.add_argument("--overwrite", action="store_true",
                       help="move an earlier run in the output directory aside to <dir>.old-<time> "
                            "(nothing is deleted)")
    quick.add_argument("overrides", nargs="*", help="dotted overrides of the embedded recipe")

    train = sub.add_parser("train", help="RL training from a recipe")
    _add_recipe_args(train)
    train.add_argument("--resume", action="store_true",
                       help="continue the run in trainer.output_dir from its newest verified checkpoint")
    train.add_argument("--overwrite", action="store_true",
                       help="move a run already in trainer.output_dir aside to <dir>.old-<time> and start afresh "
                            "(nothing is deleted)")
    train.add_argument("--allow-changes", action="store_true",
                       help="with --resume: accept recipe changes beyond the safe set (trainer.steps, save_every, "
                            "eval_every, keep_checkpoints, eval.*, logging.*)")

    sft = sub.add_parser("sft", help="supervised warm start on worked solutions")
    _add_recipe_args(sft)

    ev = sub.add_parser("eval", help="pass@k / avg@n / maj@k report of a model")
    ev.add_argument("--model", required=True, help="HF id or directory")
    ev.add_argument("--recipe", help="recipe whose data/eval sections to use (optional)")
    ev.add_argument("--data", help="builtin, a .jsonl/.parquet path or an HF dataset id (overrides the recipe)")
    ev.add_argument("--split", help="dataset split (default: the recipe's test split)")
    ev.add_argument("--levels", help="built-in task levels, e.g. 1,2")
    ev.add_argument("--n", type=int, help="samples per problem")
    ev.add_argument("--k", help="comma-separated k values (default: powers of two up to n)")
    ev.add_argument("--num-problems", type=int)
    ev.add_argument("--temperature", type=float)
    ev.add_argument("--top-p", type=float)
    ev.add_argument("--max-new-tokens", type=int)
    ev.add_argument("--seed", type=int)
    ev.add_argument("--out", default=None, help="report directory (default runs/eval/<the model path, '/' as '-'>); "
                                                "another model's report is never overwritten")
    ev.add_argument("--no-save-samples", action="store_true", help="do not write samples.jsonl")
    ev.add_argument("--sets", help="comma-separated names of the recipe's eval.sets, or 'all': one report per set "
                                   "under --out/<name>")
    ev.add_argument("overrides", nargs="*", help="dotted overrides")

    check = sub.add_parser("check", help="dry run: validate a recipe together with its accelerate launch config")
    _add_recipe_args(check)
    check.add_argument("--launch", help="accelerate config YAML (default: the recipe's '# launch:' comment)")
    check.add_argument("--num-processes", type=int, help="training processes (overrides the launch config's)")
    check.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU, GiB (default 80)")
    check.add_argument("--print", action="store_true",
                       help="first print the resolved recipe as YAML: its base: files merged, overrides applied")

    cmp_ = sub.add_parser("compare", help="run recipe variants on the same seed and data; one pass@k table and plot")
    _add_recipe_args(cmp_)
    cmp_.add_argument("--variants", required=True, help="comma-separated variant names or recipe paths")
    cmp_.add_argument("--output-dir", default=None, help="default: <trainer.output_dir>/compare")
    cmp_.add_argument("--seeds", default=None,
                      help="comma-separated trainer seeds, e.g. 0,1,2: every variant per seed (each seed its own warm "
                           "start), then mean pass@k with 95%% intervals over seeds and problems")

    # ---- REDI (docs/algorithms/redi.md): trace data, then SFT + REDI
    data = sub.add_parser("data", help="build training data from traces")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    pairs = data_sub.add_parser("pairs", help="REDI data: correct traces for SFT, one (correct, wrong) pair per prompt")
    pairs.add_argument("samples", help="samples.jsonl of `rltk eval`, or Open-R1-layout rows (file or HF dataset id)")
    pairs.add_argument("--out", required=True, help="pairs JSONL")
    pairs.add_argument("--sft-out", help="also write the deduplicated correct traces (prompt/completion JSONL)")
    pairs.add_argument("--min-chars", type=int, default=0, help="drop traces shorter than this")
    pairs.add_argument("--max-chars", type=int, help="drop traces longer than this")
    pairs.add_argument("--seed", type=int, default=0, help="seed of the per-prompt pair choice")
    pairs.add_argument("--format", choices=["preference", "unpaired"], default="preference",
                       help="prompt/chosen/rejected (default) or prompt/completion/label rows")
    pairs.add_argument("--split", default="train", help="split, when reading an HF dataset")
    pairs.add_argument("--exclude-source", default="", help="comma-separated `source` values of Open-R1 rows to skip")
    pairs.add_argument("--sft-per-prompt", type=int, help="SFT rows per prompt (default: every correct trace)")

    redi = sub.add_parser("redi", help="REDI: SFT on correct traces, then the REDI objective on (correct, wrong) pairs")
    _add_recipe_args(redi)
    redi.add_argument("--eval", action="store_true", help="held-out pass@k of the start and the final model")
    redi.add_argument("--overwrite", action="store_true",
                      help="move a run already in trainer.output_dir aside to <dir>.old-<time> (nothing is deleted)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also follow options (`--variants a,b trainer.lr=1e-5`): argparse leaves them over
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rltk.algos.registry import StageError
    from rltk.data.loaders import DataError
    from rltk.trainer.distributed import shutdown_process_group
    from rltk.trainer.guard import TrainingError

    completed = False
    try:
        status = _COMMANDS[args.command](args)
        completed = True
        return status
    except (ConfigError, DataError, StageError, PermissionError, FileNotFoundError) as exc:
        print(f"rltk: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingError as exc:
        print(f"rltk: training stopped: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("rltk: interrupted", file=sys.stderr)
        return 130
    finally:
        shutdown_process_group(completed)


def _cmd_train(args) -> int:
    from rltk.validate import load_recipe
    from rltk.workflows import train

    recipe = load_recipe(args.recipe, args.overrides)
    if args.allow_changes and not args.resume:
        raise ConfigError("--allow-changes only applies with --resume")
    result = train(recipe, resume=args.resume, overwrite=args.overwrite, allow_changes=args.allow_changes)
    print(f"done: final model at {result['model_dir']}")
    return 0


def _cmd_sft(args) -> int:
    from rltk.validate import load_recipe
    from rltk.workflows import sft_and_evaluate

    recipe = load_recipe(args.recipe, args.overrides)
    path, summary = sft_and_evaluate(recipe)
    print(f"SFT model at {path}; held-out avg@{recipe.eval.n} = {summary['avg@n']:.3f}")
    return 0


def _cmd_eval(args) -> int:
    from rltk.eval.report import format_passk_table
    from rltk.workflows import eval_out_dir, eval_recipe_from_args, evaluate_model, evaluate_model_sets

    recipe = eval_recipe_from_args(args)
    label = args.model.rstrip("/")
    if args.sets:
        names = [s.name for s in recipe.eval.sets] if args.sets == "all" else [
            s.strip() for s in args.sets.split(",") if s.strip()]
        out = eval_out_dir(args.model, args.out, names)
        reports = evaluate_model_sets(recipe, args.model, out, save_samples=not args.no_save_samples, sets=names)
        print(format_passk_table({f"{label} / {name}": r for name, r in reports.items()}))
        print("reports: " + ", ".join(f"{out}/{name}/report.md" for name in reports))
        return 0
    out = eval_out_dir(args.model, args.out, None)
    report = evaluate_model(recipe, args.model, out, save_samples=not args.no_save_samples)
    print(format_passk_table({label: report}))
    print(f"report: {out}/report.md")
    return 0


def _cmd_check(args) -> int:
    from rltk.launch_check import check_recipe_file

    if args.print:
        import yaml

        from rltk.validate import load_recipe

        resolved = load_recipe(args.recipe, args.overrides).to_dict()
        print(f"# {args.recipe}, resolved (base: files merged, overrides applied)")
        print(yaml.safe_dump(resolved, sort_keys=False, width=120), end="")
    for line in check_recipe_file(args.recipe, args.overrides, launch=args.launch, num_processes=args.num_processes,
                                  gpu_memory_gb=args.gpu_memory_gb):
        print(line)
    return 0


def _cmd_compare(args) -> int:
    from rltk.schema import ConfigError, load_recipe_data
    from rltk.workflows import compare, compare_seeds

    data, variants = load_recipe_data(args.recipe), args.variants.split(",")
    if args.seeds is None:
        table, out = compare(data, args.overrides, variants, args.output_dir)
    else:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
        table, out = compare_seeds(data, args.overrides, variants, args.output_dir, seeds)
    print(table)
    print(f"comparison: {out}/comparison.md")
    return 0


def _cmd_quickstart(args) -> int:
    from rltk.validate import load_recipe
    from rltk.workflows import quickstart

    recipe = load_recipe(QUICKSTART_RECIPE, [f"trainer.output_dir={args.output_dir}", *args.overrides])
    print(quickstart(recipe, overwrite=args.overwrite))
    return 0


def _cmd_data(args) -> int:
    from rltk.data.pairs import make_pairs

    excluded = tuple(s.strip() for s in args.exclude_source.split(",") if s.strip())
    stats = make_pairs(args.samples, args.out, sft_out=args.sft_out, min_chars=args.min_chars,
                       max_chars=args.max_chars, seed=args.seed, fmt=args.format, split=args.split,
                       exclude_sources=excluded, sft_per_prompt=args.sft_per_prompt)
    print("\n".join(stats.lines()))
    print(f"wrote {args.out} ({args.format})" + (f" and {args.sft_out}" if args.sft_out else ""))
    return 0


def _cmd_redi(args) -> int:
    from rltk.validate import load_recipe
    from rltk.workflows import run_redi

    result = run_redi(load_recipe(args.recipe, args.overrides), evaluate=args.eval, overwrite=args.overwrite)
    if "steps" in result:
        print(f"REDI: {result['steps']} steps on {result['rows']} {result['format']} rows")
    if result.get("table"):
        print(result["table"])
    print(f"done: final model at {result['model_dir']}")
    return 0


_COMMANDS = {"check": _cmd_check, "train": _cmd_train, "sft": _cmd_sft, "eval": _cmd_eval, "compare": _cmd_compare,
             "quickstart": _cmd_quickstart, "data": _cmd_data, "redi": _cmd_redi}


if __name__ == "__main__":
    sys.exit(main())
