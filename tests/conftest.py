"""Test environment: 8 simulated CPU devices, no model hub, deterministic CPU jax.

These variables must be set before jax is imported anywhere, hence at conftest import time.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# Tests are compile-bound on CPU: skip LLVM's expensive optimisations (2-4x faster compiles).
os.environ["XLA_FLAGS"] += (" --xla_backend_optimization_level=0"
                            " --xla_llvm_disable_expensive_passes=true")
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# One persistent compilation cache per test session: runs that rebuild the same step (resume
# tests, repeated tiny configs) compile it once.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="psvae_jax_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: heavier tests, run with `-m slow`")


@pytest.fixture
def svae_config():
  from helpers.configs import tiny_svae_config
  return tiny_svae_config
