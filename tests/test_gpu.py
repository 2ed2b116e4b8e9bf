"""Checks that need an NVIDIA GPU (skipped elsewhere; the README says how they were run).

cuDNN flash attention in the decoder (`ThinkerConfig.attention='cudnn'`) against the XLA
path with its explicit mask, forward and gradients, in bf16 on right-padded rows.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saber_jax import losses
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
