"""Evaluation: tasks, the model runner, the report's benchmarks, safety, memorization and
the lm-evaluation-harness adapter."""
