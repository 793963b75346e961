"""XLA flags for simulated CPU devices, shared by the test process and the commands it starts.

On a loaded 2-core CI machine, eight simulated devices can reach a collective tens of seconds
apart; XLA's default rendezvous timeout then aborts the whole process. Tests wait instead.
"""

PATIENT_COLLECTIVES = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=600 "
                       "--xla_cpu_collective_call_terminate_timeout_seconds=900 "
                       "--xla_cpu_collective_timeout_seconds=900")


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for `devices` simulated CPU devices that wait for slow peers."""
  return f"--xla_force_host_platform_device_count={devices} {PATIENT_COLLECTIVES}"
