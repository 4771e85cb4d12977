"""The task registry: every task declares itself once, in its own module, and registers here.

A task module (``tasks/seqcls.py``, ``tasks/ptb.py``, ``tasks/speech.py``) defines its model class,
its ``make_task(preset, *, seed, ...)``, its ``example_inputs`` for export and its preset table, and
ends with ``TASK = register_task(TaskType(...))``. Everything that needs a task by name (the CLI's
``--task``, ``build_architecture``/``load_model``, ``example_inputs``/``export_task_model``) asks
:func:`get_task`, which imports the built-in task modules on first use (so ``mpolstm --help`` does not
load the speech stack).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from torch import Tensor, nn

if TYPE_CHECKING:
    from .base import Task

__all__ = ["PRESETS", "BUILTIN_TASKS", "TaskType", "register_task", "get_task", "task_names"]

PRESETS = ("quick", "standard", "paper")
"""The preset vocabulary every task uses: quick (minutes per task on 2 CPU cores), standard
(<= 90 minutes for a task's protocol table on 2 CPU cores; PTB and speech need two --rows commands for
all 15 rows), paper (paper scale, for a GPU)."""

BUILTIN_TASKS = ("seqcls", "ptb", "speech")
"""Modules of this package that register the task of the same name when imported."""

ExampleInputs = Callable[[Mapping[str, Any], int, int], tuple[Tensor, ...]]


@dataclass(frozen=True)
class TaskType:
    """One task, as its module declares it.

    name: the task's name (``--task``, the ``name`` of its architecture spec ``{"name", "kwargs"}``).
    model_class: the model; ``model_class(**spec["kwargs"])`` rebuilds it without data.
    make_task: ``make_task(preset, *, seed=0, **options) -> Task``; its other keyword-only
        parameters are the task's :attr:`options` (e.g. seqcls's ``dataset``, ``data_dir``).
    presets: preset name (from :data:`PRESETS`) -> the preset's size and budget; ``make_task``
        looks its preset up with :meth:`size`, the one place presets are checked.
    example_inputs: ``(spec kwargs, batch, steps) -> inputs`` for tracing (TorchScript, ONNX).
    """

    name: str
    model_class: type[nn.Module]
    make_task: Callable[..., Task]
    presets: Mapping[str, Any]
    example_inputs: ExampleInputs

    def __post_init__(self) -> None:
        unknown = [p for p in self.presets if p not in PRESETS]
        if not self.presets or unknown:
            raise ValueError(f"task {self.name!r}: presets must be a non-empty subset of {list(PRESETS)}, "
                             f"got {list(self.presets)}")

    @property
    def options(self) -> tuple[str, ...]:
        """The keyword-only options of ``make_task`` besides ``seed``."""
        params = inspect.signature(self.make_task).parameters.values()
        return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "seed")

    def size(self, preset: str) -> Any:
        """The size and budget of ``preset``; ValueError naming the task's presets if it has none such."""
        if preset not in self.presets:
            raise ValueError(f"unknown preset {preset!r} for task {self.name!r}; "
                             f"expected one of {sorted(self.presets)}")
        return self.presets[preset]

    def build_model(self, kwargs: Mapping[str, Any]) -> nn.Module:
        """A freshly initialised model from the ``kwargs`` of an architecture spec."""
        try:
            return self.model_class(**kwargs)
        except TypeError as exc:
            raise ValueError(f"architecture {self.name!r}: bad kwargs {dict(kwargs)}: {exc}") from None


_REGISTRY: dict[str, TaskType] = {}


def register_task(task: TaskType) -> TaskType:
    """Register ``task`` under its name and return it (a module registering itself again on reload
    replaces its entry; another module taking a registered name is an error)."""
    existing = _REGISTRY.get(task.name)
    if existing is not None and existing.make_task.__module__ != task.make_task.__module__:
        raise ValueError(f"task {task.name!r} is already registered by {existing.make_task.__module__}")
    _REGISTRY[task.name] = task
    return task


def task_names() -> list[str]:
    """Every known task name: the built-in ones, then any registered since (no module is imported)."""
    return list(dict.fromkeys([*BUILTIN_TASKS, *_REGISTRY]))


def get_task(name: str) -> TaskType:
    """The registered task ``name`` (importing a built-in task's module on first use); ValueError
    listing the known names for any other."""
    task = _REGISTRY.get(name) if isinstance(name, str) else None
    if task is None and name in BUILTIN_TASKS:
        importlib.import_module(f"{__package__}.{name}")
        task = _REGISTRY.get(name)
    if task is None:
        raise ValueError(f"unknown task {name!r}; expected one of {task_names()}")
    return task
