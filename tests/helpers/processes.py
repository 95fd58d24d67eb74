"""Processes as Linux's /proc shows them: the children of a process, whether one has ended."""
import os


def _state_and_parent(pid: int) -> tuple[str, int]:
  with open(f"/proc/{pid}/stat") as f:
    stat = f.read()
  fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and ')'
  return fields[0], int(fields[1])


def ended(pid: int) -> bool:
  """True when `pid` no longer runs (gone, or a zombie nobody has reaped yet)."""
  try:
    return _state_and_parent(pid)[0] == "Z"
  except OSError:
    return True


def grain_worker_pids(parent: int) -> list[int]:
  """The running multiprocessing 'spawn' children of `parent` (grain's worker processes)."""
  pids = []
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      state, ppid = _state_and_parent(int(name))
      with open(f"/proc/{name}/cmdline", "rb") as f:
        cmdline = f.read()
    except OSError:
      continue
    if ppid == parent and state != "Z" and b"--multiprocessing-fork" in cmdline:
      pids.append(int(name))
  return sorted(pids)
