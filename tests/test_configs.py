"""Every shipped run config loads as `python -m saber_jax.main --config=configs/x.py[:arg]`
loads it, and plans its stage (model, LoRA targets, optimizer, shardings) on an 8-device
mesh: each variant of the paper families (size x trainable mode x TPU slice), the demo
pipeline and each of its stages alone; the CA-DPO dry run compiles."""

import itertools
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
FAMILIES = {'sed_sft.py': 'sft', 'ca_dpo.py': 'dpo'}
# Every variant: each model size x trainable mode x (no slice, each TPU slice), in the
# argument's word orders a user might write.
SIZES, TRAINABLE, SLICES = (tuple(run_config.VARIANT_WORDS[k]) for k in
                            ('model size', 'trainable mode', 'TPU slice'))
VARIANTS = [(size, trainable, tpu) for size, trainable, tpu
            in itertools.product(SIZES, TRAINABLE, (None,) + SLICES)]
DEMO_STAGES = ('sft', 'ref_logps', 'dpo', 'generate')


def load_config(name: str, arg: str | None):
  """The config main.py gets for `--config=configs/<name>[:arg]` (the same absl flag)."""
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=flag_values)
  spec = str(ROOT / 'configs' / name) + (f':{arg}' if arg else '')
  flag_values(['main', f'--config={spec}'])
  return flag_values.config


def plan(config, stage: str):
  config.optim.total_steps = 10           # 0 means "count the records"; there are none here
  setup = trainer.plan(config, stage, sharding.make_mesh(config.mesh))
  assert setup.model_config == weights.model_config_of(config)
  return setup


def test_every_config_file_is_covered():
  assert {'demo.py', *FAMILIES} <= set(CONFIGS)
  assert not [name for name in CONFIGS if name.startswith(('sed_sft_', 'ca_dpo_'))]  # families


@pytest.mark.parametrize('name', CONFIGS)
def test_config_loads_without_argument_and_plans_its_stage(name):
  config = load_config(name, None)
  run_config.validate(config)
  plan(config, 'dpo' if config.mode == 'dpo' else 'sft')


@pytest.mark.parametrize('size, trainable, tpu', VARIANTS)
@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_family_variant_loads_and_plans_its_stage(name, size, trainable, tpu):
  words = [w for w in (tpu, trainable, size) if w]          # any order
  config = load_config(name, ','.join(words))
  run_config.validate(config)
  recipe = run_config.RECIPES[name.removesuffix('.py')]
  assert config.mode == recipe['mode'] == FAMILIES[name]
  assert config.model.name == run_config.MODEL_SIZES[size]
  assert config.trainable == trainable
  assert config.optim.lr == recipe['optim']['lr']
  # The paper's batch on every layout: per process x processes x accumulation.
  hosts = (run_config.TPU_SLICES[tpu]['chips'] // run_config.CHIPS_PER_HOST) if tpu else 1
  per_update = recipe['data']['batch_size'] * recipe['optim']['grad_accum_steps']
  assert config.data.batch_size * hosts * config.optim.grad_accum_steps == per_update
  assert config.model.attention == ('splash' if tpu else 'auto')
  assert config.workdir.endswith(f'_{tpu}' if tpu else run_config.MODEL_SIZES[size])
  setup = plan(config, FAMILIES[name])
  if trainable == 'lora':
    assert set(setup.abstract_state.trainable) == {'lora'}


@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_family_defaults_are_7b_full_on_one_gpu_host(name):
  assert load_config(name, None).to_dict() == load_config(name, 'full,7b').to_dict()
  config = load_config(name, None)
  assert (config.model.name, config.trainable) == ('qwen2_5_omni_7b', 'full')
  assert config.model.attention == 'auto' and config.optim.grad_accum_steps == 8


@pytest.mark.parametrize('arg, message', [
    ('7b,lroa', "unknown config argument 'lroa' in '7b,lroa': expected comma-joined words of "
                '(model size: 3b, 7b; trainable mode: full, llm, lora; TPU slice: v5p, v6e)'),
    ('3b,7b', "config argument '3b,7b' names two of model size (3b, 7b)"),
    ('lora,v5p,llm', 'names two of trainable mode'),
])
def test_family_argument_errors_name_the_valid_words(arg, message):
  with pytest.raises(flags.IllegalFlagValueError) as error:     # absl's wrap of ValueError
    load_config('sed_sft.py', arg)
  assert message in str(error.value)


def test_demo_is_the_pipeline_on_the_tiny_model():
  config = load_config('demo.py', None)
  assert config.mode == 'pipeline' and config.model.name == 'tiny'


@pytest.mark.parametrize('stage', DEMO_STAGES)
def test_demo_stage_alone_is_the_pipelines_stage(stage):
  """`configs/demo.py:<stage>` is the pipeline's config with that stage's own settings
  (the same `c.pipeline` entries the orchestrator applies), and the paths follow
  `--config.workdir`."""
  pipeline = load_config('demo.py', None)
  config = load_config('demo.py', stage)
  config.workdir = '/runs/d'              # what --config.workdir=/runs/d does
  run_config.validate(config)
  assert config.mode == stage and 'pipeline' not in config
  settings = {'sft': 'sft', 'ref_logps': 'dpo', 'dpo': 'dpo', 'generate': None}[stage]
  expected = (run_config.with_overrides(pipeline, pipeline.pipeline[settings]) if settings
              else pipeline)
  for section in ('model', 'optim', 'data', 'dpo', 'lora', 'generate', 'checkpoint'):
    want, got = expected[section].to_dict(), config[section].to_dict()
    want.pop('records', None), got.pop('records', None)
    assert got == want, section
  assert (config.seed, config.trainable, config.mesh) == (
      expected.seed, expected.trainable, expected.mesh)
  records = {'sft': config.sft_records, 'ref_logps': config.pref_records,
             'dpo': config.pref_records, 'generate': config.generate.records}[stage]
  assert records == {'sft': '/runs/d/data/sft/sft', 'ref_logps': '/runs/d/data/pref/pref',
                     'dpo': '/runs/d/ref_logps/pref', 'generate': '/runs/d/data/sft/sft'}[stage]
  assert config.init_from == {'sft': '', 'ref_logps': '/runs/d/sft/final',
                              'dpo': '/runs/d/sft/final', 'generate': '/runs/d/dpo/final'}[stage]
  if stage in ('sft', 'dpo'):
    plan(config, stage)


def test_demo_stage_argument_error():
  with pytest.raises(flags.IllegalFlagValueError,
                     match="unknown config argument 'sfft'.*sft, ref_logps, dpo"):
    load_config('demo.py', 'sfft')


@pytest.mark.slow
def test_dpo_dry_run_compiles_and_prints_per_device_memory(tmp_path):
  out = _run(['--config=configs/ca_dpo.py:7b,lora', '--config.dry_run=True',
              '--config.optim.total_steps=10'], tmp_path, devices=8)
  assert '[dry run] dpo trainable=lora' in out
  memory = [row for row in out.splitlines() if row.startswith('per_device_memory_gib=')]
  assert memory, out[-3000:]
  assert 1.0 < float(memory[0].split('=')[1]) < 80.0
