"""The recipe's ``data`` section turned into examples and prompts."""
from __future__ import annotations

from rltk.config import ConfigError, DataConfig
from rltk.data.loaders import DataError, Example, load_examples
from rltk.data.templates import format_prompt


def load_split(cfg: DataConfig, split: str, num_examples: int | None, seed: int = 0, *,
               source: str | None = None) -> list[Example]:
    """Examples of ``split`` from ``source`` (default ``cfg.source``) with the recipe's field mapping."""
    return load_examples(
        source or cfg.source,
        split=split,
        prompt_field=cfg.prompt_field,
        answer_field=cfg.answer_field,
        solution_field=cfg.solution_field,
        levels=cfg.levels,
        num_examples=num_examples,
        seed=seed,
        subset=cfg.subset,
        extract_boxed_answer=cfg.extract_boxed_answer,
    )


def load_test_split(cfg: DataConfig, num_examples: int | None, seed: int = 0) -> list[Example]:
    """The held-out problems: ``eval_source`` if set, else the test split of ``source``."""
    return load_split(cfg, cfg.test_split, num_examples, seed, source=cfg.eval_source)


def build_prompts(examples: list[Example], cfg: DataConfig, tokenizer) -> list[str]:
    """Prompt text of every example with the recipe's template and chat settings."""
    if cfg.chat_template and getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("data.chat_template: the tokenizer has no chat template; set data.chat_template=false "
                          "or use a chat model")
    return [
        format_prompt(e.question, cfg.template, tokenizer=tokenizer, chat_template=cfg.chat_template,
                      system_prompt=cfg.system_prompt)
        for e in examples
    ]


def drop_long_prompts(examples: list[Example], prompts: list[str], tokenizer, max_length: int):
    """Skip prompts longer than ``max_length`` tokens; return the kept pairs and the skipped count."""
    kept = [(e, p) for e, p in zip(examples, prompts) if len(tokenizer(p, add_special_tokens=False)["input_ids"]) <= max_length]
    if not kept:
        raise DataError(f"every prompt is longer than data.max_prompt_length = {max_length} tokens; raise it")
    return [e for e, _ in kept], [p for _, p in kept], len(examples) - len(kept)
