"""The vision tower against transformers' Qwen2.5-Omni `model.visual` (fp32 eager, tiny
perturbed weights), and the host tables against transformers' vision_utils."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration
from transformers import vision_utils

from saber_jax import convert
from saber_jax.models import vision
from saber_jax.models.config import VisionConfig

# window_size 8 px / merge 2 / patch 2 -> windows of 2x2 merge units; 3 blocks with the
# full-attention one in the middle, so both layouts run and the layer counter matters.
HF_VISION = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, in_channels=3,
                 patch_size=2, temporal_patch_size=2, spatial_merge_size=2, window_size=8,
                 fullatt_block_indexes=[1], out_hidden_size=64)
CONFIG = VisionConfig(**{**HF_VISION, 'fullatt_block_indexes': (1,)})
ROW = 3 * 2 * 2 * 2                    # in_channels * tp * p * p
TOL = 1e-5


@pytest.fixture(scope='module')
def hf_model():
  torch.manual_seed(0)
  cfg = Qwen2_5OmniThinkerConfig(
      audio_config=dict(d_model=16, encoder_layers=1, encoder_attention_heads=2,
                        encoder_ffn_dim=32, num_mel_bins=16, n_window=8, output_dim=64),
      vision_config=HF_VISION,
      text_config=dict(vocab_size=99, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2,
                       rope_parameters=dict(rope_type='default', rope_theta=1e6,
                                            mrope_section=[2, 3, 3])))
  cfg._attn_implementation = 'eager'
  model = Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval()
  with torch.no_grad():               # init has zero biases and unit norms: perturb everything
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model


def _state_dict(model):
  return [(k, v.numpy()) for k, v in model.model.visual.state_dict().items()]


def _abstract_params(module, num_patches=16):
  tables = vision.vision_inputs(CONFIG, np.array([[1, 4, 4]]), num_patches=num_patches)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((num_patches, ROW)), **tables)
  return nn.unbox(shapes['params'])


@pytest.fixture(scope='module')
def params(hf_model):
  return convert.params_from_state_dict(vision.CHECKPOINT_RULES, _state_dict(hf_model),
                                        _abstract_params(vision.VisionEncoder(CONFIG)))


def _pixels(grid, seed):
  n = int(np.prod(grid, axis=-1).sum())
  return np.random.default_rng(seed).standard_normal((n, ROW)).astype(np.float32)


def _ours(params, pixels, grid, module=None, **sizes):
  module = module or vision.VisionEncoder(CONFIG)
  tables = vision.vision_inputs(CONFIG, np.array(grid, np.int64).reshape(-1, 3), **sizes)
  pad = tables['patch_mask'].size - len(pixels)
  pixels = np.concatenate([pixels, np.zeros((pad, ROW), np.float32)])
  return np.asarray(jax.jit(module.apply)({'params': params}, pixels, **tables))


def _hf_features(model, pixels, grid, kind):
  get = model.get_image_features if kind == 'image' else model.get_video_features
  with torch.no_grad():
    out = get(torch.from_numpy(pixels), torch.tensor(grid)).pooler_output
  return [o.numpy() for o in out]


def test_token_count_is_thw_over_merge_squared():
  np.testing.assert_array_equal(vision.vision_token_count([[1, 4, 4], [3, 6, 10]]), [4, 45])


@pytest.mark.parametrize('grid', [[[1, 4, 4]], [[3, 6, 6]], [[2, 6, 10], [1, 8, 4], [2, 4, 12]]])
def test_host_tables_mirror_transformers_vision_utils(grid):
  """Window permutation, rope coordinates and both block layouts equal the reference's
  window_index, position_ids and cu_seqlens / cu_window_seqlens."""
  m = CONFIG.spatial_merge_size
  grid_t = torch.tensor(grid)
  ref_index, ref_cu_windows = vision_utils.get_vision_window_index(
      grid_t, spatial_merge_size=m, window_size=CONFIG.window_size, patch_size=CONFIG.patch_size)
  ref_positions = vision_utils.get_vision_position_ids(grid_t, m).numpy()
  ref_cu_frames = vision_utils.get_vision_cu_seqlens(grid_t).numpy()
  tables = vision.vision_inputs(CONFIG, np.array(grid))

  np.testing.assert_array_equal(tables['window_index'][::m * m] // (m * m), ref_index.numpy())
  np.testing.assert_array_equal(tables['reverse_index'], np.argsort(ref_index.numpy()))
  np.testing.assert_array_equal(tables['rope_positions'], ref_positions[tables['window_index']])
  for kind, cu in (('window', ref_cu_windows.numpy()), ('frame', ref_cu_frames)):
    blocks, mask = tables[f'{kind}_blocks'], tables[f'{kind}_block_mask']
    np.testing.assert_array_equal(mask.sum(-1), np.diff(cu))
    np.testing.assert_array_equal(blocks[mask], np.arange(cu[-1]))
    flat = np.flatnonzero(mask)
    np.testing.assert_array_equal(tables[f'{kind}_slots'], flat)


def test_image_matches_transformers(hf_model, params):
  grid = [[1, 4, 4]]
  pixels = _pixels(grid, 0)
  (ref,) = _hf_features(hf_model, pixels, grid, 'image')
  ours = _ours(params, pixels, grid)
  assert ours.shape == ref.shape == (4, 64)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)


@pytest.mark.parametrize('grid', [[[3, 6, 6]], [[2, 6, 10]]], ids=['3x3_units', '3x5_units'])
def test_video_with_uneven_windows_matches_transformers(hf_model, params, grid):
  """Several frames, a merged grid larger than the window and not a multiple of it (edge
  windows of 2x1, 1x2, 1x1 units), square and non-square."""
  pixels = _pixels(grid, 1)
  (ref,) = _hf_features(hf_model, pixels, grid, 'video')
  ours = _ours(params, pixels, grid)
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)


def test_several_items_at_once_match_transformers(hf_model, params):
  """Images and videos of different sizes in one call equal the reference on the same
  packed call, and each item run on its own (items do not see each other)."""
  grid = [[1, 4, 4], [3, 6, 6], [1, 8, 12], [2, 6, 10]]
  kinds = ['image', 'video', 'image', 'video']
  pixels = _pixels(grid, 2)
  ours = _ours(params, pixels, grid)
  with torch.no_grad():
    packed = hf_model.model.visual(torch.from_numpy(pixels), grid_thw=torch.tensor(grid))
  np.testing.assert_allclose(ours, packed.pooler_output.numpy(), rtol=0, atol=TOL)

  rows = np.cumsum([0] + [int(np.prod(g)) for g in grid])
  alone = [_hf_features(hf_model, pixels[rows[i]:rows[i + 1]], [g], kind)[0]
           for i, (g, kind) in enumerate(zip(grid, kinds))]
  np.testing.assert_allclose(ours, np.concatenate(alone), rtol=0, atol=TOL)


def test_padded_bucket_gives_identical_valid_outputs(params):
  """One executable compiled for a bucket serves two different grids; valid rows equal the
  unpadded run, padded rows are zero, whatever the padded pixel rows hold."""
  module = vision.VisionEncoder(CONFIG)
  sizes = dict(num_patches=256, num_windows=24, window_len=20, num_frames=8, frame_len=64)
  apply = jax.jit(module.apply)
  compiled = None
  for grid, seed in (([[1, 4, 4], [3, 6, 6]], 3), ([[2, 6, 10], [1, 4, 8]], 4)):
    pixels = _pixels(grid, seed)
    tables = vision.vision_inputs(CONFIG, np.array(grid), **sizes)
    garbage = np.random.default_rng(seed).standard_normal((256 - len(pixels), ROW)) * 1e3
    padded = np.concatenate([pixels, garbage.astype(np.float32)])
    if compiled is None:
      compiled = apply.lower({'params': params}, padded, **tables).compile()
    out = np.asarray(compiled({'params': params}, padded, **tables))
    valid = int(vision.vision_token_count(grid).sum())
    assert out.shape == (64, 64)
    np.testing.assert_allclose(out[:valid], _ours(params, pixels, grid), rtol=0, atol=1e-6)
    assert not out[valid:].any()


def test_bucket_with_no_items_gives_zeros(params):
  """A batch without images or videos still runs at a fixed bucket size: all rows padding."""
  tables = vision.vision_inputs(CONFIG, np.zeros((0, 3), np.int64), num_patches=16)
  out = _ours(params, np.zeros((0, ROW), np.float32), [], num_patches=16)
  assert out.shape == (4, 64) and not out.any()
  assert not tables['patch_mask'].any() and not tables['token_mask'].any()


def test_gradients_through_padded_bucket_are_finite(params):
  module = vision.VisionEncoder(CONFIG, remat='full')
  grid = [[2, 6, 10]]
  tables = vision.vision_inputs(CONFIG, np.array(grid), num_patches=160, num_windows=16,
                                num_frames=4)
  pixels = np.concatenate([_pixels(grid, 5), np.full((40, ROW), 1e4, np.float32)])
  loss = lambda p: jnp.sum(module.apply({'params': p}, pixels, **tables) ** 2)
  grads = jax.jit(jax.grad(loss))(params)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_sizes_too_small_or_bad_grids_raise():
  grid = np.array([[3, 6, 6]])               # 108 patches, 12 windows (longest 16), 3 frames of 36
  with pytest.raises(ValueError, match='num_patches'):
    vision.vision_inputs(CONFIG, grid, num_patches=100)
  with pytest.raises(ValueError, match='num_patches'):
    vision.vision_inputs(CONFIG, grid, num_patches=110)    # not a multiple of m^2
  with pytest.raises(ValueError, match='num_windows'):
    vision.vision_inputs(CONFIG, grid, num_windows=11)
  with pytest.raises(ValueError, match='window_len'):
    vision.vision_inputs(CONFIG, grid, window_len=15)
  with pytest.raises(ValueError, match='num_frames'):
    vision.vision_inputs(CONFIG, grid, num_frames=2)
  with pytest.raises(ValueError, match='frame_len'):
    vision.vision_inputs(CONFIG, grid, frame_len=35)
  with pytest.raises(ValueError, match=r'grid_thw\[1\]'):
    vision.vision_inputs(CONFIG, np.array([[1, 4, 4], [1, 5, 4]]))
  with pytest.raises(ValueError, match='integer array'):
    vision.vision_inputs(CONFIG, np.array([1, 4, 4]))


def test_checkpoint_rules_cover_every_tensor_and_param(hf_model):
  """Each HF tensor maps to a param (with the right shape) and every param is filled;
  params_from_state_dict raises on either gap."""
  module = vision.VisionEncoder(CONFIG)
  abstract = _abstract_params(module)
  state = _state_dict(hf_model)
  params = convert.params_from_state_dict(vision.CHECKPOINT_RULES, state, abstract)
  # One stacked param per kind of block tensor: 22 kinds of tensor, 22 params.
  kinds = {re.sub(r'^blocks\.\d+\.', 'blocks.', name) for name, _ in state}
  assert len(jax.tree.leaves(params)) == len(jax.tree.leaves(abstract)) == len(kinds) == 22
  conv = dict(state)['patch_embed.proj.weight']
  np.testing.assert_array_equal(params['patch_embed']['kernel'], conv.transpose(2, 3, 4, 1, 0))
  with pytest.raises(KeyError, match='missing'):
    convert.params_from_state_dict(vision.CHECKPOINT_RULES,
                                   [(k, v) for k, v in state if 'merger.mlp.2.bias' not in k],
                                   abstract)


def test_params_carry_logical_axes():
  module = vision.VisionEncoder(CONFIG)
  tables = vision.vision_inputs(CONFIG, np.array([[1, 4, 4]]))
  boxed = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((16, ROW)), **tables)['params']
  specs = nn.get_partition_spec(boxed)
  assert tuple(specs['blocks']['attn']['q']['kernel']) == ('layers', 'vision_embed', 'vision_heads')
  assert tuple(specs['blocks']['mlp']['down_proj']['kernel']) == ('layers', 'vision_mlp',
                                                                    'vision_embed')
  assert tuple(specs['blocks']['norm1']['scale']) == ('layers', 'norm')
  assert tuple(specs['merger']['mlp_2']['kernel']) == ('vision_merge', 'embed')
  assert tuple(specs['patch_embed']['kernel']) == (None, None, None, None, 'vision_embed')


def test_bf16_forward_is_close_to_fp32(params):
  grid = [[1, 4, 4], [3, 6, 6]]
  pixels = _pixels(grid, 6)
  fp32 = _ours(params, pixels, grid)
  bf16 = _ours(params, pixels, grid, vision.VisionEncoder(CONFIG, dtype=jnp.bfloat16))
  assert bf16.dtype == jnp.bfloat16
  bf16 = bf16.astype(np.float32)
  assert np.isfinite(bf16).all()
  assert np.abs(bf16 - fp32).max() <= 0.05 * np.abs(fp32).max()
