"""The FLOP count of saber_jax.train.flops: a hand count on the tiny thinker (from the real param
shapes and the batch's own tokens, chunks, windows and frames) and XLA's own count of the
compiled decoder forward and training step."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import tiny_hf_config
from saber_jax import losses
from saber_jax.train import flops
from saber_jax.models import ThinkerConfig, init_params, text
from saber_jax.models.config import TextConfig
from saber_jax.models.text import TextModel
from saber_jax.models.thinker import model_inputs
from train_batches import ROWS, SIZES, _concat, _labels, make_batch


@pytest.fixture(scope='module')
def config():
  return ThinkerConfig.from_hf(tiny_hf_config().to_dict())


def _batch(config, **sizes):
  """train_batches.ROWS as one shard: 3 + 27 + 8, 19, 24 and 12 valid tokens, the last 6 of
  each row trained; a 60- and a 40-frame audio clip; a (2, 4, 4) video and a (1, 4, 4) image."""
  raw = _concat([make_batch([r], padding_side='right', use_audio_in_video=True, seed=i,
                            length=48, frames=80) for i, r in enumerate(ROWS)])
  labels, segments = _labels(raw)
  return dict(model_inputs(config, raw, **sizes), labels=labels, segments=segments)


def _kernel_macs(tree) -> int:
  """Multiply-adds per input row of every dense kernel in a (stacked) param tree."""
  return sum(leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
             if str(path[-1].key) == 'kernel')


def test_counts_ignore_padding_and_match_the_rows(config):
  padded = flops.batch_counts(config, _batch(config, **SIZES))
  exact = flops.batch_counts(config, _batch(config))
  for counts in (padded, exact):
    np.testing.assert_array_equal(counts.text_lengths, [38, 19, 24, 12])
    assert counts.head_positions == 4 * 6
    # n_window 8: chunks of 16 frames; 60 -> 16,16,16,12 and 40 -> 16,16,8.
    np.testing.assert_array_equal(np.sort(counts.audio_chunk_frames[counts.audio_chunk_frames > 0]),
                                  [8, 12, 16, 16, 16, 16, 16])
    assert counts.audio_tokens == 15 + 10
    # window_size 8 / (merge 2 * patch 2) = 2 x 2 merge units = 16 patches, one per frame.
    assert counts.vision_patches == 32 + 16
    np.testing.assert_array_equal(counts.window_patches, [16, 16, 16])
    np.testing.assert_array_equal(counts.frame_patches, [16, 16, 16])


def test_forward_flops_equal_a_hand_count_from_the_param_shapes(config):
  params = nn.unbox(init_params(config, jax.random.key(0)))
  got = flops.forward_flops(config, flops.batch_counts(config, _batch(config, **SIZES)))
  text, audio, vision = params['text'], params['audio'], params['vision']
  t, a, v = config.text, config.audio, config.vision

  tokens = 38 + 19 + 24 + 12
  causal_pairs = sum(n * (n + 1) // 2 for n in (38, 19, 24, 12))
  assert got['text']['dense'] == 2 * _kernel_macs(text['layers']) * tokens
  assert got['text']['attention'] == 4 * t.hidden_size * causal_pairs * t.num_hidden_layers
  assert got['text']['head'] == 2 * text['lm_head']['kernel'].size * 24

  frames = np.array([16, 16, 16, 12, 16, 16, 8])
  post_conv = (frames + 1) // 2
  assert got['audio']['conv1'] == 2 * audio['conv1']['kernel'].size * frames.sum()
  assert got['audio']['conv2'] == 2 * audio['conv2']['kernel'].size * post_conv.sum()
  assert got['audio']['layers'] == 2 * _kernel_macs(audio['layers']) * post_conv.sum()
  assert got['audio']['attention'] == 4 * a.d_model * np.sum(post_conv ** 2) * a.encoder_layers
  assert got['audio']['proj'] == 2 * audio['proj']['kernel'].size * 25

  patches = 48
  assert got['vision']['patch_embed'] == 2 * vision['patch_embed']['kernel'].size * patches
  assert got['vision']['layers'] == 2 * _kernel_macs(vision['blocks']) * patches
  # One windowed and one per-frame layer (fullatt_block_indexes [1]), 16-patch blocks each.
  assert v.depth == 2 and v.fullatt_block_indexes == (1,)
  assert got['vision']['attention'] == 4 * v.hidden_size * (3 * 16 ** 2 + 3 * 16 ** 2)
  assert got['vision']['merger'] == 2 * _kernel_macs(vision['merger']) * patches // 4


def test_shared_pair_rows_count_only_the_pairs_the_segment_mask_keeps():
  # [prompt 5 | chosen 4 | rejected 3 | padding 2], a two-row pair, and a padded row.
  pair_segments = np.array([[1] * 5 + [2] * 4 + [3] * 3 + [0] * 2,
                            [1] * 5 + [2] * 4 + [0] * 5,
                            [1] + [0] * 13], np.int32)
  mask = (pair_segments > 0).astype(np.int32)
  batch = dict(input_ids=np.zeros_like(mask), attention_mask=mask, pair_segments=pair_segments)
  seen = np.asarray(text.segment_mask(jnp.asarray(pair_segments)))[:, 0]    # [B, query, key]
  kept = int(seen[mask.astype(bool)].sum())             # padding queries are not work
  t = TextConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=1)
  got = flops.decoder_forward_flops(t, mask.sum(1), 0,
                                    flops.batch_counts(ThinkerConfig(text=t), batch).masked_pairs)
  assert kept == 12 * 13 // 2 - 4 * 3 + 9 * 10 // 2 + 1
  assert got['attention'] == 4 * 8 * kept * t.num_hidden_layers


def test_training_is_three_forwards_except_frozen_parts_and_first_layers(config):
  counts = flops.batch_counts(config, _batch(config))
  fwd = flops.forward_flops(config, counts)
  text, towers = sum(fwd['text'].values()), sum(fwd['audio'].values()) + sum(fwd['vision'].values())
  first_layers = fwd['audio']['conv1'] + fwd['vision']['patch_embed']
  full = flops.total(flops.training_flops(config, counts, 'full'))
  np.testing.assert_allclose(full, 3 * (text + towers) - first_layers, rtol=1e-12)
  np.testing.assert_allclose(flops.total(flops.training_flops(config, counts, 'llm')),
                             3 * text + towers, rtol=1e-12)
  np.testing.assert_allclose(flops.total(flops.training_flops(config, counts, 'lora')),
                             2 * text + towers, rtol=1e-12)
  assert flops.step_flops(config, _batch(config)) == full
  with pytest.raises(ValueError, match='trainable'):
    flops.training_flops(config, counts, 'everything')


# XLA counts every op (elementwise too), so its total sits slightly above the matmul count;
# widths of a few hundred keep that under 1%. A decoder of one layer, because XLA's cost
# analysis counts a while loop's body once, not once per iteration.
TEXT = TextConfig(vocab_size=2000, hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
                  num_attention_heads=8, num_key_value_heads=2, mrope_section=(8, 12, 12))
ROWS_, LENGTH = 2, 128


def _xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)['flops']


def _decoder_loss(remat: str):
  model = TextModel(TEXT, remat=remat)
  ids = jnp.zeros((ROWS_, LENGTH), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(LENGTH), (3, ROWS_, LENGTH))
  mask = jnp.ones((ROWS_, LENGTH), bool)

  def hidden(params):
    return model.apply({'params': params}, model.apply({'params': params}, ids,
                                                       method=TextModel.embed), positions, mask)
  params = nn.unbox(model.init(jax.random.key(0), ids, method=lambda m, i: m.logits(
      m(m.embed(i), positions, mask))))['params']
  return hidden, params


def _square_attention(terms):
  """XLA computes the whole masked score matrix: L^2 pairs per row, not L(L+1)/2."""
  return terms['attention'] * LENGTH ** 2 / (LENGTH * (LENGTH + 1) / 2)


def test_decoder_forward_matches_xla_cost_analysis():
  hidden, params = _decoder_loss('none')
  xla = _xla_flops(lambda p: hidden(p) @ p['lm_head']['kernel'], params)
  fwd = flops.decoder_forward_flops(TEXT, [LENGTH] * ROWS_, ROWS_ * LENGTH)
  ours = fwd['dense'] + _square_attention(fwd) + fwd['head']
  np.testing.assert_allclose(xla, ours, rtol=0.01)


@pytest.mark.parametrize('stage', ['sft', 'dpo'])
@pytest.mark.parametrize('remat', ['none', 'dots', 'full'])
def test_training_hardware_flops_match_xla_cost_analysis(remat, stage):
  hidden, params = _decoder_loss(remat)
  labels = np.full((ROWS_, LENGTH), -100, np.int32)
  labels[:, LENGTH - 40:] = 7

  # One loss chunk: XLA would count a loop over several chunks only once.
  def loss(p):
    h, w = hidden(p), p['lm_head']['kernel']
    if stage == 'sft':     # head gradients formed in the forward pass: 3 head passes
      return losses.sed_loss_from_hidden(h, w, labels, np.zeros_like(labels),
                                         chunk_size=LENGTH)[0]
    # The DPO loss: its backward would recompute the logits, but in one chunk XLA reuses
    # the forward's (3 passes).
    return jnp.sum(losses.token_logps_from_hidden(h, w, labels, chunk_size=LENGTH), axis=-1).sum()
  xla = _xla_flops(jax.value_and_grad(loss), params)
  config = ThinkerConfig(text=TEXT, remat=remat)
  batch = dict(input_ids=np.zeros((ROWS_, LENGTH)), labels=labels)
  if stage == 'dpo':
    batch['ref_chosen_logps'] = np.zeros(ROWS_ // 2)
  counts = flops.batch_counts(config, batch, chunk_size=LENGTH)
  train = flops.training_flops(config, counts, 'llm', hardware=True)['text']
  np.testing.assert_allclose(xla, train['dense'] + _square_attention(train) + train['head'],
                             rtol=0.01)


def test_hardware_head_counts_whole_chunks_of_targets_moved_to_the_front():
  labels = np.full((2, 10), -100)
  labels[0, 1:] = 1         # 9 scored positions: 3 chunks of 4
  labels[1, [4, 9]] = 1     # 2 scored positions
  batch = dict(input_ids=np.zeros((2, 10)), labels=labels)
  sft = flops.batch_counts(ThinkerConfig.tiny(), batch, chunk_size=4)
  assert sft.head_positions == 11
  assert sft.head_chunk_positions == 2 * 12         # the last chunk padded to 4
  dpo = flops.batch_counts(ThinkerConfig.tiny(), dict(batch, ref_chosen_logps=np.zeros(1)),
                           chunk_size=4)
  assert dpo.head_chunk_positions == 2 * 10 and dpo.recompute_head   # a tail of 2
  one_chunk = flops.batch_counts(ThinkerConfig.tiny(), dict(batch, ref_chosen_logps=np.zeros(1)),
                                 chunk_size=10)
  assert not one_chunk.recompute_head


def test_mfu_and_known_peaks():
  assert flops.mfu(50e12, 100e12) == 0.5
  with pytest.raises(ValueError):
    flops.mfu(1.0, 0.0)
  fake = lambda kind: dataclasses.make_dataclass('Device', [('device_kind', str)])(kind)
  assert flops.peak_flops(fake('NVIDIA H100 80GB HBM3')) == 989e12
  assert flops.peak_flops(fake('NVIDIA A100-SXM4-80GB')) == 312e12
  assert flops.peak_flops(fake('TPU v5 lite')) == 197e12
  assert flops.peak_flops(fake('cpu')) is None


# The loss paths the hardware count describes (saber_jax.losses): scored positions moved to
# the front of each row, whole chunks, skipped chunks, a padded last chunk. Whatever the
# layout, values and gradients must equal those of the plain full-logits loss.
def _awkward_batch():
  rng = np.random.default_rng(3)
  hidden = rng.standard_normal((3, 13, 8)).astype(np.float32)
  head = (rng.standard_normal((8, 50)) * 0.5).astype(np.float32)
  labels = np.full((3, 13), -100, np.int32)
  labels[0, 1:6] = rng.integers(0, 50, 5)     # position 0 scored: padding reads position 0
  labels[1, 8:] = rng.integers(0, 50, 5)      # response at the end
  labels[2, [3, 7, 12]] = rng.integers(0, 50, 3)
  segments = np.where(labels == -100, 0, 2).astype(np.int32)
  return hidden, head, labels, segments


@pytest.mark.parametrize('chunk_size', [1, 4, 5, 13, 64])
def test_chunked_losses_equal_full_logits_values_and_gradients(chunk_size):
  hidden, head, labels, segments = _awkward_batch()
  pairs = [
      (lambda h, w: losses.sed_loss_from_hidden(h, w, labels, segments, chunk_size=chunk_size)[0],
       lambda h, w: losses.sed_loss(h @ w, labels, segments, chunk_size=64)[0]),
      (lambda h, w: jnp.sum(jnp.sum(losses.token_logps_from_hidden(
          h, w, labels, chunk_size=chunk_size), axis=-1) * jnp.array([1.0, -2.0, 0.5])),
       lambda h, w: jnp.sum(losses.sequence_logps(h @ w, labels, chunk_size=64)
                            * jnp.array([1.0, -2.0, 0.5]))),
  ]
  for chunked, full in pairs:
    (value, grads), (want, want_grads) = (jax.value_and_grad(f, argnums=(0, 1))(hidden, head)
                                          for f in (chunked, full))
    np.testing.assert_allclose(value, want, rtol=1e-5)
    for got, expected in zip(grads, want_grads):
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
