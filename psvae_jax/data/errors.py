"""Data errors, the marker for a skipped record, and the bad-record bound."""
import dataclasses

from psvae_jax.errors import UserError

# The bad-record bound is only checked once this many records have been read, so a few bad files
# at the very start of a run do not stop it.
MIN_RECORDS_FOR_BAD_CHECK = 100


class DataError(UserError, RuntimeError):
  """A data source or pipeline problem the user has to fix (bad spec, too many bad records...)."""


class BadImage(ValueError):
  """An image that cannot be used; the message says why (truncated, not an image, too big...)."""


@dataclasses.dataclass(frozen=True)
class BadRecord:
  """Stands in the pipeline for a record that was skipped; `record_id` names it, `reason` says why."""
  record_id: str
  reason: str

  def describe(self) -> str:
    return f"{self.record_id}: {self.reason}"


def check_bad_fraction(seen: int, bad: int, max_bad_fraction: float, examples) -> None:
  """Raises DataError when more than `max_bad_fraction` of the `seen` records were bad."""
  if seen < MIN_RECORDS_FOR_BAD_CHECK or bad <= max_bad_fraction * seen:
    return
  shown = "; ".join(list(examples)[:5]) or "(no examples kept)"
  raise DataError(
      f"{bad} of {seen} records ({bad / seen:.1%}) could not be used, above "
      f"data.max_bad_fraction={max_bad_fraction}. Examples: {shown}")
