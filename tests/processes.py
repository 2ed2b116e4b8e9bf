"""XLA settings and environments for tests, and for the processes they start."""

import os
import socket

# XLA:CPU runs the programs of all its devices on one pool of max(cores, devices) threads
# (`PJRT_NPROC` stands in for the cores), and one device can block several of them at
# once in independent collectives: with 8 devices on 8 threads a device can find none
# free while the others wait for it in a collective (seen here in 2 of 7 runs, as XLA's
# "Expected 4 threads to join the rendezvous" abort). 32 threads leave room.
THREADS = {'PJRT_NPROC': '32'}


def xla_flags(devices: int) -> str:
  return f'--xla_force_host_platform_device_count={devices}'


def cpu_env(devices: int) -> dict:
  """This environment with `devices` CPU devices and no inherited coordinator."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices), **THREADS)
  env.pop('JAX_COORDINATOR_ADDRESS', None)
  return env


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]
