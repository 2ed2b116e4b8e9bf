"""Every shipped run config loads as `python -m saber_jax.main --config=configs/x.py[:arg]`
loads it, and plans its stage (model, LoRA targets, optimizer, shardings) on an 8-device
mesh; the CA-DPO dry run compiles."""

import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from saber_jax import sharding, weights
from saber_jax.train import config as run_config
from saber_jax.train import trainer
from test_main import _run

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / 'configs').glob('*.py') if p.name != '__init__.py')


def load_config(name: str, arg: str | None):
  """The config main.py gets for `--config=configs/<name>[:arg]` (the same absl flag)."""
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=flag_values)
  spec = str(ROOT / 'configs' / name) + (f':{arg}' if arg else '')
  flag_values(['main', f'--config={spec}'])
  return flag_values.config


def test_every_config_file_is_covered():
  assert {'demo.py', 'sed_sft_7b.py', 'ca_dpo_7b.py'} <= set(CONFIGS)


@pytest.mark.parametrize('arg', [None, 'llm', 'lora'])
@pytest.mark.parametrize('name', CONFIGS)
def test_config_loads_and_plans_its_stage(name, arg):
  config = load_config(name, arg)
  run_config.validate(config)
  if name != 'demo.py':                   # the demo takes no argument
    assert config.trainable == (arg or 'full')
  config.optim.total_steps = 10           # 0 means "count the records"; there are none here
  stage = 'dpo' if config.mode == 'dpo' else 'sft'
  setup = trainer.plan(config, stage, sharding.make_mesh(config.mesh))
  assert setup.model_config == weights.model_config_of(config)
  if (arg or 'full') == 'lora' and name != 'demo.py':
    assert set(setup.abstract_state.trainable) == {'lora'}


@pytest.mark.slow
def test_dpo_dry_run_compiles_and_prints_per_device_memory(tmp_path):
  out = _run(['--config=configs/ca_dpo_7b.py:lora', '--config.dry_run=True',
              '--config.optim.total_steps=10'], tmp_path, devices=8)
  assert '[dry run] dpo trainable=lora' in out
  line = [l for l in out.splitlines() if l.startswith('per_device_memory_gib=')]
  assert line, out[-3000:]
  assert 1.0 < float(line[0].split('=')[1]) < 80.0
