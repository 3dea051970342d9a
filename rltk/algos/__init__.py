"""The pluggable advantage/loss stage (docs/design.md §4): pure tensor code, no I/O, no distributed calls."""
from rltk.algos.pipeline import Algorithm, AlgorithmPipeline, StageCall
from rltk.algos.registry import (
    StageError,
    get_stage,
    register_advantage,
    register_aggregation,
    register_loss,
    register_modifier,
    register_sampler,
    register_shaping,
    register_term,
    registered,
)
from rltk.algos.samplers import ProbeCache, ProbeContext, Sampler
from rltk.algos.types import Advantages, LossOutput, Rollouts, group_stats

__all__ = [
    "Algorithm",
    "AlgorithmPipeline",
    "ProbeCache",
    "ProbeContext",
    "Sampler",
    "Advantages",
    "LossOutput",
    "Rollouts",
    "StageCall",
    "StageError",
    "get_stage",
    "group_stats",
    "register_advantage",
    "register_aggregation",
    "register_loss",
    "register_modifier",
    "register_sampler",
    "register_shaping",
    "register_term",
    "registered",
]
