"""Multi-host start-up: `jax.distributed.initialize` from flags or the cluster environment.

`peer_timeout_s` is the distributed runtime's heartbeat timeout: a process that has not been
heard from for that long counts as lost, and the runtime stops every other process (see
`peer_supervisor`, which turns that stop into one line naming the lost process). JAX's own
preemption sync service is switched off: its SIGTERM handler would swallow the signal that
`preemption.PreemptionWatch` listens for, and the watch agrees on the stop step itself.
"""
from __future__ import annotations

import logging
import os

import jax

# jax.distributed.initialize's own default heartbeat timeout.
DEFAULT_PEER_TIMEOUT_S = 100


def _cluster_detected() -> bool:
  """True on environments jax can auto-configure: multi-host TPU VMs, SLURM, Open MPI."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def is_multiprocess(num_processes: int | None) -> bool:
  """Whether this launch joins other processes (explicit --num_processes > 1, or a detected
  cluster when the flag is not given)."""
  if num_processes is not None:
    return num_processes > 1
  return _cluster_detected()


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None, peer_timeout_s: int = DEFAULT_PEER_TIMEOUT_S) -> None:
  """Joins the multi-process runtime.

  Explicit flags win; without them, a detected cluster (TPU pod, SLURM, MPI) is auto-configured;
  otherwise this is a single-process run and nothing is done.
  """
  jax.config.update("jax_enable_preemption_service", False)  # before initialize reads it
  explicit = [coordinator_address, num_processes, process_id]
  timeouts = {"heartbeat_timeout_seconds": peer_timeout_s}
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError("--coordinator_address, --num_processes and --process_id must be given "
                       f"together (got {coordinator_address!r}, {num_processes!r}, "
                       f"{process_id!r})")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, {num_processes})")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id, **timeouts)
  elif _cluster_detected():
    jax.distributed.initialize(**timeouts)
  else:
    return
  logging.info("process %d of %d; %d local / %d global devices; peers lost after %d s without "
               "a heartbeat", jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), peer_timeout_s)


def key_value_client():
  """The distributed runtime's key-value store client (None in a single-process run)."""
  from jax._src import distributed as jax_distributed  # the store has no public accessor
  return jax_distributed.global_state.client
