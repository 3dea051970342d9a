"""Reward functions by name, for recipes: ``reward: math`` or ``reward: my_pkg.rewards:length``."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from rewards.format import format_reward
from rewards.math import math_reward

__all__ = ["REWARD_FUNCTIONS", "get_reward_function"]

REWARD_FUNCTIONS: dict[str, Callable[..., list]] = {"math": math_reward, "format": format_reward}
"""Built-in rewards, with TRL's signature ``fn(completions, **columns) -> list[float | None]``."""


def get_reward_function(name: str) -> Callable[..., list]:
    """A registered reward by name, or any callable by import path ``"pkg.module:function"``.

    Raises:
        ValueError: one line naming the registered rewards, when ``name`` is neither.
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
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot load reward function {name!r}: {err}") from None
    if not callable(function):
        raise ValueError(f"reward function {name!r} is not callable")
    return function
