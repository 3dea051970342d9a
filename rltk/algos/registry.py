"""Name registries for the pluggable stage (docs/design.md §4).

A stage is selected by name in a recipe (``{name: grpo, scale: group}``) or, for user code, by an
import path (``{name: "mypkg.mymod:fn"}``). Each stage declares what it ``needs`` so the trainer
computes exactly the union of the requested extra forwards, once per step. Recognised needs:

- ``old_logps``: behaviour-policy per-token log-probs from a no-grad forward before the update
- ``ref_logps``: reference-model per-token log-probs
- ``hidden(L)``: hidden states of layer L (python index into ``hidden_states``) for every token
- ``answer_logps``: log-prob of the gold answer appended after each completion
- ``roles``: per-group roles from the sampler (e.g. pairing)
- ``entropy``: current-policy token entropy (with gradient), filled per micro-batch
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

KINDS = ("shaping", "advantage", "modifier", "loss", "aggregation", "term", "sampler")
_STATIC_NEEDS = {"old_logps", "ref_logps", "answer_logps", "roles", "entropy"}

Needs = Iterable[str] | Callable[[dict[str, Any]], Iterable[str]]


class StageError(ValueError):
    """A stage name or parameter in a recipe that cannot be resolved."""


@dataclass(frozen=True)
class Stage:
    """A registered stage: its kind, name, callable, declared needs, and the facts the trainer and
    the recipe checks act on (declared here, so no code outside ``rltk.algos`` tests a stage's name)."""

    kind: str
    name: str
    fn: Callable[..., Any]
    needs_spec: Needs = ()
    normalizer: Callable[..., Any] | None = None  # aggregations only
    group_baseline: bool = False  # advantages: centred on the group, so a group of one gets 0 everywhere
    whole_groups: bool = False  # losses and terms: every micro-batch must hold whole groups
    # losses: fn(rollouts, **params) -> float [N] | None, the per-completion weights of the SFT term on
    # the gold answer (docs/algorithms/reference.md §5); estimators declare theirs as Advantages.answer_sft_weights
    answer_sft_weights: Callable[..., Any] | None = None

    @property
    def provides_roles(self) -> bool:
        """Samplers: whether it tags every group with a role (``Sampler.provides_roles``)."""
        return self.kind == "sampler" and bool(getattr(self.fn, "provides_roles", False))

    def needs(self, params: dict[str, Any]) -> set[str]:
        """The extra inputs this stage requires for the given recipe parameters."""
        spec = self.needs_spec(params) if callable(self.needs_spec) else self.needs_spec
        needs = set(spec)
        for need in needs:
            if need not in _STATIC_NEEDS and not need.startswith("hidden("):
                raise StageError(f"{self.kind} '{self.name}' declares unknown need '{need}'")
        return needs

    def parameters(self) -> dict[str, inspect.Parameter]:
        """Keyword parameters a recipe may set (everything after the positional tensor inputs)."""
        target = self.fn.__init__ if inspect.isclass(self.fn) else self.fn
        params = list(inspect.signature(target).parameters.values())
        return {
            p.name: p
            for p in params
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in _POSITIONAL[self.kind]
        }

    def accepts_any_kwargs(self) -> bool:
        target = self.fn.__init__ if inspect.isclass(self.fn) else self.fn
        return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(target).parameters.values())


# Positional inputs the trainer passes to each kind of stage; recipes cannot set these.
_POSITIONAL = {
    "shaping": {"rollouts"},
    "advantage": {"rollouts"},
    "modifier": {"rollouts", "advantages"},
    "loss": {"logps", "rollouts", "advantages"},
    "aggregation": {"per_token_loss", "mask", "normalizer"},
    "term": {"logps", "rollouts", "advantages"},
    "sampler": {"self", "num_prompts", "seed"},
}

_REGISTRY: dict[str, dict[str, Stage]] = {kind: {} for kind in KINDS}


def _register(kind: str, name: str, needs: Needs = (), **facts: Any):
    def decorator(fn):
        if name in _REGISTRY[kind]:
            raise StageError(f"{kind} '{name}' is already registered")
        _REGISTRY[kind][name] = Stage(kind, name, fn, needs, **facts)
        return fn

    return decorator


def register_shaping(name: str, *, needs: Needs = ()):
    """Register a reward-shaping stage ``fn(rollouts, **params) -> Tensor[N]``: a term added to every
    completion's reward before the estimator runs (docs/algorithms/reference.md §0.5)."""
    return _register("shaping", name, needs)


def register_advantage(name: str, *, needs: Needs = (), group_baseline: bool = False):
    """Register an estimator ``fn(rollouts, **params) -> Advantages``. ``group_baseline``: its
    advantage is relative to the group (``rollout.group_size`` 1 is then refused at load)."""
    return _register("advantage", name, needs, group_baseline=group_baseline)


def register_modifier(name: str, *, needs: Needs = ()):
    """Register a modifier ``fn(rollouts, advantages, **params) -> Advantages``."""
    return _register("modifier", name, needs)


def register_loss(name: str, *, needs: Needs = (), whole_groups: bool = False,
                  answer_sft_weights: Callable[..., Any] | None = None):
    """Register a policy loss ``fn(logps, rollouts, advantages, **params) -> Tensor[N,T] | LossOutput``.

    ``whole_groups``: the loss reads whole groups in every micro-batch (the trainer then needs
    ``micro_batch_size >= group_size``). ``answer_sft_weights(rollouts, **params) -> Tensor[N] | None``:
    the weights of an SFT term on the gold answer this loss adds (``answer_logps`` is then a need)."""
    return _register("loss", name, needs, whole_groups=whole_groups, answer_sft_weights=answer_sft_weights)


def register_term(name: str, *, needs: Needs = ()):
    """Register an extra term ``fn(logps, rollouts, advantages, **params) -> Tensor[N,T] | LossOutput``.

    Terms are added to the per-token policy loss before aggregation (docs/algorithms/reference.md §0.4).
    """
    return _register("term", name, needs)


def register_aggregation(name: str, *, normalizer: Callable[..., Any]):
    """Register ``fn(per_token_loss, mask, normalizer) -> scalar``.

    ``normalizer(mask, max_completion_length) -> float`` is evaluated on the kept-completion mask of
    the *whole* optimizer step on each rank and summed over ranks (docs/algorithms/reference.md §0.3); it must
    therefore be additive over rows.
    """
    return _register("aggregation", name, normalizer=normalizer)


def register_sampler(name: str, *, needs: Needs = ()):
    """Register a prompt sampler class ``cls(num_prompts, seed, **params)``; see ``samplers.py``."""
    return _register("sampler", name, needs)


def registered(kind: str) -> list[str]:
    """Sorted names registered for ``kind``."""
    _load_builtins()
    return sorted(_REGISTRY[kind])


def get_stage(kind: str, name: str) -> Stage:
    """Resolve a registered name or a ``"package.module:function"`` import path."""
    _load_builtins()
    if kind not in _REGISTRY:
        raise StageError(f"unknown stage kind '{kind}'; kinds are {', '.join(KINDS)}")
    if name in _REGISTRY[kind]:
        return _REGISTRY[kind][name]
    if ":" in name:
        return _import_stage(kind, name)
    names = sorted(_REGISTRY[kind])
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise StageError(
        f"unknown {kind} '{name}'{hint}; registered: {', '.join(names)}; "
        "or give an import path 'package.module:function'"
    )


def _import_stage(kind: str, path: str) -> Stage:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise StageError(f"{kind} '{path}': cannot import module '{module_name}': {exc}") from None
    except Exception as exc:  # a syntax error, or an exception while the module runs: one line, not a traceback
        text = " ".join(str(exc).split())[:300]
        raise StageError(f"{kind} '{path}': importing module '{module_name}' failed with "
                         f"{type(exc).__name__}{': ' + text if text else ''}") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise StageError(f"{kind} '{path}': module '{module_name}' has no callable '{attr}'")
    for stage in _REGISTRY[kind].values():  # a user module may register itself on import
        if stage.fn is fn:
            return stage
    needs = getattr(fn, "needs", ())
    normalizer = getattr(fn, "normalizer", None)
    if kind == "aggregation" and normalizer is None:
        raise StageError(f"aggregation '{path}' needs a 'normalizer' attribute (see register_aggregation)")
    return Stage(kind, path, fn, needs, normalizer)


def check_number(stage: str, name: str, value: object, rule: str, ok: Callable[[float], bool]) -> None:
    """Raise a one-line StageError unless ``value`` is a finite real number for which ``ok(value)``
    holds; ``rule`` states the allowed range in the message, e.g. ``">= 0"``. For stages' own knob checks."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise StageError(f"{stage}: {name} must be a finite number{' ' + rule if rule else ''}, got {value!r}")


def validate_params(stage: Stage, params: dict[str, Any]) -> None:
    """Fail with the parameter, the stage and the valid names when a recipe sets an unknown one, and
    on a NaN or infinite number (it passes every ``value < 0`` range check a stage may make)."""
    for key, value in params.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise StageError(f"{stage.kind} '{stage.name}': {key} must be a finite number, got {item}")
    if stage.accepts_any_kwargs():
        return
    valid = stage.parameters()
    for key in params:
        if key not in valid:
            close = difflib.get_close_matches(key, list(valid), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise StageError(
                f"{stage.kind} '{stage.name}' has no parameter '{key}'{hint}; "
                f"valid: {', '.join(sorted(valid)) or 'none'}"
            )


_LOADED = False


def _load_builtins() -> None:
    """Import the modules that register the built-in stages (once)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from rltk.algos import builtin  # noqa: F401  (registers on import)
