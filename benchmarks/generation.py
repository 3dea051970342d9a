"""Generation tokens/s of the ``hf`` engine: plain ``generate`` vs the token budget vs continuous batching
vs rltk's decode loop that drops finished rows.

All modes sample the same rows (``--prompts`` prompts of varied length × ``--group-size``
completions) from the same model with the same seed, through ``rltk.engines.hf.HFEngine.generate``:

* ``plain``: ``rollout.batch_size`` rows per ``generate`` call, in order (the default);
* ``budget``: ``rollout.max_tokens_per_batch``: rows sorted by prompt length and cut into calls of
  at most ``--budget`` tokens (rows × (longest prompt + max_new_tokens)), at most ``--batch-size`` rows;
* ``continuous``: ``rollout.continuous_batching`` (transformers ``generate_batch``, paged KV cache,
  at most ``--batch-size`` rows at once);
* ``drop``: ``rollout.drop_finished`` (rltk's decode loop, ``batch_size`` rows per call in order,
  finished rows leave the batch and the KV cache); ``budget+drop``: both keys.

The model is rltk's tiny random Qwen2 (``rltk.models.build_tiny_model``); a random model almost never
samples EOS, so a forward hook adds ``--eos-bias`` to the EOS logit, which gives completion lengths a
geometric spread (many short, a few up to ``--max-new-tokens``), as in an RL batch. Prompts are random
characters, their lengths uniform in ``--prompt-lengths``. Runs alternate between the modes
(``--repeats`` rounds after one untimed warm-up round), each run re-seeded with ``--seed``; the script
prints the median time, the completion tokens (EOS included) per second and the ratio of each mode's
tokens/s to ``plain``'s. ``--modes plain,continuous:32`` gives a mode its own ``batch_size``. A benchmark, not a test: run it alone (two torch jobs on 2 cores slow each
other several-fold). Figures: benchmarks/README.md.

    python benchmarks/generation.py --threads 1 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

for _key, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                     ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_key, _value)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

MODES = ("plain", "budget", "continuous", "drop", "budget+drop")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=32, help="prompts (default 32)")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (default 8)")
    p.add_argument("--prompt-lengths", type=int, nargs=2, default=(8, 96), metavar=("MIN", "MAX"),
                   help="prompt lengths in tokens, uniform (default 8 96)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generation limit (default 128)")
    p.add_argument("--eos-bias", type=float, default=1.2,
                   help="added to the EOS logit (default 1.2: about 4%% EOS per token on the tiny model)")
    p.add_argument("--batch-size", type=int, default=128, help="rollout.batch_size (default 128, the quickstart's)")
    p.add_argument("--budget", type=int, default=None,
                   help="rollout.max_tokens_per_batch of the budget modes (default: the mode's batch size × "
                        "(mean prompt length + max new tokens), the plain calls' tokens on average)")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated, of {','.join(MODES)}; 'continuous:32' runs a mode with batch_size 32")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", default=None, help="a model directory (default: build the tiny model)")
    return p.parse_args(argv)


def make_prompts(tokenizer, count: int, lengths: tuple[int, int], seed: int) -> list[str]:
    """``count`` strings of random characters whose token lengths are uniform in ``lengths``."""
    from rltk.data.synthetic import CHARSET

    g = torch.Generator().manual_seed(seed)
    chars = [c for c in CHARSET if c.strip()]
    prompts = []
    for _ in range(count):
        n = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g))
        prompts.append("".join(chars[int(i)] for i in torch.randint(len(chars), (n,), generator=g)))
    return prompts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from rltk.engines.base import SamplingParams
    from rltk.engines.hf import HFEngine
    from rltk.models import build_tiny_model, load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or str(build_tiny_model(Path(tmp) / "tiny"))
        tokenizer = load_tokenizer(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    eos = tokenizer.eos_token_id

    def eos_bias(module, inputs, output):
        output[..., eos] += args.eos_bias
        return output

    model.lm_head.register_forward_hook(eos_bias)
    prompts = make_prompts(tokenizer, args.prompts, tuple(args.prompt_lengths), args.seed)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    modes = [m for m in args.modes.split(",") if m]
    engines = {}
    for mode in modes:  # "continuous:32": the mode with batch_size 32 (and its own default budget)
        kind, _, rows_per_call = mode.partition(":")
        if kind not in MODES:
            raise SystemExit(f"--modes: unknown mode '{kind}' (known: {', '.join(MODES)})")
        size = int(rows_per_call) if rows_per_call else args.batch_size
        mode_budget = args.budget or int(size * (statistics.mean(lengths) + args.max_new_tokens))
        engines[mode] = HFEngine(lambda: model, tokenizer, batch_size=size,
                                 max_tokens_per_batch=mode_budget if kind.startswith("budget") else None,
                                 continuous_batching=kind == "continuous", drop_finished=kind.endswith("drop"))
    params = SamplingParams(n=args.group_size, temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)
    times: dict[str, list[float]] = {m: [] for m in modes}
    tokens: dict[str, list[int]] = {m: [] for m in modes}
    truncated: dict[str, list[float]] = {m: [] for m in modes}

    def run(mode: str) -> tuple[float, int, float]:
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        out = engines[mode].generate(prompts, params)
        elapsed = time.perf_counter() - start
        return elapsed, int(out.completion_mask.sum()), float(out.truncated.float().mean())

    for mode in modes:  # warm-up round, untimed
        run(mode)
    for r in range(args.repeats):
        for mode in (modes if r % 2 == 0 else modes[::-1]):  # alternate the order round by round
            elapsed, n_tokens, trunc = run(mode)
            times[mode].append(elapsed)
            tokens[mode].append(n_tokens)
            truncated[mode].append(trunc)

    rows = args.prompts * args.group_size
    print(f"hf engine generation, tiny Qwen2 ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), "
          f"{args.prompts} prompts × {args.group_size} = {rows} rows, prompt lengths {min(lengths)}–{max(lengths)} "
          f"(mean {statistics.mean(lengths):.1f}), max_new_tokens {args.max_new_tokens}, EOS bias {args.eos_bias}, "
          f"batch_size {args.batch_size}, {args.threads} thread(s), "
          f"{args.repeats} timed round(s), torch {torch.__version__}, {platform.processor() or platform.machine()}")
    rates = {m: statistics.median(t / s for t, s in zip(tokens[m], times[m])) for m in modes}
    print(f"{'mode':<16}{'rows/call':>10}{'budget':>8}{'median s':>10}{'tokens':>9}{'tokens/s':>11}"
          f"{'truncated':>11}{'vs plain':>10}")
    for m in modes:
        ratio = f"{rates[m] / rates['plain']:.2f}" if "plain" in rates else "-"
        e = engines[m]
        print(f"{m:<16}{e.batch_size:>10}{e.max_tokens_per_batch or '-':>8}{statistics.median(times[m]):>10.2f}"
              f"{statistics.median(tokens[m]):>9.0f}{rates[m]:>11.0f}{statistics.mean(truncated[m]):>11.3f}{ratio:>10}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
