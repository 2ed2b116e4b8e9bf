"""libtpu stays uninitialised where there is no TPU (saber_jax.platforms): JAX_PLATFORMS is
set before jax is imported unless the user chose, or a TPU chip is on the PCI bus."""

import importlib.util
import os
import subprocess
import sys

import pytest

from saber_jax import platforms

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                  reason='needs libtpu (the test extra)')


def _pci(tmp_path, *vendors):
  for i, vendor in enumerate(vendors):
    device = tmp_path / f'0000:00:0{i}.0'
    device.mkdir()
    (device / 'vendor').write_text(vendor + '\n')
  return str(tmp_path)


@needs_libtpu
def test_no_tpu_chip_keeps_jax_off_the_tpu_backend_unless_the_user_chose(tmp_path):
  (tmp_path / 'a').mkdir()
  no_tpu = _pci(tmp_path / 'a', '0x8086', '0x10de')
  env = {}
  assert platforms.skip_absent_tpu(env, no_tpu) == env['JAX_PLATFORMS']
  assert 'tpu' not in env['JAX_PLATFORMS'] and env['JAX_PLATFORMS'].endswith('cpu')
  chosen = {'JAX_PLATFORMS': 'tpu'}
  assert platforms.skip_absent_tpu(chosen, no_tpu) is None and chosen == {'JAX_PLATFORMS': 'tpu'}
  forced = {'JAX_FORCE_TPU_INIT': '1'}
  assert platforms.skip_absent_tpu(forced, no_tpu) is None and 'JAX_PLATFORMS' not in forced
  (tmp_path / 'b').mkdir()
  tpu = _pci(tmp_path / 'b', '0x8086', platforms.GOOGLE_PCI_VENDOR)
  assert platforms.tpu_chips_present(tpu) and platforms.skip_absent_tpu({}, tpu) is None


@needs_libtpu
@pytest.mark.skipif(platforms.tpu_chips_present(), reason='this host has a TPU')
def test_importing_saber_jax_then_jax_prints_no_tpu_errors():
  env = {k: v for k, v in os.environ.items() if k not in ('JAX_PLATFORMS', 'XLA_FLAGS')}
  run = subprocess.run([sys.executable, '-c', 'import saber_jax, jax, os; '
                        "print(jax.default_backend(), os.environ['JAX_PLATFORMS'])"],
                       capture_output=True, text=True, env=env, timeout=120)
  assert run.returncode == 0, run.stderr
  assert 'tpu' not in run.stdout.lower() and 'tpu' not in run.stderr.lower(), run.stderr
