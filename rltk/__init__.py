"""rltk: LLM post-training RL with pluggable advantage/loss stages (see README.md)."""

__version__ = "0.1.0"
