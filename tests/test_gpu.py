"""Checks that need an NVIDIA GPU (skipped elsewhere; the README says how they were run).

cuDNN flash attention in the decoder (`ThinkerConfig.attention='cudnn'`) against the XLA
path with its explicit mask, forward and gradients, in bf16 on right-padded rows and on
shared-prompt pair rows (two gathered causal rows per pair, `text.PairRows`).
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saber_jax import losses
from saber_jax.models import layers, text
from saber_jax.models.config import ThinkerConfig
from saber_jax.models.thinker import Thinker, init_params, model_inputs

pytestmark = pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs an NVIDIA GPU')


def _relative_error(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_cudnn_decoder_attention_matches_xla():
  config = ThinkerConfig.tiny(dtype='bfloat16')
  params = jax.jit(lambda key: nn.unbox(init_params(config, key)))(jax.random.key(0))
  lengths = np.array([64, 37])
  input_ids = np.random.default_rng(0).integers(1000, 150000, (2, 64))
  valid = np.arange(64) < lengths[:, None]
  inputs = model_inputs(config, dict(input_ids=input_ids, attention_mask=valid))
  labels = np.where(valid & (np.arange(64) >= 20), input_ids, -100).astype(np.int32)

  def loss_and_hidden(attention, params):
    model_config = dataclasses.replace(config, attention=attention)
    hidden = Thinker(model_config).apply({'params': params}, inputs)
    head = params['text']['embed_tokens']['embedding'].T.astype(hidden.dtype)
    return jnp.sum(losses.token_logps_from_hidden(hidden, head, labels), axis=-1).sum(), hidden

  results = {}
  for attention in ('xla', 'cudnn'):
    fn = jax.jit(jax.value_and_grad(functools.partial(loss_and_hidden, attention), has_aux=True))
    if attention == 'cudnn':             # the fused cuDNN kernel is really in the program
      assert 'cudnn' in fn.lower(params).compile().as_text().lower()
    results[attention] = fn(params)
  (loss_x, hidden_x), grads_x = results['xla']
  (loss_c, hidden_c), grads_c = results['cudnn']
  assert _relative_error(np.asarray(hidden_c, np.float32)[valid],
                         np.asarray(hidden_x, np.float32)[valid]) < 2e-2
  assert abs(float(loss_c) - float(loss_x)) < 2e-2 * abs(float(loss_x))
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(g, np.float32))
                                      for g in jax.tree_util.tree_leaves(tree)])
  assert _relative_error(flat(grads_c), flat(grads_x)) < 3e-2


def test_cudnn_pair_rows_match_the_masked_pair_attention():
  """`[prompt | chosen | rejected]` rows (unequal answers, a padding pair; GQA) on cuDNN's
  kernel in bf16 against the XLA path's segment mask in fp32, forward and q/k/v gradients;
  the compiled program calls cuDNN and holds no [.., L, L] array."""
  rng = np.random.default_rng(3)
  length, heads, kv_heads, head_dim = 256, 8, 2, 128
  segments = np.zeros((3, length), np.int32)
  segments[0, :100], segments[0, 100:140], segments[0, 140:230] = 1, 2, 3
  segments[1, :60], segments[1, 60:200], segments[1, 200:210] = 1, 2, 3
  segments[2, :1] = 1
  valid = segments > 0
  q = jnp.asarray(rng.normal(size=(3, length, heads, head_dim)), jnp.bfloat16)
  k, v = (jnp.asarray(rng.normal(size=(3, length, kv_heads, head_dim)), jnp.bfloat16)
          for _ in range(2))
  weight = jnp.asarray(rng.normal(size=q.shape) * valid[..., None, None], jnp.float32)
  mask = text.segment_mask(jnp.asarray(segments))
  rows = text.pair_rows(jnp.asarray(segments), 'cudnn')

  def loss(attend, q, k, v):
    out = attend(q, k, v).astype(jnp.float32)
    return jnp.sum(out * weight), out

  as32 = lambda *xs: [x.astype(jnp.float32) for x in xs]
  want_grads, want = jax.jit(jax.grad(
      lambda q, k, v: loss(lambda *a: layers.attention(*as32(*a), mask), q, k, v),
      argnums=(0, 1, 2), has_aux=True))(q, k, v)
  fn = jax.jit(jax.grad(
      lambda q, k, v: loss(lambda *a: text.pair_row_attention(*a, rows, 'cudnn'), q, k, v),
      argnums=(0, 1, 2), has_aux=True))
  hlo = fn.lower(q, k, v).compile().as_text()
  assert 'cudnn' in hlo.lower() and f'{length},{length}]' not in hlo
  got_grads, got = fn(q, k, v)
  assert bool(jnp.all(jnp.isfinite(got)))
  assert _relative_error(np.asarray(got)[valid], np.asarray(want)[valid]) < 2e-2
  for g, w in zip(got_grads, want_grads):
    assert _relative_error(g, w) < 3e-2
