"""Task names to tasks. A task module exposes `TASKS: dict[str, TaskFactory]`; a factory takes
the path the user gave after the name (`hellaswag:PATH`), or None for data the project or a
package ships, and returns a ready Task. Adding a module to `TASK_MODULES` registers its tasks.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from gemmakit.errors import UsageError
from gemmakit.evaluation.task import Task

TaskFactory = Callable[[Path | None], Task]

TASK_MODULES: tuple[str, ...] = (
    "gemmakit.evaluation.choice_benchmarks",
    "gemmakit.evaluation.generative",
    "gemmakit.evaluation.code",
    "gemmakit.evaluation.ifeval",
    "gemmakit.evaluation.safety",
    "gemmakit.evaluation.toxicity",
)


def all_tasks() -> dict[str, TaskFactory]:
    """Every registered task factory by name."""
    tasks: dict[str, TaskFactory] = {}
    for module in TASK_MODULES:
        for name, factory in importlib.import_module(module).TASKS.items():
            if name in tasks:
                raise RuntimeError(f"task {name!r} registered twice (in {module})")
            tasks[name] = factory
    return tasks


def load_task(spec: str) -> Task:
    """`name` or `name:PATH` to a Task, with a clear error for an unknown name."""
    name, _, path = spec.partition(":")
    tasks = all_tasks()
    if name not in tasks:
        known = ", ".join(sorted(tasks)) or "none"
        raise UsageError(f"unknown task {name!r} in --tasks (known: {known})")
    return tasks[name](Path(path) if path else None)
