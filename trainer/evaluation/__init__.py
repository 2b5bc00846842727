"""Evaluation: pure scoring of feature banks (scoring.py), the variant suite run after each stage
and by launch/eval.py (suite.py), and the run's outputs (metrics.json, plots, summary table).
May import components and below."""
