"""Checkpoint conversion: HF -> params -> HF round trips, hub layout, errors, sharded loading,
and the 7B parameter count."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from transformers import (Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration)

from hf_reference import hf_logits, make_batch, tiny_hf_model
from saber_jax import convert, sharding
from saber_jax.models import ThinkerConfig, abstract_params, thinker_logits

BATCH_ROWS = [[('text', 2), ('video+audio', (3, 6, 6), 1.0, 235), ('text', 2),
               ('image', (1, 4, 4)), ('text', 3)]]


@pytest.fixture(scope='module')
def hf_checkpoint(tmp_path_factory):
  model = tiny_hf_model(seed=1)
  path = tmp_path_factory.mktemp('hf')
  model.save_pretrained(path)
  return model, str(path)


@pytest.fixture(scope='module')
def batch():
  return make_batch(BATCH_ROWS, use_audio_in_video=True)


def test_round_trip_through_save_hf_gives_transformers_the_same_logits(hf_checkpoint, batch,
                                                                       tmp_path):
  model, path = hf_checkpoint
  config, params = convert.load_hf(path)
  convert.save_hf(config, params, str(tmp_path))
  reloaded = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
      str(tmp_path), attn_implementation='eager').eval()
  want = hf_logits(model, batch)
  np.testing.assert_allclose(hf_logits(reloaded, batch), want, atol=1e-6, rtol=0)
  # Every tensor comes back bit for bit.
  original = model.state_dict()
  for name, value in reloaded.state_dict().items():
    torch.testing.assert_close(value, original[name], rtol=0, atol=0)


def test_hub_layout_with_thinker_prefix_and_index_loads(hf_checkpoint, batch, tmp_path):
  model, path = hf_checkpoint
  config, params = convert.load_hf(path)
  convert.save_hf(config, params, str(tmp_path), prefix='thinker.', max_shard_bytes=200_000)
  index_path = tmp_path / 'model.safetensors.index.json'
  index = json.loads(index_path.read_text())
  assert len(set(index['weight_map'].values())) > 1
  assert all(name.startswith('thinker.') for name in index['weight_map'])
  # The full Omni checkpoint also holds the talker and token2wav: they are skipped.
  convert.write_safetensors(str(tmp_path / 'talker.safetensors'),
                            {'talker.model.embed_tokens.weight': np.zeros((3, 2), np.float32),
                             'token2wav.code_embedding.weight': np.zeros((2, 2), np.float32)})
  index['weight_map'].update({'talker.model.embed_tokens.weight': 'talker.safetensors',
                              'token2wav.code_embedding.weight': 'talker.safetensors'})
  index_path.write_text(json.dumps(index))
  config_hub, params_hub = convert.load_hf(str(tmp_path))
  assert config_hub == config
  got = thinker_logits(config_hub, params_hub, batch)
  want = hf_logits(model, batch)
  assert np.abs(np.asarray(got) - want).max() < 1e-4


def test_unknown_and_missing_tensors_are_named(hf_checkpoint, tmp_path):
  _, path = hf_checkpoint
  tensors = dict(convert.read_safetensors(os.path.join(path, 'model.safetensors')))
  (tmp_path / 'config.json').write_text(open(os.path.join(path, 'config.json')).read())
  extra = dict(tensors, **{'model.layers.0.self_attn.rotary.weight': np.zeros(2, np.float32)})
  convert.write_safetensors(str(tmp_path / 'model.safetensors'), extra)
  with pytest.raises(KeyError, match='model.layers.0.self_attn.rotary.weight'):
    convert.load_hf(str(tmp_path))
  missing = {k: v for k, v in tensors.items() if k != 'visual.blocks.1.attn.q.bias'}
  convert.write_safetensors(str(tmp_path / 'model.safetensors'), missing)
  with pytest.raises(KeyError, match=r'vision/blocks/attn/q/bias \(layers \[1\]\)'):
    convert.load_hf(str(tmp_path))


def test_bfloat16_checkpoint_loads(hf_checkpoint, tmp_path):
  model, path = hf_checkpoint
  config, params = convert.load_hf(path)
  convert.save_hf(config, jax.tree.map(lambda x: x.astype('bfloat16'), params), str(tmp_path))
  _, params16 = convert.load_hf(str(tmp_path), dtype='bfloat16')
  leaf = params16['text']['embed_tokens']['embedding']
  assert leaf.dtype == 'bfloat16'
  np.testing.assert_array_equal(np.asarray(leaf),
                                np.asarray(params['text']['embed_tokens']['embedding'])
                                .astype('bfloat16'))


def test_sharded_load_on_2x4_mesh_gives_the_same_logits(hf_checkpoint, batch):
  _, path = hf_checkpoint
  config, params = convert.load_hf(path)
  mesh = sharding.make_mesh((2, 4, 1))
  _, sharded = convert.load_hf(path, mesh=mesh)
  gate = sharded['text']['layers']['mlp']['gate_proj']['kernel']   # [layers, embed, mlp]
  assert gate.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', None)
  assert len(gate.addressable_shards) == 8
  want = thinker_logits(config, params, batch)
  got = thinker_logits(config, sharded, batch)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def _published_7b_hf_config() -> Qwen2_5OmniThinkerConfig:
  """Qwen/Qwen2.5-Omni-7B's thinker config.json values (the class defaults differ in the
  vision width)."""
  return Qwen2_5OmniThinkerConfig(
      vision_config=dict(hidden_size=1280, out_hidden_size=3584, depth=32, num_heads=16,
                         intermediate_size=3420, fullatt_block_indexes=[7, 15, 23, 31]),
      audio_config=dict(d_model=1280, encoder_layers=32, output_dim=3584),
      text_config=dict(vocab_size=152064, hidden_size=3584, num_hidden_layers=28,
                       rope_parameters=dict(rope_type='default', rope_theta=1e6,
                                            mrope_section=[16, 24, 24])),
      vision_start_token_id=151652, vision_end_token_id=151653)


def test_7b_parameter_count_equals_transformers():
  with torch.device('meta'):
    reference = Qwen2_5OmniThinkerForConditionalGeneration(_published_7b_hf_config())
  want = sum(p.numel() for p in reference.parameters())
  config = ThinkerConfig.qwen2_5_omni_7b()
  assert ThinkerConfig.from_hf(_published_7b_hf_config().to_dict()) == config
  got = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(config)))
  assert got == want
  assert 8.9e9 < got < 9.0e9


def test_convert_tool_round_trips_through_orbax_params(hf_checkpoint, batch, tmp_path):
  from saber_jax.cli import convert_hf as tool
  model, path = hf_checkpoint
  tool.main(['to-params', '--hf', path, '--out', str(tmp_path / 'params')])
  tool.main(['to-hf', '--params', str(tmp_path / 'params'), '--out', str(tmp_path / 'hf')])
  reloaded = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
      str(tmp_path / 'hf'), attn_implementation='eager').eval()
  np.testing.assert_allclose(hf_logits(reloaded, batch), hf_logits(model, batch), atol=1e-6,
                             rtol=0)
