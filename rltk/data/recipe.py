"""The recipe's ``data`` section turned into examples and prompts."""
from __future__ import annotations

import logging

from rltk.schema import ConfigError, DataConfig
from rltk.data.heldout import carve_for, plan_heldout, question_key, same_source
from rltk.data.loaders import DataError, Example, load_examples
from rltk.data.templates import format_prompt

log = logging.getLogger(__name__)


def _load(cfg: DataConfig, split: str, num_examples: int | None, seed: int, source: str,
          other_split: str | None = None) -> list[Example]:
    return load_examples(
        source,
        split=split,
        prompt_field=cfg.prompt_field,
        answer_field=cfg.answer_field,
        solution_field=cfg.solution_field,
        levels=cfg.levels,
        num_examples=num_examples,
        seed=seed,
        subset=cfg.subset,
        extract_boxed_answer=cfg.extract_boxed_answer,
        other_split=other_split,
    )


def load_split(cfg: DataConfig, split: str, num_examples: int | None, seed: int = 0, *,
               source: str | None = None) -> list[Example]:
    """Examples of ``split`` from ``source`` (default ``cfg.source``) with the recipe's field mapping.

    The training split of the recipe's own source never holds held-out rows: when the held-out set
    is carved from it (:mod:`rltk.data.heldout`), the carved questions are left out, and in a
    directory the files named after ``cfg.test_split`` are never training files."""
    if source is not None and not same_source(cfg.source, source):
        return _load(cfg, split, num_examples, seed, source)
    if split != cfg.train_split:
        return _load(cfg, split, num_examples, seed, cfg.source)
    if plan_heldout(cfg).kind == "carved":
        if num_examples is not None and num_examples < 1:
            raise DataError(f"num_examples must be >= 1; got {num_examples}")
        return carve_for(cfg).rest[:num_examples]
    return _load(cfg, split, num_examples, seed, cfg.source,
                 other_split=None if cfg.test_split == split else cfg.test_split)


def load_test_split(cfg: DataConfig, num_examples: int | None, seed: int = 0) -> list[Example]:
    """The held-out problems (:func:`rltk.data.heldout.plan_heldout`, logged as one line): ``eval_source``
    if set to another source, else the source's test split, else the slice carved from its training
    rows; ``num_examples`` caps them (a carved slice holds ``data.heldout_size`` rows at most)."""
    plan = plan_heldout(cfg)
    log.info(plan.describe())
    if plan.kind == "carved":
        rows = carve_for(cfg).heldout
        if num_examples is not None and num_examples > len(rows):
            log.info("held-out: evaluating all %d carved rows (%d asked for; raise data.heldout_size for more)",
                     len(rows), num_examples)
        return rows[:num_examples]
    if plan.kind == "eval_source":
        return _load(cfg, cfg.test_split, num_examples, seed, str(cfg.eval_source))
    return _load(cfg, cfg.test_split, num_examples, seed, cfg.source,
                 other_split=None if plan.kind == "training_split" else cfg.train_split)


def heldout_description(cfg: DataConfig) -> str:
    """The one line naming where ``cfg``'s held-out rows come from (the report protocol's ``heldout``)."""
    return plan_heldout(cfg).describe()


def check_heldout(cfg: DataConfig, train: list[Example], test: list[Example]) -> str:
    """For a training run: refuse evaluation rows that are training rows (``data.test_split`` equal to
    ``data.train_split``, or every held-out question among the training questions), warn about a
    partial overlap (same question text), and return :func:`heldout_description`'s line."""
    plan = plan_heldout(cfg)
    if plan.kind == "training_split":
        raise DataError(f"data.test_split = data.train_split = '{cfg.train_split}': evaluation would run on the "
                        "training rows; set data.eval_source or another data.test_split (a source without one gets "
                        "a carved held-out slice, docs/recipes.md)")
    seen = {question_key(e.question) for e in train}
    shared = sum(question_key(e.question) in seen for e in test)
    if test and shared == len(test):
        raise DataError(f"every one of the {len(test)} held-out problems ({plan.source}) is also a training problem "
                        "(same question text); set data.eval_source to data the model does not train on")
    if shared:
        log.warning("held-out: %d of %d held-out problems also appear among the %d training rows (same question "
                    "text)", shared, len(test), len(train))
    return plan.describe()


def build_prompts(examples: list[Example], cfg: DataConfig, tokenizer) -> list[str]:
    """Prompt text of every example: a conversational prompt through the tokenizer's chat template
    (after ``data.system_prompt`` when the row has no system turn of its own), a standard one filled
    into ``data.template`` (and wrapped in the chat template with ``data.chat_template``); both with
    ``data.chat_template_kwargs``."""
    conversational = any(e.messages is not None for e in examples)
    if (cfg.chat_template or conversational) and getattr(tokenizer, "chat_template", None) is None:
        why = "the dataset's prompts are conversational (lists of messages)" if conversational else \
            "data.chat_template is true"
        raise ConfigError(f"{why}, but the tokenizer has no chat template; use a chat model's tokenizer"
                          + ("" if conversational else " or set data.chat_template=false"))
    prompts = []
    for e in examples:
        if e.messages is None:
            prompts.append(format_prompt(e.question, cfg.template, tokenizer=tokenizer, chat_template=cfg.chat_template,
                                         system_prompt=cfg.system_prompt, **cfg.chat_template_kwargs))
            continue
        messages = list(e.messages)
        if cfg.system_prompt is not None and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": cfg.system_prompt})
        prompts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                     **cfg.chat_template_kwargs))
    return prompts


MIN_CHARS_PER_TOKEN_BOUND = 64  # floor of the characters-per-token bound of drop_long_prompts


def max_chars_per_token(tokenizer) -> int:
    """An upper bound on the characters one token of ``tokenizer`` stands for: its longest vocabulary
    entry (byte-level entries hold one symbol per byte, so decoded text is never longer), and at
    least ``MIN_CHARS_PER_TOKEN_BOUND``."""
    try:
        longest = max((len(piece) for piece in tokenizer.get_vocab()), default=0)
    except Exception:  # a tokenizer without a readable vocabulary
        longest = 0
    return max(MIN_CHARS_PER_TOKEN_BOUND, longest)


def drop_long_prompts(examples: list[Example], prompts: list[str], tokenizer, max_length: int):
    """Skip prompts longer than ``max_length`` tokens; return the kept pairs and the skipped count.

    A prompt of more than ``max_length × max_chars_per_token(tokenizer)`` characters cannot fit and
    is skipped without being tokenized: a multi-megabyte row costs a length comparison, never a
    tokenizer run over all of it (which can exhaust memory or abort the process)."""
    char_limit = max_length * max_chars_per_token(tokenizer)
    kept = [(e, p) for e, p in zip(examples, prompts)
            if len(p) <= char_limit and len(tokenizer(p, add_special_tokens=False)["input_ids"]) <= max_length]
    if not kept:
        raise DataError(f"every prompt is longer than data.max_prompt_length = {max_length} tokens; raise it")
    return [e for e, _ in kept], [p for _, p in kept], len(examples) - len(kept)
