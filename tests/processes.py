"""XLA flags and environments for tests, and for the processes they start."""

import os
import socket

# XLA:CPU ends a program whose devices wait over 40 s for each other in a collective; on
# a loaded 2-core machine eight device threads can fall that far behind, so wait longer.
_COLLECTIVE_TIMEOUT = '--xla_cpu_collective_call_terminate_timeout_seconds=600'


def xla_flags(devices: int) -> str:
  return f'--xla_force_host_platform_device_count={devices} {_COLLECTIVE_TIMEOUT}'


def cpu_env(devices: int) -> dict:
  """This environment with `devices` CPU devices and no inherited coordinator."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices))
  env.pop('JAX_COORDINATOR_ADDRESS', None)
  return env


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]
