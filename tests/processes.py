"""XLA settings and environments for tests, and for the processes they start."""

import contextlib
import os
import socket
import subprocess
import sys

# XLA:CPU runs the programs of all its devices on one pool of max(cores, devices) threads
# (`PJRT_NPROC` stands in for the cores), and one device can block several of them at
# once in independent collectives: with 8 devices on 8 threads a device can find none
# free while the others wait for it in a collective (seen in 2 of 7 one-process,
# 8-device DPO runs). More threads leave room, but on 2 cores they also slow every
# program down, past XLA's 40 s wait for a collective's late arrivals: so only the runs
# that need them get them (`MANY_DEVICE_THREADS`), with a longer wait.
MANY_DEVICE_THREADS = {'PJRT_NPROC': '32'}
LONG_COLLECTIVE_WAIT = '--xla_cpu_collective_call_terminate_timeout_seconds=600'


def xla_flags(devices: int) -> str:
  return f'--xla_force_host_platform_device_count={devices}'


def cpu_env(devices: int, many_threads: bool = False) -> dict:
  """This environment with `devices` CPU devices and no inherited coordinator;
  `many_threads`: MANY_DEVICE_THREADS and LONG_COLLECTIVE_WAIT."""
  flags = f'{xla_flags(devices)} {LONG_COLLECTIVE_WAIT}' if many_threads else xla_flags(devices)
  env = dict(os.environ, XLA_FLAGS=flags, **(MANY_DEVICE_THREADS if many_threads else {}))
  env.pop('JAX_COORDINATOR_ADDRESS', None)
  return env


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def held_by_another_process(lock):
  """A live process (not this one's ancestor) holding `lock`: a first writer."""
  holder = subprocess.Popen([sys.executable, '-c', 'import sys, time\n'
                             'from saber_jax import files\n'
                             'files.acquire_lock(sys.argv[1]); print(1, flush=True)\n'
                             'time.sleep(60)', lock], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == '1\n'
    yield holder.pid
  finally:
    holder.kill()
    holder.wait()
