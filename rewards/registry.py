"""Reward functions by name, for recipes: ``{name: math}`` or ``{name: my_pkg.rewards:length}``.

Every reward function is called as TRL's GRPOTrainer calls it: by keyword, with ``prompts``,
``completions``, ``completion_ids``, ``trainer_state``, every dataset column of the completion's row
(one value per completion) and the recipe's ``kwargs`` for it; it returns one number or ``None`` per
completion. A function may be ``async def``. :func:`load_reward_function` checks, without calling
it, that a function can be called so and names the dataset columns it cannot do without.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rewards.format import format_reward
from rewards.length import overlong_reward
from rewards.math import math_reward
from rltk.describe import describe_exception, function_name

__all__ = ["CALL_ARGUMENTS", "REWARD_COLUMNS", "REWARD_FUNCTIONS", "RewardError", "RewardFunction",
           "check_reward_values", "get_reward_function", "load_reward_function"]

REWARD_FUNCTIONS: dict[str, Callable[..., list]] = {"math": math_reward, "format": format_reward,
                                                    "overlong": overlong_reward}
"""Built-in rewards, with TRL's signature ``fn(completions, **kwargs) -> list[float | None]``."""

CALL_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state")
"""What the RL trainer passes to every reward function besides the dataset's columns (TRL's names)."""

REWARD_COLUMNS = ("answer", "question")
"""Columns every row has, whatever the dataset: rltk's gold answer (as verified: extracted from
``\\boxed{}`` with ``data.extract_boxed_answer``) and the question text."""


@dataclass(frozen=True)
class RewardFunction:
    """A recipe's reward function, checked: its ``label`` (the recipe name), the callable, its weight,
    the recipe's extra keyword arguments and the dataset columns it needs (its required parameters
    that rltk does not pass itself)."""

    label: str
    fn: Callable[..., Any]
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    needs_columns: tuple[str, ...] = ()

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)

    def missing_columns(self, columns) -> list[str]:
        """The needed columns a row with ``columns`` lacks."""
        return [c for c in self.needs_columns if c not in columns]


class RewardError(ValueError):
    """A reward function raised or returned something other than one number (or None) per
    completion. ``where`` names the reward and its function, ``detail`` what went wrong."""

    def __init__(self, name: str, fn: Callable, detail: str):
        self.where = f"reward '{name}' ({function_name(fn)})"
        self.detail = detail
        super().__init__(f"{self.where} {detail}")


def get_reward_function(name: str) -> Callable[..., list]:
    """A registered reward by name, or any callable by import path ``"pkg.module:function"``.

    Raises:
        ValueError: one line naming the registered rewards, when ``name`` is neither; or naming
            the module and the error when it cannot be imported (a missing module, a syntax error,
            an exception while it is imported); or when the function is not callable.
    """
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    module_name, sep, attr = name.partition(":")
    if not (sep and module_name and attr):
        raise ValueError(
            f"unknown reward function {name!r}: use one of {', '.join(REWARD_FUNCTIONS)} "
            "or an import path 'package.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot load reward function {name!r}: {describe_exception(err)}") from None
    except Exception as err:  # a syntax error or an exception while the module runs
        raise ValueError(f"cannot load reward function {name!r}: importing module '{module_name}' failed with "
                         f"{describe_exception(err)}") from None
    function = getattr(module, attr, None)
    if function is None:
        raise ValueError(f"cannot load reward function {name!r}: module '{module_name}' has no attribute '{attr}'")
    if not callable(function):
        raise ValueError(f"reward function {name!r} is not callable")
    return function


def load_reward_function(name: str, weight: float = 1.0, kwargs: dict[str, Any] | None = None) -> RewardFunction:
    """The reward ``name`` (:func:`get_reward_function`), checked against the way it will be called:
    everything by keyword, so it must take ``**kwargs`` (TRL's rule: the trainer passes every dataset
    column), no positional-only parameter without a default, and no ``kwargs`` key that rltk passes
    itself. Its required parameters that rltk does not pass are the dataset columns it needs."""
    function = get_reward_function(name)
    kwargs = dict(kwargs or {})
    check_settings = getattr(function, "check_settings", None)  # a built-in's own check of its kwargs
    if check_settings is not None:
        check_settings(**kwargs)
    passed = set(CALL_ARGUMENTS) | set(REWARD_COLUMNS)
    clash = sorted(set(kwargs) & passed)
    if clash:
        raise ValueError(f"reward function {name!r}: kwargs key {clash[0]!r} is an argument rltk passes itself "
                         f"({', '.join(sorted(passed))})")
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # a builtin or extension callable: nothing to check
        return RewardFunction(name, function, weight, kwargs)
    if not any(p.kind is p.VAR_KEYWORD for p in parameters):
        raise ValueError(f"reward function {name!r} cannot be called as TRL calls it, fn(prompts=..., completions=..., "
                         "completion_ids=..., trainer_state=..., **dataset_columns): it takes no **kwargs; add "
                         "**kwargs to its parameters")
    for p in parameters:
        if p.kind is p.POSITIONAL_ONLY and p.default is p.empty:
            raise ValueError(f"reward function {name!r}: parameter {p.name!r} is positional-only, but every argument "
                             "is passed by keyword (as TRL does)")
    needs = tuple(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                  and p.default is p.empty and p.name not in passed and p.name not in kwargs)
    return RewardFunction(name, function, weight, kwargs, needs)


def check_reward_values(name: str, fn: Callable, values, count: int) -> list[float | None]:
    """``values`` as a list of ``count`` floats or None; a :class:`RewardError` naming the reward,
    its function and the first bad value otherwise (a string, a NaN, a nested list, a wrong
    length)."""
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):  # a 1-D tensor or array
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardError(name, fn, f"returned {type(values).__name__}; expected a list of {count} numbers "
                                    "(or None), one per completion")
    if len(values) != count:
        raise RewardError(name, fn, f"returned {len(values)} values for {count} completions")
    out: list[float | None] = []
    for i, value in enumerate(values):
        if value is None:
            out.append(None)
            continue
        if not isinstance(value, numbers.Real) and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
            value = value.item()  # a 0-d tensor or numpy scalar
        if not isinstance(value, numbers.Real):
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise RewardError(name, fn, f"returned {type(value).__name__} {shown} for completion {i}; expected a "
                                        "number or None")
        number = float(value)
        if not math.isfinite(number):
            raise RewardError(name, fn, f"returned {number} for completion {i}; rewards must be finite (None "
                                        "counts as 0)")
        out.append(number)
    return out
