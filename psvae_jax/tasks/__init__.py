"""Training stages. `get_task(config)` builds the task named by `config.task`."""
from __future__ import annotations

import importlib

# task name -> (module, class); imported lazily so a stage only pulls in what it needs.
TASKS = {
    "svae": ("psvae_jax.tasks.svae", "SVAETask"),
    "psvae": ("psvae_jax.tasks.psvae", "PSVAETask"),
    "t2i": ("psvae_jax.tasks.t2i", "T2ITask"),
    "edit": ("psvae_jax.tasks.edit", "EditTask"),
}


def task_class(name: str) -> type:
  """The task class registered as `name`; unknown names are an error listing known ones."""
  if name not in TASKS:
    raise ValueError(f"config.task={name!r} is not a known task; known: {sorted(TASKS)}")
  module_name, class_name = TASKS[name]
  return getattr(importlib.import_module(module_name), class_name)


def get_task(config):
  """Instantiates the task for `config.task`."""
  return task_class(config.task)(config)
