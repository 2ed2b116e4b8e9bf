"""Keep libtpu from initialising on hosts without a TPU.

With libtpu installed (the `tpu` and `test` extras) every JAX start tries the TPU backend
first; on a CPU or GPU host it fails and prints several lines of TPU errors (worker
hostnames, accelerator type) before the program's first line. `skip_absent_tpu` runs
before jax is imported (`saber_jax/__init__.py`): when the user has not chosen platforms
(`JAX_PLATFORMS`, `JAX_FORCE_TPU_INIT`) and no TPU chip is on this host's PCI bus, it sets
`JAX_PLATFORMS` to the platforms that are there ('cpu', or 'cuda,cpu' with an NVIDIA GPU
and JAX's CUDA plugin; other accelerators are left to JAX). The TPU-slice dry run needs no
TPU: it loads libtpu itself.
"""

import glob
import importlib.util
import os

GOOGLE_PCI_VENDOR = '0x1ae0'     # TPU chips; what jax's own hardware check looks for


def tpu_chips_present(pci_root: str = '/sys/bus/pci/devices') -> bool:
  """Whether a Google (TPU) PCI device is on this host."""
  for vendor in glob.glob(os.path.join(pci_root, '*', 'vendor')):
    try:
      with open(vendor) as f:
        if f.read().strip() == GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def _installed(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except (ImportError, ValueError):
    return False


CUDA_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_plugins.xla_cuda12',
                'jax_plugins.xla_cuda13')


def local_platforms() -> str | None:
  """JAX_PLATFORMS for a host without a TPU: 'cpu', or 'cuda,cpu' with an NVIDIA device and
  JAX's CUDA plugin; None (leave JAX to choose) for any other accelerator."""
  if os.path.exists('/dev/kfd') or os.path.exists('/dev/dxg'):   # ROCm, WSL: JAX decides
    return None
  if any(os.path.exists(p) for p in ('/dev/nvidiactl', '/dev/nvidia0')):
    return 'cuda,cpu' if any(_installed(m) for m in CUDA_PLUGINS) else None
  return 'cpu'


def skip_absent_tpu(environ=os.environ, pci_root: str = '/sys/bus/pci/devices') -> str | None:
  """Sets `environ['JAX_PLATFORMS']` without 'tpu' when libtpu is installed, no TPU chip
  is present and the user chose nothing; returns what it set (None: left alone)."""
  if ('JAX_PLATFORMS' in environ or 'JAX_FORCE_TPU_INIT' in environ
      or not _installed('libtpu') or tpu_chips_present(pci_root)):
    return None
  platforms = local_platforms()
  if platforms:
    environ['JAX_PLATFORMS'] = platforms
  return platforms
