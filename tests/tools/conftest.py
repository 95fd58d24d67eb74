"""Fixtures the tool tests share: a fake finished T2I run, a tiny trained S-VAE run, and a
parser of a tool's own flags."""
import jax
import pytest
from absl import flags

from psvae_jax import train as train_lib

from helpers.runs import write_t2i_run


@pytest.fixture(scope="module")
def t2i_run(tmp_path_factory):
  """A fake finished T2I run's workdir (helpers/runs.py), written once per test module."""
  workdir = str(tmp_path_factory.mktemp("t2i_run"))
  write_t2i_run(workdir)
  return workdir


@pytest.fixture
def tiny_run(tmp_path_factory, svae_config):
  """A 2-step tiny S-VAE run (EMA kept), trained once per session on one device."""
  workdir = tmp_path_factory.getbasetemp() / "tools_tiny_svae"
  if not (workdir / "checkpoints" / "2").is_dir():
    train_lib.train(svae_config(**{"total_steps": 2}), str(workdir), devices=jax.devices()[:1])
  return str(workdir)


@pytest.fixture
def parse_flags():
  """parse(tool_module, argv) -> the tool's own FlagValues, parsed from `argv`."""

  def parse(tool, argv):
    values = flags.FlagValues()
    tool.define_flags(values)
    values([tool.__name__.rsplit(".", 1)[-1], *argv])
    return values

  return parse
