"""Parity of saber_jax.models.audio with transformers' Qwen2.5-Omni audio tower (fp32, eager)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import SinusoidsPositionEmbedding

from saber_jax import convert
from saber_jax.models import audio
from saber_jax.models.config import AudioConfig

MEL = 16
TOLERANCE = 1e-5


def _tiny_audio_config(n_window: int) -> dict:
  # Section 4 of reference/qwen2_5_omni_thinker.md; n_window varies the chunk size.
  return dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
              num_mel_bins=MEL, max_source_positions=1500, n_window=n_window, output_dim=64)


@functools.lru_cache(maxsize=None)
def _hf_thinker(n_window: int):
  """A tiny perturbed HF thinker (fp32, eager) and our config and params for its audio tower."""
  cfg = Qwen2_5OmniThinkerConfig(
      audio_config=_tiny_audio_config(n_window),
      vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=2,
                         temporal_patch_size=2, spatial_merge_size=2, window_size=8,
                         fullatt_block_indexes=[1], out_hidden_size=64),
      text_config=dict(vocab_size=99, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2,
                       rope_parameters=dict(rope_type='default', rope_theta=1e6,
                                            mrope_section=[2, 3, 3])))
  cfg._attn_implementation = 'eager'
  torch.manual_seed(n_window)
  model = Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval()
  with torch.no_grad():  # init gives zero biases and unit norms, which hide bugs
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  config = AudioConfig(**_tiny_audio_config(n_window))
  state = {k: v.numpy() for k, v in model.model.audio_tower.state_dict().items()}
  params = convert.params_from_state_dict(audio.CHECKPOINT_RULES, state.items(),
                                          _abstract_params(config))
  return model, config, params


def _abstract_params(config: AudioConfig, **module_kwargs):
  module = audio.AudioEncoder(config, **module_kwargs)
  window = 2 * config.n_window
  shapes = dict(chunks=jax.ShapeDtypeStruct((2, config.num_mel_bins, window), jnp.float32),
                chunk_lengths=jax.ShapeDtypeStruct((2,), jnp.int32),
                pool_index=jax.ShapeDtypeStruct((3, 2), jnp.int32))
  return nn.unbox(jax.eval_shape(module.init, jax.random.key(0), **shapes)['params'])


def _clips(lengths, pad_to, seed=0):
  """Random features [A, MEL, pad_to] and a prefix mask with the given valid lengths."""
  features = np.random.RandomState(seed).randn(len(lengths), MEL, pad_to).astype(np.float32)
  mask = (np.arange(pad_to)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
  return features, mask


def _hf_features(model, features, mask):
  with torch.no_grad():
    out = model.get_audio_features(torch.from_numpy(features), torch.from_numpy(mask))
  return out.last_hidden_state.numpy()


@functools.lru_cache(maxsize=None)
def _jitted_apply(config: AudioConfig, dtype=jnp.float32, remat='none'):
  return jax.jit(audio.AudioEncoder(config, dtype=dtype, remat=remat).apply)


def _ours(config, params, inputs, **module_kwargs):
  arrays = {k: v for k, v in inputs.items() if k != 'token_mask'}
  out = _jitted_apply(config, **module_kwargs)({'params': params}, **arrays)
  return np.asarray(out, np.float32)


def test_one_clip_of_many_chunks_matches_hf():
  # The reference snippet: 235 valid frames of 240, n_window 8 -> 15 chunks (last holds 11),
  # 118 post-conv tokens -> 59 audio tokens.
  model, config, params = _hf_thinker(8)
  features, mask = _clips([235], 240)
  inputs = audio.audio_inputs(config, features, mask)
  assert inputs['chunks'].shape == (15, MEL, 16)
  assert inputs['chunk_lengths'].tolist() == [16] * 14 + [11]
  expected = _hf_features(model, features, mask)
  ours = _ours(config, params, inputs)
  assert expected.shape == ours.shape == (59, 64)
  assert inputs['token_mask'].all()
  np.testing.assert_allclose(ours, expected, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize('n_window, lengths', [
    # odd post-conv length (233 -> 117, last token dropped), shorter than one chunk (5),
    # an exact multiple of the chunk (48 = 3 * 16)
    (8, [233, 5, 48]),
    # 5 post-conv tokens per full chunk: pooling pairs straddle chunk boundaries
    (5, [233, 7, 40]),
])
def test_batch_of_uneven_clips_matches_hf(n_window, lengths):
  model, config, params = _hf_thinker(n_window)
  features, mask = _clips(lengths, 256, seed=n_window)
  inputs = audio.audio_inputs(config, features, mask)
  expected = _hf_features(model, features, mask)
  ours = _ours(config, params, inputs)
  assert ours.shape == expected.shape == (sum(audio.audio_token_count(np.asarray(lengths))), 64)
  np.testing.assert_allclose(ours, expected, rtol=0, atol=TOLERANCE)
  chunk_of = inputs['pool_index'] // n_window
  straddling = (chunk_of[:, 0] != chunk_of[:, 1]).sum()
  assert (straddling > 0) == (n_window % 2 == 1)


def test_padded_bucket_gives_identical_valid_outputs():
  model, config, params = _hf_thinker(8)
  features, mask = _clips([100, 3, 64], 128, seed=3)
  exact = audio.audio_inputs(config, features, mask)
  padded = audio.audio_inputs(config, features, mask, num_chunks=len(exact['chunk_lengths']) + 3,
                              num_tokens=len(exact['token_mask']) + 7)
  assert padded['chunk_lengths'][-3:].tolist() == [0, 0, 0]
  assert padded['token_mask'].sum() == len(exact['token_mask'])
  out_exact = _ours(config, params, exact)
  out_padded = _ours(config, params, padded)
  assert np.isfinite(out_padded).all()
  np.testing.assert_allclose(out_padded[padded['token_mask']], out_exact, rtol=0, atol=1e-6)
  np.testing.assert_allclose(out_exact, _hf_features(model, features, mask), rtol=0, atol=TOLERANCE)


def test_too_small_bucket_is_an_error():
  config = AudioConfig(**_tiny_audio_config(8))
  features, mask = _clips([100], 100)
  with pytest.raises(ValueError, match='num_chunks=6 is too small: these clips need 7'):
    audio.audio_inputs(config, features, mask, num_chunks=6)
  with pytest.raises(ValueError, match='num_tokens=20 is too small: these clips need 25'):
    audio.audio_inputs(config, features, mask, num_tokens=20)


def test_bad_inputs_name_the_field():
  config = AudioConfig(**_tiny_audio_config(8))
  features, mask = _clips([10, 0], 20)
  with pytest.raises(ValueError, match='audio clip 1 has no valid frames'):
    audio.audio_inputs(config, features, mask)
  with pytest.raises(ValueError, match='input_features'):
    audio.audio_inputs(config, features[:, :4], mask)
  with pytest.raises(ValueError, match='feature_attention_mask'):
    audio.audio_inputs(config, features, mask[:, :5])


def test_token_count_matches_reference():
  model, config, _ = _hf_thinker(8)
  lengths = np.arange(1, 1000)
  _, reference = model.model.audio_tower._get_feat_extract_output_lengths(torch.from_numpy(lengths))
  np.testing.assert_array_equal(audio.audio_token_count(lengths), reference.numpy())
  assert [audio.audio_token_count(n) for n in (1, 2, 3, 235, 30000)] == [0, 0, 1, 59, 7500]
  # and the host function emits exactly that many tokens per clip, in clip order
  features, mask = _clips([17, 1, 64], 64)
  inputs = audio.audio_inputs(config, features, mask)
  assert inputs['token_mask'].sum() == 4 + 0 + 16


def test_sinusoids_match_reference_table():
  for width in (32, 1280):
    reference = SinusoidsPositionEmbedding(1500, width).positional_embedding.numpy()
    np.testing.assert_allclose(audio.sinusoids(100, width), reference[:100], rtol=0, atol=1e-5)


def test_checkpoint_rules_cover_every_tensor_and_param():
  model, config, params = _hf_thinker(8)
  state = model.model.audio_tower.state_dict()
  assert 'positional_embedding.positional_embedding' not in state      # a non-persistent buffer
  for name in state:
    convert.match_rule(audio.CHECKPOINT_RULES, name)                     # KeyError if unmapped
  abstract = _abstract_params(config)
  assert jax.tree.structure(params) == jax.tree.structure(abstract)
  assert sum(v.size for v in jax.tree.leaves(params)) == sum(v.numel() for v in state.values())
  np.testing.assert_array_equal(params['audio_bos_eos_token'],
                                state['audio_bos_eos_token.weight'].numpy())
  np.testing.assert_array_equal(params['layers']['self_attn']['q_proj']['kernel'][1],
                                state['layers.1.self_attn.q_proj.weight'].numpy().T)


def test_params_carry_audio_axis_names():
  config = AudioConfig(**_tiny_audio_config(8))
  module = audio.AudioEncoder(config)
  boxed = jax.eval_shape(module.init, jax.random.key(0), chunks=jnp.zeros((1, MEL, 16)),
                         chunk_lengths=jnp.ones((1,), jnp.int32),
                         pool_index=jnp.zeros((1, 2), jnp.int32))
  specs = jax.tree.map(tuple, nn.get_partition_spec(boxed)['params'],
                       is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  q_kernel = specs['layers']['self_attn']['q_proj']['kernel']
  assert q_kernel == ('layers', 'audio_embed', 'audio_heads')
  assert specs['layers']['fc1']['kernel'] == ('layers', 'audio_embed', 'audio_mlp')
  assert specs['layers']['final_layer_norm']['scale'] == ('layers', 'norm')
  assert specs['conv2']['kernel'] == (None, None, 'audio_embed')
  assert specs['proj']['kernel'] == ('audio_embed', 'embed')
  assert specs['audio_bos_eos_token'] == (None, 'embed')


def test_bf16_forward_runs_close_to_fp32():
  _, config, params = _hf_thinker(8)
  features, mask = _clips([235, 40], 240)
  inputs = audio.audio_inputs(config, features, mask)
  fp32 = _ours(config, params, inputs)
  bf16 = _ours(config, params, inputs, dtype=jnp.bfloat16)
  assert np.isfinite(bf16).all()
  assert np.abs(bf16 - fp32).max() < 0.05 * np.abs(fp32).max()


def test_remat_changes_neither_outputs_nor_gradients():
  _, config, params = _hf_thinker(8)
  features, mask = _clips([70, 20], 80)
  inputs = {k: v for k, v in audio.audio_inputs(config, features, mask).items()
            if k != 'token_mask'}

  def loss(p, remat):
    out = audio.AudioEncoder(config, remat=remat).apply({'params': p}, **inputs)
    return jnp.sum(out ** 2)

  value, grads = jax.value_and_grad(loss)(params, 'none')
  value_full, grads_full = jax.value_and_grad(loss)(params, 'full')
  np.testing.assert_allclose(value_full, value, rtol=1e-6)
  for g, g_full in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_full)):
    np.testing.assert_allclose(g_full, g, rtol=1e-5, atol=1e-6)
