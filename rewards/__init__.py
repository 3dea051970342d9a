"""Reward functions for RL post-training: math answer verification and format checks.

All model text is handled as strings here; mathematical equivalence is decided by math-verify
inside killable worker processes (:mod:`rewards.pool`), never by ``eval`` or sympy in this process.
"""

from rewards.extract import clean_answer, completion_text, find_boxes, last_boxed, normalize_answer
from rewards.format import format_ok, format_reward
from rewards.math import VERIFIER_VERSION, MathVerifier, Verdict, default_verifier, math_reward
from rewards.pool import REASONS, VerifierPool
from rewards.registry import REWARD_FUNCTIONS, get_reward_function

__all__ = [
    "REASONS",
    "REWARD_FUNCTIONS",
    "VERIFIER_VERSION",
    "MathVerifier",
    "Verdict",
    "VerifierPool",
    "clean_answer",
    "completion_text",
    "default_verifier",
    "find_boxes",
    "format_ok",
    "format_reward",
    "get_reward_function",
    "last_boxed",
    "math_reward",
    "normalize_answer",
]
