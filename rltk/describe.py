"""One-line descriptions of user code and of its failures, for error messages that name the stage
or reward function at fault (rltk/algos/pipeline.py, rewards/registry.py). Imports nothing of rltk."""
from __future__ import annotations

from typing import Any


def function_name(fn: Any) -> str:
    """``module.qualname`` of a function, class or callable object."""
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", repr(target))
    return f"{module}.{name}" if module else name


def describe_exception(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line (whitespace collapsed, at most ``limit`` characters)."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
