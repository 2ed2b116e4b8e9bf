import os

import processes

# Eight CPU devices for the sharding tests, and threads enough for their collectives;
# must be set before jax is imported.
os.environ.setdefault('XLA_FLAGS', processes.xla_flags(8))
for name, value in processes.THREADS.items():
  os.environ.setdefault(name, value)
