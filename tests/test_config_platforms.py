"""Attention implementations a platform cannot run are rejected when the config is validated,
in one line naming the key, the value and the platform."""
import pytest

from psvae_jax import config_base, train
from psvae_jax.config_loader import load_config


@pytest.mark.parametrize("impl,platform,fine", [
    ("splash", "tpu", True), ("splash", "cpu", False), ("splash", "gpu", False),
    ("cudnn", "gpu", True), ("cudnn", "tpu", False), ("cudnn", "cpu", True),
    ("xla", "tpu", True), ("xla", "cpu", True), ("splash", None, True),
])
def test_attention_impl_against_platform(impl, platform, fine):
  config = load_config("configs/t2i.py:smoke", {"attention_impl": impl})
  if fine:
    config_base.validate(config, platform=platform)
    return
  with pytest.raises(config_base.ConfigError,
                     match=rf"config.attention_impl='{impl}' cannot run on platform "
                           rf"'{platform}'") as err:
    config_base.validate(config, platform=platform)
  assert "\n" not in str(err.value)


def test_training_on_this_host_checks_its_platform(tmp_path):
  config = load_config("configs/t2i.py:smoke", {"attention_impl": "splash"})
  with pytest.raises(config_base.ConfigError, match="platform 'cpu'"):
    train.train(config, str(tmp_path))
