"""Run configs are checked at start-up: every shipped config is valid, a value that makes
no sense names its field, and a typo'd override names the nearest valid field."""

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from saber_jax import configs
from saber_jax.train import config as config_lib

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(configs.__file__), '[!_]*.py')))


def _load(path, arg=None):
  spec = importlib.util.spec_from_file_location('c', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_every_shipped_config_is_valid(path):
  config_lib.validate(_load(path))


@pytest.mark.parametrize('field, value, expected', [
    ('optim.warmup_steps', -3, 'config.optim.warmup_steps = -3: expected >= 0'),
    ('optim.grad_accum_steps', 0, 'config.optim.grad_accum_steps = 0: expected an integer >= 1'),
    ('data.length_buckets', (512, 256), 'config.data.length_buckets = (512, 256)'),
    ('nonfinite', 'ignore', "config.nonfinite = 'ignore': expected 'stop' or 'skip'"),
    ('mesh', (-1, -1, 1), 'config.mesh = (-1, -1, 1)'),
    ('dpo.beta', 0.0, 'config.dpo.beta = 0.0: expected > 0'),
    # Relations between fields, and names that must exist.
    ('data.num_data_shards', 3, 'config.data.num_data_shards = 3: expected >= 1 and a '
                                'divisor of data.batch_size (8)'),
    ('data.max_dropped_fraction', 1.5, 'config.data.max_dropped_fraction = 1.5: expected in '
                                       '[0, 1]'),
    ('lora.targets', (), 'config.lora.targets = (): expected at least one kernel regex'),
    ('model.name', 'qwen_9000', "config.model.name = 'qwen_9000': expected a ThinkerConfig "
                                'factory'),
    ('generate.window_batches', 0, 'config.generate.window_batches = 0: expected >= 1'),
    ('generate.upload_every', 0, 'config.generate.upload_every = 0: expected >= 1'),
    # Value sets read from their owners (models/layers, data/pipeline, steps, losses).
    ('model.remat', 'some', "config.model.remat = 'some': expected 'none', 'full' or 'dots'"),
    ('model.attention', 'flash',
     "config.model.attention = 'flash': expected 'auto', 'xla', 'cudnn' or 'splash'"),
    ('data.overlong', 'cut', "config.data.overlong = 'cut': expected 'truncate' or 'drop'"),
    ('trainable', 'head', "config.trainable = 'head': expected one of ['full', 'llm', 'lora']"),
    ('dpo.loss_type', 'kto', "config.dpo.loss_type = 'kto': expected one of ['sigmoid', "
                             "'sigmoid_norm', 'ipo', 'hinge', 'robust']"),
])
def test_nonsense_value_is_named(field, value, expected):
  config = config_lib.base_config()
  section, _, key = field.rpartition('.')
  (config[section] if section else config)[key] = value
  with pytest.raises(ValueError, match='invalid config') as error:
    config_lib.validate(config)
  assert expected in str(error.value)


def test_warmup_longer_than_the_run_is_named():
  config = config_lib.base_config()
  config.optim.total_steps, config.optim.warmup_steps = 100, 100
  with pytest.raises(ValueError, match=r'config.optim.warmup_steps = 100: expected < '
                                       r'optim.total_steps \(100\)'):
    config_lib.validate(config)
  config.optim.warmup_steps = 99
  config_lib.validate(config)


def test_typo_names_the_nearest_field():
  config = config_lib.base_config()
  assert config_lib.unknown_field(config, 'optim.warmup_steps') is None
  assert config_lib.unknown_field(config, 'optim.warmup_step') == (
      'config.optim.warmup_step is not a config field; did you mean config.optim.warmup_steps?')
  assert config_lib.unknown_field(config, 'chekpoint.keep').endswith('config.checkpoint.keep?')


def test_main_stops_on_a_typo_and_on_a_bad_value_before_any_work(tmp_path):
  def run(*args):
    return subprocess.run([sys.executable, '-m', 'saber_jax.main', '--config=configs/demo.py',
                           f'--config.workdir={tmp_path}', *args], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
  typo = run('--config.optim.warmup_step=5')
  assert typo.returncode != 0
  assert 'did you mean config.optim.warmup_steps?' in typo.stderr
  bad = run('--config.optim.warmup_steps=-5')
  assert bad.returncode != 0
  assert 'config.optim.warmup_steps = -5: expected >= 0' in bad.stderr
  assert os.listdir(tmp_path) == []


def test_a_gs_workdir_serves_training_and_generate_and_the_record_writers_are_refused():
  config = config_lib.base_config()
  config.workdir = 'gs://bucket/run'
  for mode in ('sft', 'dpo', 'generate'):
    config.mode = mode
    config_lib.validate(config)
  assert config_lib.LOCAL_WORKDIR_MODES == ('ref_logps', 'pipeline')
  for mode in config_lib.LOCAL_WORKDIR_MODES:
    config.mode = mode
    with pytest.raises(ValueError, match='gcsfuse mount of the bucket') as error:
      config_lib.validate(config)
    assert "config.workdir = 'gs://bucket/run'" in str(error.value)
    assert f"mode={mode!r}, which writes ArrayRecord files there" in str(error.value)
