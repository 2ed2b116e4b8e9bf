import os

import processes

# Eight CPU devices for the sharding tests; must be set before jax is imported.
os.environ.setdefault('XLA_FLAGS', processes.xla_flags(8))
