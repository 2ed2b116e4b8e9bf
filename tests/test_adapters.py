"""LoRA adapters out to PEFT and back in (saber_jax/train/adapters.py, `to-peft`,
`--config.init_lora`): PEFT applied to the transformers thinker gives the logits of our merged
export, and a PEFT adapter starts a LoRA stage whose first-step model is PEFT's."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Qwen2_5OmniThinkerForConditionalGeneration

from hf_reference import hf_logits, make_batch, tiny_hf_model
from saber_jax import sharding, weights
from saber_jax.cli import convert_hf as tool
from saber_jax.models import abstract_params, thinker_logits
from saber_jax.train import adapters, config as config_lib, lora, stages, trainer
from train_batches import sft_batch

ROWS = [[('text', 3), ('video+audio', (2, 4, 4), 1.0, 60), ('text', 4), ('image', (1, 4, 4)),
         ('text', 5)]]
TEXT_PROJECTIONS = r'.*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)'


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  path = tmp_path_factory.mktemp('base')
  tiny_hf_model(seed=3).save_pretrained(path)
  return str(path)


@pytest.fixture(scope='module')
def batch():
  return make_batch(ROWS, use_audio_in_video=True, seed=4)


def _hf_base(base):
  return Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
      base, attn_implementation='eager').eval()


def _config(base, workdir, **lora):
  c = config_lib.base_config()
  c.model.hf_config, c.model.dtype, c.model.remat = base + '/config.json', 'float32', 'none'
  c.init_from, c.trainable, c.workdir, c.log_every = base, 'lora', str(workdir), 1
  c.lora.rank, c.lora.alpha = lora.get('rank', 4), lora.get('alpha', 8.0)
  c.optim.total_steps, c.optim.lr, c.optim.warmup_steps = 2, 1e-2, 0
  c.checkpoint.every_steps = 100
  return c


def _mesh():
  return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


@pytest.mark.slow
def test_lora_sft_adapter_through_peft_gives_the_merged_exports_logits(base, batch, tmp_path):
  config = _config(base, tmp_path / 'run')
  setup = trainer.plan(config, 'sft', _mesh())
  train = sft_batch(setup.model_config, 1)
  setup = trainer.train(config, setup, iter([train, train]), None, str(tmp_path / 'run'), 'sft',
                        2, init_from=base)
  final = str(tmp_path / 'run' / 'final')
  stages.save_final(config, setup, final, base)
  tool.main(['to-peft', '--params', final, '--out', str(tmp_path / 'peft')])
  tool.main(['to-hf', '--params', final, '--out', str(tmp_path / 'merged')])

  written = json.loads((tmp_path / 'peft' / 'adapter_config.json').read_text())
  assert (written['peft_type'], written['r'], written['lora_alpha']) == ('LORA', 4, 8.0)
  assert written['base_model_name_or_path'] == base
  assert 'model.language_model.layers.1.mlp.down_proj' in written['target_modules']
  assert len(written['target_modules']) == 2 * 7       # 2 layers x 7 projections

  peft_model = PeftModel.from_pretrained(_hf_base(base), str(tmp_path / 'peft')).eval()
  merged = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
      str(tmp_path / 'merged'), attn_implementation='eager').eval()
  want = hf_logits(merged, batch)
  np.testing.assert_allclose(hf_logits(peft_model, batch), want, atol=1e-4, rtol=0)
  assert np.abs(hf_logits(_hf_base(base), batch) - want).max() > 1e-3   # the adapter matters

  # And back in: the PEFT files give the very factors the run trained.
  trained = jax.tree.map(np.asarray, setup.state.trainable['lora'])
  back = adapters.load_peft(str(tmp_path / 'peft'), trained, rank=4, alpha=8.0)
  for got, want_leaf in zip(jax.tree.leaves(back), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(got, want_leaf)


def _peft_adapter(base, path, **lora):
  model = get_peft_model(_hf_base(base), LoraConfig(target_modules=TEXT_PROJECTIONS,
                                                    init_lora_weights=False, **lora))
  model.save_pretrained(path)
  return PeftModel.from_pretrained(_hf_base(base), path).eval()


@pytest.mark.slow
@pytest.mark.parametrize('rslora', [False, True])
def test_init_lora_starts_the_stage_at_the_peft_adapters_model(base, batch, tmp_path, rslora):
  """r=4, lora_alpha=8: scaling 2, or 8 / sqrt(4) = 4 with rsLoRA (our alpha 16 at rank 4)."""
  adapter = str(tmp_path / 'adapter')
  peft_model = _peft_adapter(base, adapter, r=4, lora_alpha=8, use_rslora=rslora)
  alpha = 16.0 if rslora else 8.0
  config = _config(base, tmp_path / 'run', alpha=alpha)
  config.init_lora = adapter
  setup = trainer.materialize(trainer.plan(config, 'sft', _mesh()), config, base)
  merged = trainer.final_params(setup, config.lora)
  got = np.asarray(thinker_logits(setup.model_config, merged, batch))
  want = hf_logits(peft_model, batch)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  assert np.abs(hf_logits(_hf_base(base), batch) - want).max() > 1e-3

  with pytest.raises(ValueError, match=rf'--config.lora.alpha={alpha:g}'):   # other scaling
    adapters.load_peft(adapter, setup.state.trainable['lora'], rank=4, alpha=32.0)


def test_init_lora_refuses_an_adapter_for_other_modules(base, tmp_path):
  adapter = str(tmp_path / 'adapter')
  _peft_adapter(base, adapter, r=4, lora_alpha=8)
  config = _config(base, tmp_path / 'run')
  params = nn.unbox(abstract_params(weights.model_config_of(config)))
  fewer = lora.init_lora(jax.random.key(0), params, rank=4,
                         targets=(r'^text/.*(q_proj|v_proj)/kernel$',))
  with pytest.raises(ValueError, match=r"tensor 'base_model.model.model.language_model.layers"
                                       r"\.\d\.(self_attn|mlp)\.\w+_proj.lora_A.weight' adapts "
                                       r'no module the run targets'):
    adapters.load_peft(adapter, fewer, rank=4, alpha=8.0)
  wider = lora.init_lora(jax.random.key(0), params, rank=4,
                         targets=lora.DEFAULT_TARGETS + (r'^audio/.*q_proj/kernel$',))
  with pytest.raises(ValueError, match=r"no \(or not every layer of\) \['audio/layers/self_attn/"
                                       r"q_proj/a'"):
    adapters.load_peft(adapter, wider, rank=4, alpha=8.0)
  config.init_lora, config.trainable = adapter, 'full'
  with pytest.raises(ValueError, match=r"config.init_lora = .*expected '' unless "
                                       r"trainable='lora'"):
    config_lib.validate(config)
