"""Imports every module that registers built-in stages."""
from rltk.algos import aggregation, estimators, filters, losses, samplers, terms  # noqa: F401
from rltk.algos import ace, negative, resrl  # noqa: F401
from rltk.algos import tsallis, weighted  # noqa: F401
from rltk.algos import pairing, pools, shaping  # noqa: F401
