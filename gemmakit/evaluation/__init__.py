"""Evaluation: tasks over a model (memorization for now)."""
