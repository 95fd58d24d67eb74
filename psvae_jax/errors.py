"""The base of every error a user can fix (a config key, a path, a data folder, a mesh...).

Entry points print such an error as one line, `error: <message>`, and exit with status 2;
any other exception is a bug and keeps its traceback.
"""
import sys

EXIT_USER_ERROR = 2


class UserError(Exception):
  """An error the user can fix; the message names the value, file or setting and the problem."""


def message(error: BaseException) -> str:
  """The one-line text of an error (KeyError's str() would add quotes around it)."""
  text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  return " ".join(str(text).split()) or type(error).__name__


def exit_with(error: BaseException) -> None:
  """Prints `error: <message>` on stderr and exits with status 2."""
  print(f"error: {message(error)}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)
