"""The storage error classifier and the retry policy (bounded exponential backoff, each retry
logged, one error naming the path, the attempts and the last error when they give up)."""
import errno
import logging
import os
import pickle

import pytest

from psvae_jax import config_base, storage_retry
from psvae_jax.storage_retry import RetryPolicy, StorageReadError


def _os(code):
  return OSError(code, os.strerror(code), "/data/x")


def _chained(outer, inner):
  try:
    raise outer from inner
  except type(outer) as e:
    return e


# error -> (transient, access failure, storage error)
CASES = {
    "EIO": (_os(errno.EIO), (True, True, True)),
    "EAGAIN": (_os(errno.EAGAIN), (True, True, True)),
    "ETIMEDOUT": (_os(errno.ETIMEDOUT), (True, True, True)),
    "ECONNRESET": (_os(errno.ECONNRESET), (True, True, True)),
    "EBUSY": (_os(errno.EBUSY), (True, True, True)),
    "TimeoutError": (TimeoutError("read timed out"), (True, True, True)),
    "ConnectionResetError": (ConnectionResetError(), (True, True, True)),
    "TensorStore UNAVAILABLE": (ValueError("UNAVAILABLE: Error reading gs://b/x"),
                                (True, True, True)),
    "TensorStore DEADLINE_EXCEEDED": (ValueError("DEADLINE_EXCEEDED: read"), (True, True, True)),
    "TensorStore EIO (os_error_code)": (
        ValueError("FAILED_PRECONDITION: Error reading local file: [os_error_code='5']"),
        (True, True, True)),
    "wrapped UNAVAILABLE": (_chained(Exception("reading array"),
                                     ValueError("UNAVAILABLE: reset")), (True, True, True)),
    "FileNotFoundError": (FileNotFoundError(errno.ENOENT, "No such file", "/x"),
                          (False, False, True)),
    "PermissionError": (PermissionError(errno.EACCES, "Permission denied", "/x"),
                        (False, True, True)),
    "TensorStore PERMISSION_DENIED": (ValueError("PERMISSION_DENIED: gs://b"),
                                      (False, True, True)),
    "disk full (TensorStore)": (
        ValueError("RESOURCE_EXHAUSTED: Failed writing: No space left on device "
                   "[os_error_code='28']"), (False, False, True)),
    "not an image": (ValueError("not a recognised image format"), (False, False, False)),
    "bug": (TypeError("unsupported operand"), (False, False, False)),
    "already retried": (StorageReadError("reading /x failed after 5 attempts"),
                        (False, True, True)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_classifier(name):
  error, (transient, access, storage) = CASES[name]
  assert storage_retry.is_transient(error) is transient
  assert storage_retry.is_access_failure(error) is access
  assert storage_retry.is_storage_error(error) is storage


class _Flaky:
  """Fails `times` times with `error`, then returns 'data'."""

  def __init__(self, times, error):
    self.times, self.error, self.calls = times, error, 0

  def __call__(self):
    self.calls += 1
    if self.calls <= self.times:
      raise self.error
    return "data"


@pytest.mark.reliability(fault="transient read error {k} times, retries=4 (policy alone)",
                         expected="succeeds; k warnings naming the path; backoff 0.5, 1, 2...")
@pytest.mark.parametrize("k", [1, 3])
def test_transient_failures_are_retried_with_exponential_backoff(caplog, k):
  waits = []
  policy = RetryPolicy(retries=4, initial_backoff_s=0.5, max_backoff_s=1.5, sleep=waits.append)
  read = _Flaky(k, _os(errno.EIO))
  with caplog.at_level(logging.WARNING):
    assert policy.call(read, what="reading image", path="/data/x.png") == "data"
  assert read.calls == k + 1
  assert waits == [0.5, 1.0, 1.5][:k]  # doubled, capped at max_backoff_s
  lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(lines) == k
  assert all("reading image /data/x.png failed" in line and "Input/output error" in line
             for line in lines)


@pytest.mark.reliability(fault="transient read error on every attempt (policy alone)",
                         expected="StorageReadError naming the path, the attempts and the error")
def test_giving_up_names_the_path_attempts_and_last_error():
  policy = RetryPolicy(retries=2, initial_backoff_s=0.25, sleep=lambda s: None)
  read = _Flaky(10, TimeoutError("read timed out"))
  with pytest.raises(StorageReadError, match=r"reading image /data/x\.png failed after 3 "
                     r"attempts \(2 retries over 0\.8 s\); last error: TimeoutError: read timed "
                     r"out") as e:
    policy.call(read, what="reading image", path="/data/x.png")
  assert read.calls == 3
  assert isinstance(e.value, OSError) and not storage_retry.is_transient(e.value)


def test_permanent_errors_are_not_retried():
  policy = RetryPolicy(sleep=lambda s: pytest.fail("slept for a permanent error"))
  read = _Flaky(1, FileNotFoundError(errno.ENOENT, "No such file", "/x"))
  with pytest.raises(FileNotFoundError):
    policy.call(read, what="reading image", path="/x")
  assert read.calls == 1


def test_zero_retries_still_names_the_path():
  policy = RetryPolicy(retries=0, sleep=lambda s: pytest.fail("slept with retries=0"))
  with pytest.raises(StorageReadError, match="reading shard /s failed .*retries=0"):
    policy.call(_Flaky(1, _os(errno.EIO)), what="reading shard", path="/s")


def test_policy_from_config_and_pickle():
  config = config_base.base_config("svae")
  assert RetryPolicy.from_config(config.io) == RetryPolicy()
  config.io.retries, config.io.initial_backoff_s, config.io.max_backoff_s = 2, 0.0, 0.0
  policy = RetryPolicy.from_config(config.io)
  assert (policy.retries, policy.initial_backoff_s, policy.max_backoff_s) == (2, 0.0, 0.0)
  assert pickle.loads(pickle.dumps(policy)) == policy  # travels into grain worker processes


@pytest.mark.parametrize("key,value,msg", [
    ("io.retries", -1, "config.io.retries=-1"),
    ("io.initial_backoff_s", -0.5, "config.io.initial_backoff_s=-0.5"),
    ("io.max_backoff_s", 0.1, "config.io.max_backoff_s=0.1 must be >= "),
    ("checkpoint.on_save_error", "ignore", "config.checkpoint.on_save_error='ignore'"),
])
def test_config_validation(key, value, msg):
  config = config_base.base_config("svae")
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(config_base.ConfigError, match=msg):
    config_base.validate(config)
