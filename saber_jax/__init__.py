"""SABER-LLM in JAX/Flax (see README.md)."""

from saber_jax import platforms as _platforms

_platforms.skip_absent_tpu()   # before any submodule imports jax
