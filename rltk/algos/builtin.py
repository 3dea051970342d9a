"""Imports every module that registers built-in stages."""
from rltk.algos import aggregation, estimators, filters, losses, samplers, terms  # noqa: F401
