"""Multi-host start: one process per host joins a single JAX run.

After `initialize_distributed`, `jax.devices()` lists every process's devices,
a mesh built from it spans hosts, and one jitted SPMD program (the data-parallel
step, the stage pipeline) runs on all of them; each process feeds its slice of
every global batch.
"""

from typing import Optional

import jax


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, **kwargs) -> tuple:
  """Joins this process to a multi-process JAX run; call before any other JAX work.

  With explicit arguments they are passed to `jax.distributed.initialize`
  (missing ones are detected from the cluster, as JAX does). With none, JAX
  detects a TPU pod, SLURM, Open MPI or Kubernetes job (or reads
  JAX_COORDINATOR_ADDRESS); where it finds none this is one process and nothing
  happens. `num_processes=1` is a no-op too, as is a second call, and so is a
  call with none once JAX has started (a notebook, a second run in one process:
  a started process can join no other).
  CPU processes exchange data with gloo, JAX's default CPU collectives.

  Args:
    coordinator_address: 'host:port' of process 0's coordinator service.
    num_processes: processes in the run.
    process_id: this process's index in [0, num_processes).
    **kwargs: passed on (e.g. local_device_ids, initialization_timeout).

  Returns:
    (process_index, process_count) of this process.
  """
  if jax.distributed.is_initialized() or num_processes == 1:
    return process_info()
  if (coordinator_address, num_processes, process_id) == (None, None, None):
    try:
      jax.distributed.initialize(**kwargs)
    except ValueError as error:
      # JAX's words for "no cluster detected and no coordinator given": one process.
      if 'coordinator_address' not in str(error):
        raise
    except RuntimeError as error:
      # JAX's words for "this process has started its backend": it stays one process.
      if 'must be called before' not in str(error):
        raise
  else:
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
  return process_info()


def process_info() -> tuple:
  """(process_index, process_count): which slice of each global batch this process feeds."""
  return jax.process_index(), jax.process_count()


