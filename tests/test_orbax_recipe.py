"""README's plain-Orbax recipe, run verbatim in a fresh interpreter (no psvae_jax import) on a
checkpoint of configs/svae.py:smoke, gives the arrays the project's own restore gives."""
import os
import re
import subprocess
import sys

import numpy as np

from psvae_jax.config_loader import load_config
from psvae_jax.tree_paths import flatten_dotted

from helpers.runs import STEP, read_run, write_run

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def readme_recipe() -> str:
  text = open(README, encoding="utf-8").read()
  found = re.search(r"<!-- orbax-recipe:start -->\n```python\n(.*?)```\n<!-- orbax-recipe:end -->",
                    text, re.S)
  assert found, "README.md has no orbax-recipe block between its marker comments"
  return found.group(1)


def test_readme_recipe_restores_the_smoke_checkpoint(tmp_path):
  recipe = readme_recipe()
  assert "psvae_jax" not in recipe
  workdir = str(tmp_path / "svae")
  config = load_config("configs/svae.py:smoke")
  write_run(workdir, config)
  script = tmp_path / "restore.py"
  script.write_text(recipe)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # psvae_jax not importable
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run([sys.executable, str(script), workdir], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"steps: [{STEP}]" in result.stdout
  step, restored = read_run(workdir, config)
  expected = flatten_dotted(restored["ema"].to_pure_dict())
  counts = (f"step: {step} trained arrays: {len(flatten_dotted(restored['state']['params']))} "
            f"frozen arrays: {len(flatten_dotted(restored['state']['frozen']))} "
            f"EMA arrays: {len(expected)}")
  assert counts in result.stdout
  with np.load(tmp_path / f"ema_{step}.npz") as saved:
    # The recipe's names end in the variable's 'value'; the pure dict drops that level.
    got = {name.removesuffix(".value"): saved[name] for name in saved.files}
  assert sorted(got) == sorted(expected)
  for name, array in expected.items():
    np.testing.assert_array_equal(got[name], array, err_msg=name)
