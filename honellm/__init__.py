"""Hone: take an open LLM and hone it for one task with prompting, tuning and reward-based training."""

__version__ = "0.1.0"
