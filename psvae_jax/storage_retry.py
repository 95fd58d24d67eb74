"""Which storage errors are transient, and reads that retry them with bounded exponential backoff.

The package's one classifier of storage errors (data sources, latent caches, checkpoints):
- transient (`is_transient`): the storage may answer when asked again: TimeoutError,
  ConnectionError, OSError with errno EIO, EAGAIN, ETIMEDOUT, ECONNRESET, EBUSY (and the other
  network / stale-handle errnos below), TensorStore and gRPC statuses UNAVAILABLE,
  DEADLINE_EXCEEDED, ABORTED, RESOURCE_EXHAUSTED (a rate limit), or a TensorStore message
  carrying a transient `os_error_code`;
- access failures (`is_access_failure`): transient ones plus access denied (PermissionError,
  PERMISSION_DENIED, UNAUTHENTICATED), MemoryError and CANCELLED: the read failed for reasons
  that say nothing about the data, so a checkpoint failing with one is not damaged;
- storage errors (`is_storage_error`): any OSError or TensorStore/gRPC status of the storage
  layer; what a failed write raises (ENOSPC arrives as RESOURCE_EXHAUSTED with os_error_code 28).
Everything else is permanent and never retried: a missing file, a file that is not an image, a
checkpoint of another shape.

`RetryPolicy.call(fn, ..., what=, path=)` runs one read, retrying transient failures: retry i
waits min(initial_backoff_s * 2**(i-1), max_backoff_s) seconds and is logged as a WARNING naming
the path and the error; when the retries are spent it raises StorageReadError naming the path,
the attempts and the last error. A policy is a plain picklable value, so the data sources carry
it into grain's worker processes (config.io sets it; see `RetryPolicy.from_config`).
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import re
import time
from typing import Any, Callable

from psvae_jax.errors import UserError

TRANSIENT_ERRNOS = frozenset({
    errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
    errno.ECONNREFUSED, errno.EBUSY, errno.EINTR, errno.ENETDOWN, errno.ENETUNREACH,
    errno.EHOSTUNREACH, errno.ESTALE,
})
_TRANSIENT_STATUS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "RESOURCE_EXHAUSTED")
_ACCESS_STATUS = ("PERMISSION_DENIED", "UNAUTHENTICATED", "CANCELLED")
_STORAGE_STATUS = (*_TRANSIENT_STATUS, *_ACCESS_STATUS, "DATA_LOSS", "NOT_FOUND",
                   "FAILED_PRECONDITION", "OUT_OF_RANGE", "ALREADY_EXISTS")
_STATUS = re.compile(r"\b(" + "|".join(_STORAGE_STATUS) + r")\b")
# TensorStore appends the OS error to a status message: "... [os_error_code='28']".
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


class StorageReadError(UserError, OSError):
  """A read still failing after its retries; the message names the path, the attempts and the
  last error. Never retried again by an outer read."""


def error_chain(error: BaseException) -> list[BaseException]:
  """`error`, then its causes (`raise ... from`) and contexts, outermost first."""
  chain = []
  while error is not None and all(error is not seen for seen in chain):
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain


def root_cause(error: BaseException) -> BaseException:
  return error_chain(error)[-1]


def first_line(error: BaseException, limit: int = 400) -> str:
  """The first line of an error's message, its middle cut out beyond `limit` characters (a
  TensorStore message starts with the status and ends with the OS error)."""
  text = str(error).strip().splitlines()
  line = text[0] if text else ""
  half = limit // 2
  return line if len(line) <= limit else f"{line[:half]} ... {line[-half:]}"


def describe(error: BaseException) -> str:
  """'Type: first line' of the innermost cause (TensorStore's own status, an OSError)."""
  root = root_cause(error)
  return f"{type(root).__name__}: {first_line(root)}"


def _errno_of(error: BaseException) -> int | None:
  if isinstance(error, OSError) and error.errno is not None:
    return error.errno
  found = _OS_ERROR_CODE.search(str(error))
  return int(found.group(1)) if found else None


def _statuses(error: BaseException) -> set[str]:
  return set(_STATUS.findall(str(error)))


def _link_is_transient(error: BaseException) -> bool:
  code = _errno_of(error)
  if code is not None:  # the OS error decides over the status TensorStore mapped it to
    return code in TRANSIENT_ERRNOS
  return (isinstance(error, (TimeoutError, ConnectionError))
          or bool(_statuses(error) & set(_TRANSIENT_STATUS)))


def _already_retried(error: BaseException) -> bool:
  return any(isinstance(e, StorageReadError) for e in error_chain(error))


def is_transient(error: BaseException) -> bool:
  """Whether repeating the read that raised `error` may succeed (see the module docstring)."""
  return not _already_retried(error) and any(_link_is_transient(e) for e in error_chain(error))


def is_access_failure(error: BaseException) -> bool:
  """Whether the storage could not be read for a reason that says nothing about the data:
  transient (retried or not), access denied, out of memory, cancelled."""
  return any(_link_is_transient(e) or isinstance(e, (PermissionError, MemoryError,
                                                     StorageReadError))
             or bool(_statuses(e) & set(_ACCESS_STATUS)) for e in error_chain(error))


def is_storage_error(error: BaseException) -> bool:
  """Whether `error` comes from the storage layer (an OSError or a TensorStore status), as a
  failed write does; a programming error (TypeError, a plain ValueError) is not one."""
  return any(isinstance(e, OSError) or _errno_of(e) is not None or bool(_statuses(e))
             for e in error_chain(error))


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
  """How often and how patiently a transient read failure is retried (config.io).

  retries: attempts after the first (0 = none); the backoff before retry i is
  min(initial_backoff_s * 2**(i-1), max_backoff_s). `sleep` waits (injectable for tests; it must
  pickle, e.g. a module-level function).
  """
  retries: int = 4
  initial_backoff_s: float = 0.5
  max_backoff_s: float = 20.0
  sleep: Callable[[float], Any] = time.sleep

  @classmethod
  def from_config(cls, io_config) -> RetryPolicy:
    """The policy of a `config.io` section (None or a missing key: the default)."""
    if io_config is None:
      return cls()
    get = io_config.get
    return cls(retries=int(get("retries", cls.retries)),
               initial_backoff_s=float(get("initial_backoff_s", cls.initial_backoff_s)),
               max_backoff_s=float(get("max_backoff_s", cls.max_backoff_s)))

  def backoff_s(self, retry: int) -> float:
    """Seconds to wait before retry number `retry` (1-based)."""
    return min(self.initial_backoff_s * 2.0 ** (retry - 1), self.max_backoff_s)

  def call(self, fn: Callable[..., Any], *args, what: str, path: str, **kwargs) -> Any:
    """`fn(*args, **kwargs)`, retried on transient errors; `what` and `path` name the read in
    the log lines and the error ('reading an image', '/data/x.jpg').

    Raises StorageReadError (from the last error) once `retries` retries failed, and any
    permanent error at once, unchanged.
    """
    attempts = self.retries + 1
    attempt, waited = 1, 0.0
    while True:
      try:
        return fn(*args, **kwargs)
      except Exception as e:  # pylint: disable=broad-except  (permanent errors re-raised as is)
        if not is_transient(e):
          raise
        if attempt == attempts:
          retried = (f"after {attempts} attempts ({self.retries} retries over {waited:.1f} s)"
                     if self.retries else "(config.io.retries=0: not retried)")
          raise StorageReadError(f"{what} {path} failed {retried}; last error: "
                                 f"{describe(e)}") from e
        delay = self.backoff_s(attempt)
        logging.warning("%s %s failed (attempt %d of %d, transient): %s; retrying in %.2f s",
                        what, path, attempt, attempts, describe(e), delay)
        self.sleep(delay)
        waited += delay
        attempt += 1
