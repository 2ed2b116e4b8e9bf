"""Checkpoint conversion: HF -> params -> HF round trips, hub layout, errors, sharded loading,
and the 7B parameter count."""

import copy
import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import torch
from transformers import (Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniThinkerConfig,
                          Qwen2_5OmniThinkerForConditionalGeneration)

from hf_reference import hf_logits, make_batch, tiny_full_hf_model, tiny_hf_model
from saber_jax import convert, files, sharding, weights
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


def _checkpoint_with(tmp_path, path, tensors):
  (tmp_path / 'config.json').write_text(open(os.path.join(path, 'config.json')).read())
  convert.write_safetensors(str(tmp_path / 'model.safetensors'), tensors)
  return str(tmp_path)


def test_tensor_for_a_layer_the_config_lacks_is_named(hf_checkpoint, tmp_path):
  _, path = hf_checkpoint
  tensors = dict(convert.read_safetensors(os.path.join(path, 'model.safetensors')))
  tensors['model.layers.7.mlp.up_proj.weight'] = tensors['model.layers.0.mlp.up_proj.weight']
  with pytest.raises(KeyError, match=r"model.layers.7.mlp.up_proj.weight.*layer 7 of "
                                     r"'text/layers/mlp/up_proj/kernel'; the config has 2"):
    convert.load_hf(_checkpoint_with(tmp_path, path, tensors))


def test_nonfinite_weight_is_refused_naming_the_tensor(hf_checkpoint, tmp_path):
  _, path = hf_checkpoint
  tensors = dict(convert.read_safetensors(os.path.join(path, 'model.safetensors')))
  bad = np.array(tensors['model.layers.1.self_attn.k_proj.bias'])
  bad[3] = np.inf
  tensors['model.layers.1.self_attn.k_proj.bias'] = bad
  with pytest.raises(ValueError, match=r"model.layers.1.self_attn.k_proj.bias in "
                                       r"model.safetensors.*non-finite"):
    convert.load_hf(_checkpoint_with(tmp_path, path, tensors))


def test_truncated_safetensors_names_the_file_and_tensor(hf_checkpoint, tmp_path):
  _, path = hf_checkpoint
  data = open(os.path.join(path, 'model.safetensors'), 'rb').read()
  (tmp_path / 'config.json').write_text(open(os.path.join(path, 'config.json')).read())
  file = tmp_path / 'model.safetensors'
  file.write_bytes(data[:len(data) - 100])
  with pytest.raises(ValueError, match=rf"{file}: truncated: tensor '.*' ends at byte "
                                       rf"{len(data)}, the file has {len(data) - 100}"):
    convert.load_hf(str(tmp_path))
  file.write_bytes(data[:20])
  with pytest.raises(ValueError, match=rf'{file}: truncated: the header claims'):
    convert.load_hf(str(tmp_path))


def test_export_into_an_earlier_export_replaces_its_weights(hf_checkpoint, tmp_path):
  _, path = hf_checkpoint
  config, params = convert.load_hf(path)
  out = tmp_path / 'export'
  convert.save_hf(config, params, str(out), max_shard_bytes=200_000)
  assert (out / 'model.safetensors.index.json').exists()
  (out / 'tokenizer_config.json').write_text('{}')
  doubled = jax.tree.map(lambda x: 2 * x, params)
  convert.save_hf(config, doubled, str(out))
  assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors', 'tokenizer_config.json']
  assert sorted(os.listdir(tmp_path)) == ['export']
  _, reloaded = convert.load_hf(str(out))
  for got, want in zip(jax.tree.leaves(reloaded), jax.tree.leaves(doubled)):
    np.testing.assert_array_equal(got, want)


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


@pytest.fixture(scope='module')
def full_base(tmp_path_factory):
  """A full Omni checkpoint as the hub ships one: weights, config, speakers, tokenizer files."""
  model = tiny_full_hf_model(seed=2)
  path = tmp_path_factory.mktemp('omni')
  model.save_pretrained(path)
  torch.save({'Chelsie': {'cond': torch.randn(4), 'ref_mel': torch.randn(3, 16)}},
             path / 'spk_dict.pt')
  for name in ('tokenizer_config.json', 'preprocessor_config.json', 'chat_template.json'):
    (path / name).write_text(json.dumps({'from': 'base', 'name': name}))
  return model, path


def test_full_export_with_base_loads_as_the_whole_omni_model(full_base, batch, tmp_path):
  """to-params -> (train: here, a changed layer) -> to-hf --base: transformers loads the
  complete model, no tensor missing or extra; the thinker is the params', the talker and
  token2wav are the base's, and the base's other files come along."""
  from saber_jax.cli import convert_hf as tool
  base_model, base = full_base
  tool.main(['to-params', '--hf', str(base), '--out', str(tmp_path / 'params')])
  config = weights.params_config(str(tmp_path / 'params'))
  params = weights.load_params(str(tmp_path / 'params'),
                                  jax.tree.map(np.asarray, convert.load_hf(str(base))[1]))
  params['text']['layers']['mlp']['up_proj']['kernel'] *= 1.5     # the "trained" thinker
  weights.save_params(str(tmp_path / 'trained'), params, config)
  out = tmp_path / 'out'
  tool.main(['to-hf', '--params', str(tmp_path / 'trained'), '--base', str(base),
             '--out', str(out), '--max-shard-gb', str(150_000 / 2**30)])
  index = json.loads((out / 'model.safetensors.index.json').read_text())
  assert len(set(index['weight_map'].values())) > 2
  for name in ('spk_dict.pt', 'tokenizer_config.json', 'preprocessor_config.json',
               'chat_template.json', 'generation_config.json'):
    assert (out / name).read_bytes() == (base / name).read_bytes(), name
  assert json.loads((out / 'config.json').read_text()) == json.loads(
      (base / 'config.json').read_text())          # same architecture: the base's config
  exported = {}
  for file in convert.checkpoint_files(str(out)):
    exported.update(convert.read_safetensors(file))
  base_names = set()
  for file in convert.checkpoint_files(str(base)):
    base_names.update(name for name, _ in convert.read_safetensors(file))
  assert set(exported) == base_names

  model = Qwen2_5OmniForConditionalGeneration.from_pretrained(
      str(out), attn_implementation='eager').eval()
  state = model.state_dict()
  # transformers 5 names the thinker's modules differently from the files (it maps them on
  # load): compare by the tower each name routes to.
  canonical = lambda name: convert.route(name) or name
  assert len(state) == len(exported)
  assert {canonical(n) for n in state} == {canonical(n) for n in exported}  # none missing/extra
  by_key = {canonical(n): v for n, v in exported.items()}
  for name, value in state.items():                 # ... and nothing left at its random init
    np.testing.assert_array_equal(value.numpy(), by_key[canonical(name)], err_msg=name)
  base_state = base_model.state_dict()
  for name in state:
    if not name.startswith('thinker.'):
      torch.testing.assert_close(state[name], base_state[name], rtol=0, atol=0)
  assert 'Chelsie' in model.speaker_map
  want = np.asarray(thinker_logits(config, params, batch))
  np.testing.assert_allclose(hf_logits(model.thinker, batch), want, atol=2e-5, rtol=0)
  assert np.abs(hf_logits(base_model.thinker, batch) - want).max() > 1e-3


def test_full_export_from_a_gs_base_equals_the_local_one(full_base, gcs, tmp_path):
  """`--base gs://...` (the remote-storage workdirs' bucket): the base is read from a local
  copy, and the export is the one a local base gives, file for file."""
  from saber_jax.cli import convert_hf as tool
  _, base = full_base
  files.upload(str(base), 'gs://runs/omni')
  tool.main(['to-params', '--hf', str(base), '--out', str(tmp_path / 'params')])
  for name, where in (('local', str(base)), ('remote', 'gs://runs/omni')):
    tool.main(['to-hf', '--params', str(tmp_path / 'params'), '--base', where,
               '--out', str(tmp_path / name)])
  local, remote = (sorted(p.name for p in (tmp_path / n).iterdir()) for n in ('local', 'remote'))
  assert local == remote and 'spk_dict.pt' in local
  for name in local:
    assert (tmp_path / 'local' / name).read_bytes() == (tmp_path / 'remote' / name).read_bytes()


def test_full_export_config_changes_only_what_the_params_change(full_base):
  _, base = full_base
  base_config = json.loads((base / 'config.json').read_text())
  config = ThinkerConfig.from_hf(base_config)
  assert convert.full_config(base_config, config) == base_config
  changed = dataclasses.replace(config, seconds_per_chunk=3, text=dataclasses.replace(
      config.text, rope_theta=5e5))
  merged = convert.full_config(base_config, changed)
  assert merged['thinker_config']['seconds_per_chunk'] == 3
  assert merged['thinker_config']['text_config']['rope_parameters']['rope_theta'] == 5e5
  assert ThinkerConfig.from_hf(merged) == changed
  merged['thinker_config']['seconds_per_chunk'] = base_config['thinker_config']['seconds_per_chunk']
  merged['thinker_config']['text_config']['rope_parameters'] = (
      base_config['thinker_config']['text_config']['rope_parameters'])
  assert merged == base_config


def test_full_export_refuses_params_that_do_not_fit_the_base(full_base, tmp_path):
  _, base = full_base
  config, params = convert.load_hf(str(base))
  del params['vision']['merger']
  with pytest.raises(ValueError, match=r'tensors of the base the params lack: '
                                       r"\['thinker.visual.merger"):
    convert.save_full_hf(config, convert.params_leaf(params), str(base), str(tmp_path / 'o'))
  assert not (tmp_path / 'o').exists()
  thinker_only = tmp_path / 'thinker_only'
  thinker_only.mkdir()
  (thinker_only / 'config.json').write_text(json.dumps(config.to_hf()))
  with pytest.raises(ValueError, match=rf'{thinker_only}/config.json: not a full Qwen2.5-Omni'):
    convert.save_full_hf(config, convert.params_leaf(params), str(thinker_only),
                         str(tmp_path / 'o'))


def test_full_export_writes_the_thinker_in_the_bases_dtype(full_base, tmp_path):
  """A bf16 release as the base and fp32 params: the export's thinker is bf16 (what the
  base's config and a server expect), the rest copied as is; --dtype overrides."""
  model, base = full_base
  base16 = tmp_path / 'base16'
  copy.deepcopy(model).to(torch.bfloat16).save_pretrained(base16)
  (base16 / 'spk_dict.pt').write_bytes((base / 'spk_dict.pt').read_bytes())
  config, params = convert.load_hf(str(base))                       # fp32 params
  convert.save_full_hf(config, convert.params_leaf(params), str(base16), str(tmp_path / 'o'))
  exported = dict(convert.read_safetensors(str(tmp_path / 'o' / 'model.safetensors')))
  assert {a.dtype.name for a in exported.values()} == {'bfloat16'}
  want = dict(convert.hf_tensors(params, 'thinker.'))
  name = 'thinker.model.layers.1.mlp.up_proj.weight'
  np.testing.assert_array_equal(exported[name], want[name].astype('bfloat16'))
  convert.save_full_hf(config, convert.params_leaf(params), str(base16), str(tmp_path / 'o'),
                       dtype='float32')
  exported = dict(convert.read_safetensors(str(tmp_path / 'o' / 'model.safetensors')))
  np.testing.assert_array_equal(exported[name], want[name])
  assert exported['talker.codec_head.weight'].dtype.name == 'bfloat16'
