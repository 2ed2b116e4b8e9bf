"""The step functions: sharding-invariant loss and gradients, trainable subsets, CA-DPO,
non-finite handling."""

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from hf_reference import tiny_hf_config
from saber_jax import sharding
from saber_jax.models import ThinkerConfig, abstract_params, init_params
from saber_jax.train import optim, steps
from train_batches import ROWS, sft_batch


@pytest.fixture(scope='module')
def model_config():
  return ThinkerConfig.from_hf(tiny_hf_config().to_dict())


@pytest.fixture(scope='module')
def params(model_config):
  return nn.unbox(init_params(model_config, jax.random.key(0)))


def _loss_and_grads(model_config, params, batch):
  loss_fn = lambda p, b: steps.sft_loss(p, {}, b, model_config=model_config)[0]
  return jax.jit(jax.value_and_grad(loss_fn))(params, batch)


@pytest.mark.parametrize('mesh_shape', [(8, 1, 1), (1, 8, 1), (2, 2, 2)])
def test_loss_and_gradients_equal_on_every_mesh(model_config, params, mesh_shape):
  # 8 rows; each data shard (rows that share a device along data x fsdp) brings its own media.
  rows = [r for r in ROWS for _ in range(2)]
  want_loss, want_grads = _loss_and_grads(model_config, params,
                                          sft_batch(model_config, 1, rows=rows))
  mesh = sharding.make_mesh(mesh_shape)
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  placed = jax.device_put(params, sharding.tree_shardings(abstract_params(model_config), mesh))
  batch = sharding.global_batch(sft_batch(model_config, shards, rows=rows), mesh)
  assert batch['input_ids'].sharding.spec[0] in (('data', 'fsdp'), 'data', 'fsdp')
  loss, grads = _loss_and_grads(model_config, placed, batch)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _optim_config(**overrides):
  return ml_collections.ConfigDict({**dict(lr=3e-3, total_steps=20, warmup_steps=0,
                                           weight_decay=0.0, grad_clip_norm=1.0), **overrides})


@pytest.mark.parametrize('mode', ['full', 'llm', 'lora'])
def test_sft_steps_lower_the_loss_and_touch_only_trainable_params(model_config, params, mode):
  from saber_jax.train import lora
  lora_config = ml_collections.ConfigDict(dict(rank=4, alpha=8.0))
  lora_params = (lora.init_lora(jax.random.key(1), params, rank=4) if mode == 'lora' else None)
  trainable, frozen = steps.split_params(params, mode, lora_params)
  optimizer = optim.make_optimizer(_optim_config())
  state = steps.init_state(trainable, frozen, optimizer)
  loss_fn = lambda t, f, b: steps.sft_loss(t, f, b, model_config=model_config,
                                          lora_config=lora_config)
  step = jax.jit(lambda s, b: steps.train_step(s, b, loss_fn=loss_fn, optimizer=optimizer,
                                               skip_nonfinite=False))
  batch = sft_batch(model_config, 1)
  losses = []
  for _ in range(5):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert losses[-1] < losses[0] - 0.1
  final = steps.join_params(state.trainable, state.frozen, lora_config)
  for tower in ('audio', 'vision', 'text'):
    changed = any(not np.array_equal(a, b) for a, b in
                  zip(jax.tree.leaves(final[tower]), jax.tree.leaves(params[tower])))
    assert changed == (mode == 'full' or tower == 'text'), tower
  if mode == 'lora':   # the base stays as it was; only the merged view moves
    for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(params)):
      np.testing.assert_array_equal(a, b)


def test_nonfinite_step_is_skipped_when_asked(model_config, params):
  optimizer = optim.make_optimizer(_optim_config())
  state = steps.init_state(params, {}, optimizer)
  batch = sft_batch(model_config, 1)
  batch['audio']['chunks'] = np.full_like(batch['audio']['chunks'], np.nan)
  loss_fn = lambda t, f, b: steps.sft_loss(t, f, b, model_config=model_config)
  new, metrics = steps.train_step(state, batch, loss_fn=loss_fn, optimizer=optimizer,
                                  skip_nonfinite=True)
  assert not bool(metrics['finite'])
  assert int(new.step) == int(state.step) + 1      # counted, as the loop counts it
  for a, b in zip(jax.tree.leaves(new.replace(step=state.step)), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)


def test_dpo_loss_is_log2_when_policy_is_the_reference(model_config, params):
  batch = sft_batch(model_config, 1)       # rows 0/2 chosen, rows 1/3 rejected
  logps = steps.sequence_logps(params, batch, model_config=model_config)
  batch = dict(batch, ref_chosen_logps=logps[0::2], ref_rejected_logps=logps[1::2])
  dpo_config = ml_collections.ConfigDict(dict(beta=0.1, label_smoothing=0.0,
                                              loss_type='sigmoid'))
  loss_fn = lambda t, f, b: steps.dpo_loss(t, f, b, model_config=model_config,
                                          dpo_config=dpo_config)
  loss, metrics = loss_fn(params, {}, batch)
  np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
  optimizer = optim.make_optimizer(_optim_config(lr=1e-3))
  state = steps.init_state(params, {}, optimizer)
  step = jax.jit(lambda s, b: steps.train_step(s, b, loss_fn=loss_fn, optimizer=optimizer,
                                               skip_nonfinite=False))
  for _ in range(5):
    state, metrics = step(state, batch)
  assert float(metrics['loss']) < np.log(2.0) - 0.05
  assert float(metrics['rewards/accuracies']) == 1.0
  assert float(metrics['rewards/margins']) > 0
