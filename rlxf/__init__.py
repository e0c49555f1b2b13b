"""rlxf: align language models with rich feedback (preferences, rankings, AI labels, dense rewards)."""

__version__ = "0.1.0"
