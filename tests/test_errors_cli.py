"""Errors a user can fix reach the console of `python -m psvae_jax.main` as one line
`error: <message>` with exit status 2 and no traceback; each case fails before any compile."""
import os
import subprocess
import sys

import pytest

from psvae_jax.config_loader import REPO_ROOT

SVAE_SMOKE = os.path.join(REPO_ROOT, "configs", "svae.py") + ":smoke"
PSVAE_SMOKE = os.path.join(REPO_ROOT, "configs", "psvae.py") + ":smoke"


def _main(tmp_path, *args):
  result = subprocess.run(
      [sys.executable, "-m", "psvae_jax.main", f"--workdir={tmp_path / 'run'}", *args],
      capture_output=True, text=True, timeout=600, cwd=tmp_path)
  return result.returncode, result.stderr.strip().splitlines()


def _assert_one_line_error(rc, lines, *fragments):
  assert rc == 2, lines
  assert lines and lines[-1].startswith("error: "), lines
  assert not any("Traceback" in line for line in lines), lines
  for fragment in fragments:
    assert fragment in lines[-1], lines[-1]


def test_a_typo_in_a_config_key_names_the_key(tmp_path):
  rc, lines = _main(tmp_path, f"--config={SVAE_SMOKE}", "--config.totl_steps=5")
  _assert_one_line_error(rc, lines, "unknown config key 'totl_steps'", "--config.totl_steps=5",
                         "total_steps")


def test_traceback_flag_shows_the_traceback(tmp_path):
  rc, lines = _main(tmp_path, f"--config={SVAE_SMOKE}", "--config.totl_steps=5", "--traceback")
  assert rc != 0 and any("Traceback" in line for line in lines)


@pytest.mark.parametrize("args, fragments", [
    ((f"--config={PSVAE_SMOKE}", "--config.init=/no/such/svae_run"),
     ("config.init='/no/such/svae_run'", "no such directory")),
    ((f"--config={SVAE_SMOKE}", "--config.model.lpips_weights=/no/such/lpips"),
     ("config.model.lpips_weights='/no/such/lpips'", "no such directory")),
    ((f"--config={SVAE_SMOKE}", "--config.mesh.data=3"), ("mesh",)),
], ids=["missing_parent_run", "missing_weights_directory", "impossible_mesh"])
def test_user_errors_are_one_line(tmp_path, args, fragments):
  _assert_one_line_error(*_main(tmp_path, *args), *fragments)


def test_a_folder_without_images_is_one_line(tmp_path):
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "readme.txt").write_text("not an image")
  rc, lines = _main(tmp_path, f"--config={SVAE_SMOKE}",
                    f"--config.data.source=folder:{tmp_path / 'notes'}")
  _assert_one_line_error(rc, lines, "holds no images")
