"""The dry run for a TPU slice (`--config.dry_run_topology`): Cloud accelerator types map to
libtpu's topology names, and `python -m saber_jax.main` compiles the step for TPU devices
from this CPU host (needs libtpu, `pip install 'saber_jax[tpu]'`), or fails naming the
topology."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

from saber_jax.train import config as config_lib
from saber_jax.train import dry_run

ROOT = pathlib.Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                  reason="needs libtpu (pip install 'saber_jax[tpu]')")


@pytest.mark.parametrize('name, libtpu_name, chips', [
    ('v5p-8', 'v5p:2x2x1', 4),          # v4/v5p types count TensorCores, 2 a chip
    ('v5p-64', 'v5p:4x4x2', 32),
    ('v4-128', 'v4:4x4x4', 64),
    ('v6e-16', 'v6e:4x4', 16),           # v5e/v6e types count chips
    ('v5litepod-32', 'v5e:8x4', 32),
    ('v6e:16x16', 'v6e:16x16', 256),     # libtpu's own form passes through
])
def test_accelerator_types_map_to_libtpu_topologies(name, libtpu_name, chips):
  assert dry_run.libtpu_topology(name) == (libtpu_name, chips)


@pytest.mark.parametrize('name, message', [
    ('v9-8', "unknown TPU topology 'v9-8'"),
    ('v5p64', "unknown TPU topology 'v5p64'"),
    ('v5p-24', "TPU topology 'v5p-24': 24 is not 2 x a power of two"),
    ('v6e-2', "TPU topology 'v6e-2': 2 is not 1 x a power of two of at least 4 chips"),
])
def test_bad_topology_names_are_named_in_the_error(name, message):
  with pytest.raises(ValueError, match=message):
    dry_run.libtpu_topology(name)


def _dry_run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, '-m', 'saber_jax.main', '--config=configs/demo.py', '--config.mode=sft',
       '--config.dry_run=True', '--config.dry_run_seq_len=2304', *args],
      cwd=ROOT, capture_output=True, text=True, timeout=900)


@needs_libtpu
def test_mesh_that_does_not_divide_the_slice_fails_naming_it():
  result = _dry_run('--config.dry_run_topology=v5p-16', '--config.mesh=(3,-1,1)')
  assert result.returncode != 0
  assert "TPU topology 'v5p-16' has 8 devices" in result.stderr, result.stderr[-3000:]


@needs_libtpu
@pytest.mark.slow
def test_tiny_thinker_compiles_for_a_v5p_slice():
  """The tiny thinker's SFT step with splash attention ('auto' on a TPU target), FSDP over
  the 8 devices of a v5p-16 (4 chips, 2 cores each), compiled by libtpu's TPU compiler."""
  result = _dry_run('--config.dry_run_topology=v5p-16', '--config.mesh=(1,-1,1)')
  assert result.returncode == 0, result.stderr[-3000:]
  line = [s for s in result.stdout.splitlines() if s.startswith('per_device_memory_gib=')]
  assert line, result.stdout[-3000:]
  assert 0.01 < float(line[0].split('=')[1]) < 95
  assert '[dry run] v5p-16: 8 x TPU v5' in result.stdout and 'HBM per device: fits' in result.stdout


@pytest.mark.parametrize('name, arg, per_update', [
    ('sed_sft', 'v5p', 128), ('sed_sft', 'v6e,lora', 128),
    ('ca_dpo', 'v5p,lora', 64), ('ca_dpo', 'v6e', 64)])
def test_tpu_configs_keep_the_papers_batch(name, arg, per_update):
  spec = importlib.util.spec_from_file_location(name, ROOT / 'saber_jax' / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  slice_name, _, trainable = arg.partition(',')
  hosts = config_lib.TPU_SLICES[slice_name]['chips'] // config_lib.CHIPS_PER_HOST
  assert config.data.batch_size * hosts * config.optim.grad_accum_steps == per_update
  assert config.trainable == (trainable or 'full') and config.model.attention == 'splash'
