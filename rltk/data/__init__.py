"""Built-in synthetic math task, dataset loaders and prompt templates."""

from rltk.data.loaders import (
    DataError,
    Example,
    LoadStats,
    load_examples,
    load_examples_with_stats,
)
from rltk.data.synthetic import CHARSET, LEVELS, Problem, generate_problems, split_of
from rltk.data.templates import TEMPLATES, format_prompt

__all__ = [
    "CHARSET",
    "LEVELS",
    "TEMPLATES",
    "DataError",
    "Example",
    "LoadStats",
    "Problem",
    "format_prompt",
    "generate_problems",
    "load_examples",
    "load_examples_with_stats",
    "split_of",
]
