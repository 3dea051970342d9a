"""Reward functions by name, for recipes: ``reward: math`` or ``reward: my_pkg.rewards:length``."""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from collections.abc import Callable

from rewards.format import format_reward
from rewards.math import math_reward
from rltk.describe import describe_exception, function_name

__all__ = ["REWARD_COLUMNS", "REWARD_FUNCTIONS", "RewardError", "check_reward_values", "get_reward_function"]

REWARD_FUNCTIONS: dict[str, Callable[..., list]] = {"math": math_reward, "format": format_reward}
"""Built-in rewards, with TRL's signature ``fn(completions, **columns) -> list[float | None]``."""

REWARD_COLUMNS = ("answer", "question")
"""The dataset columns the RL trainer passes to every reward function as keyword arguments."""


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
            an exception while it is imported); or when the function is not callable or cannot be
            called as ``fn(completions, answer=..., question=...)``.
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
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin or extension callable: nothing to check
        return function
    try:
        signature.bind(["completion"], **{column: ["value"] for column in REWARD_COLUMNS})
    except TypeError as err:
        raise ValueError(f"reward function {name!r} cannot be called as fn(completions, "
                         f"{', '.join(f'{c}=...' for c in REWARD_COLUMNS)}): {err}; give it **kwargs") from None
    return function


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
