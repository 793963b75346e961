"""Multi-process start-up: every process runs the same command; JAX connects them.

`initialize_from_env()` is called by the `codi-jax` entry point before any JAX work:
  CODI_COORDINATOR=host:port CODI_NUM_PROCESSES=N CODI_PROCESS_ID=i   explicit (local, clusters)
  CODI_DISTRIBUTED=auto                                              auto-detect (TPU pods, SLURM)
and nothing when neither is set (one process).
"""

from __future__ import annotations

import os

import jax


def initialize_from_env() -> bool:
  """Connects to the other processes if the environment asks for it; returns whether it did."""
  coordinator = os.environ.get("CODI_COORDINATOR")
  if coordinator:
    try:
      num = int(os.environ["CODI_NUM_PROCESSES"])
      pid = int(os.environ["CODI_PROCESS_ID"])
    except (KeyError, ValueError) as e:
      raise ValueError("CODI_COORDINATOR needs integer CODI_NUM_PROCESSES and CODI_PROCESS_ID") \
          from e
    jax.distributed.initialize(coordinator, num_processes=num, process_id=pid)
    return True
  if os.environ.get("CODI_DISTRIBUTED") == "auto":
    jax.distributed.initialize()
    return True
  return False
