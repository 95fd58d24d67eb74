"""What every command-line tool does the same way: refuse stray arguments, name missing
flags, print its result as JSON."""
from __future__ import annotations

import json
from typing import Any, Callable, Sequence

from absl import app


def no_arguments(argv: Sequence[str]) -> None:
  """Raises a UsageError when positional arguments follow the tool's flags."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")


def require_flags(flag_values, *names: str) -> None:
  """Raises a UsageError naming the first of `names` that was not given (or given empty)."""
  for name in names:
    if not flag_values[name].value:
      raise app.UsageError(f"--{name} is required")


def json_main(run_from_flags: Callable[[], dict[str, Any]],
              keys: Sequence[str] = ()) -> Callable[[Sequence[str]], None]:
  """An absl main that runs `run_from_flags()` and prints its result (only `keys` when given)
  as indented JSON."""

  def main(argv: Sequence[str]) -> None:
    no_arguments(argv)
    result = run_from_flags()
    print(json.dumps({k: result[k] for k in keys} if keys else result, indent=2))

  return main
