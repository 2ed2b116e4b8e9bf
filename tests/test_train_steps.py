"""The step functions: sharding-invariant loss and gradients, trainable subsets, CA-DPO,
non-finite handling."""

import dataclasses

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from hf_reference import tiny_hf_config
from saber_jax import sharding
from saber_jax.models import ThinkerConfig, abstract_params, init_params
from saber_jax.train import optim, steps
from train_batches import ROWS, fresh_state, sft_batch


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
  state = fresh_state(trainable, frozen, optimizer)
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
  state = fresh_state(params, {}, optimizer)
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
  answer = np.where(np.arange(len(batch['labels']))[:, None] % 2, 3, 2)
  batch['pair_segments'] = np.where(batch['labels'] != -100, answer, 1).astype(np.int32)
  batch['ref_chosen_logps'] = np.zeros(2, np.float32)       # two pairs in two rows each
  chosen, rejected = steps.pair_logps(params, batch, model_config=model_config)
  batch = dict(batch, ref_chosen_logps=chosen, ref_rejected_logps=rejected)
  dpo_config = ml_collections.ConfigDict(dict(beta=0.1, label_smoothing=0.0,
                                              loss_type='sigmoid'))
  loss_fn = lambda t, f, b: steps.dpo_loss(t, f, b, model_config=model_config,
                                          dpo_config=dpo_config)
  loss, metrics = loss_fn(params, {}, batch)
  np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
  optimizer = optim.make_optimizer(_optim_config(lr=1e-3))
  state = fresh_state(params, {}, optimizer)
  step = jax.jit(lambda s, b: steps.train_step(s, b, loss_fn=loss_fn, optimizer=optimizer,
                                               skip_nonfinite=False))
  for _ in range(5):
    state, metrics = step(state, batch)
  assert float(metrics['loss']) < np.log(2.0) - 0.05
  assert float(metrics['rewards/accuracies']) == 1.0
  assert float(metrics['rewards/margins']) > 0


# ---------------------------------------------------------------------------
# CA-DPO pairs with the prompt once: [prompt | chosen | rejected] rows against two rows.

PROMPTS = [   # hf_reference rows: each pair's prompt with its media
    [('text', 3), ('audio', 40), ('text', 5)],
    [('text', 2), ('video+audio', (2, 4, 4), 1.0, 60), ('text', 4)],
    [('text', 4), ('image', (1, 4, 4)), ('text', 3)],
    [('text', 6)],
]


def _pair_example(index: int, spec, rng):
  """An Example (data.examples) of one pair (prompt and media from hf_reference, answers of
  unequal lengths), in both layouts: {shared_prompt: Example}."""
  from hf_reference import FIRST_TEXT_ID, make_batch
  from saber_jax.data import examples as examples_lib, records
  b = make_batch([spec], padding_side='right', use_audio_in_video=True, seed=index)
  media = {'use_audio_in_video': bool(b.get('use_audio_in_video', False))}
  if 'input_features' in b:
    media['audio'] = b['input_features'][0][:, :b['feature_attention_mask'][0].sum()]
  if 'pixel_values_videos' in b:
    media['video'] = {k: b[k] for k in ('pixel_values_videos', 'video_grid_thw',
                                        'video_second_per_grid')}
  if 'pixel_values' in b:
    media['image'] = {k: b[k] for k in ('pixel_values', 'image_grid_thw')}
  record = dict(kind=records.PREFERENCE, prompt_ids=b['input_ids'][0])
  for side, n in (('chosen', 3 + 2 * index), ('rejected', 9 - index)):
    record[f'{side}_ids'] = rng.integers(FIRST_TEXT_ID, 99, n)
    record[f'{side}_segments'] = np.sort(rng.integers(1, 4, n)).astype(np.int8)
  ref = tuple(rng.normal(-30, 3, 2))
  return {shared: examples_lib.Example(examples_lib._rows_of(record, shared), media, False, index,
                                       ref)
          for shared in (True, False)}


@pytest.fixture(scope='module')
def pair_examples():
  """8 pairs, one of them padding (None), for 1 device and 8 data shards."""
  rng = np.random.default_rng(0)
  examples = [_pair_example(i, PROMPTS[i % 4], rng) for i in range(7)]
  return {shared: [e[shared] for e in examples] + [None] for shared in (True, False)}


def _pair_batch(model_config, examples, shared: bool, num_data_shards: int):
  from saber_jax.data import collate, examples as examples_lib
  options = examples_lib.DataConfig(batch_size=8, num_data_shards=num_data_shards,
                                    shared_prompt=shared, length_buckets=(64, 128),
                                    min_patches=16, min_vision_blocks=2, min_frame_len=16)
  return collate.collate(examples[shared], model_config=model_config, options=options,
                         preference=True)


DPO_OPTIONS = ml_collections.ConfigDict(dict(beta=0.5, label_smoothing=0.0,
                                             loss_type='sigmoid_norm', sft_weight=0.3))


def _dpo_values(model_config, trainable, frozen, batch, lora_config=None, mesh=None):
  loss_fn = lambda t, b: steps.dpo_loss(t, frozen, b, model_config=model_config,
                                        dpo_config=DPO_OPTIONS, lora_config=lora_config)
  traced = (lambda fn: fn) if mesh is None else (lambda fn: sharding.on_mesh(fn, mesh))
  (loss, metrics), grads = jax.jit(traced(jax.value_and_grad(loss_fn, has_aux=True)))(
      trainable, batch)
  logps = jax.jit(traced(lambda p, b: steps.pair_logps(p, b, model_config=model_config)))(
      steps.join_params(trainable, frozen, lora_config), batch)
  return dict(loss=loss, **metrics, chosen=logps[0], rejected=logps[1]), grads


def _assert_close(got, want, what):
  """max |got - want| <= 1e-5 * max |want| (relative to the array's scale)."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, what
  scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-6)
  assert float(np.max(np.abs(got - want), initial=0.0)) <= 1e-5 * scale, what


def test_pair_rows_hold_prompt_once_with_two_row_positions(model_config, pair_examples):
  shared = _pair_batch(model_config, pair_examples, True, 1)
  two = _pair_batch(model_config, pair_examples, False, 1)
  assert shared['input_ids'].shape[0] == 8 and two['input_ids'].shape[0] == 16
  for pair in range(7):
    seg = shared['pair_segments'][pair]
    for side, row in ((2, 2 * pair), (3, 2 * pair + 1)):
      keep = (seg == 1) | (seg == side)       # the prompt and this answer
      n = int(keep.sum())
      np.testing.assert_array_equal(shared['input_ids'][pair][keep], two['input_ids'][row, :n])
      np.testing.assert_array_equal(shared['position_ids'][:, pair][:, keep],
                                    two['position_ids'][:, row, :n])
      np.testing.assert_array_equal(shared['labels'][pair][keep], two['labels'][row, :n])
  assert not shared['example_mask'][7] and not two['example_mask'][14:].any()


def _assert_same_step(got, grads, want, want_grads):
  assert set(got) == set(want)
  for name in want:
    _assert_close(got[name], want[name], name)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
    _assert_close(g, w, jax.tree_util.keystr(path))


@pytest.fixture(scope='module')
def two_row_step(model_config, params, pair_examples):
  """The two-row step's values and gradients (all params trained, 1 device)."""
  want, want_grads = _dpo_values(model_config, params, {},
                                 _pair_batch(model_config, pair_examples, False, 1))
  assert float(want['rewards/accuracies']) not in (0.0, 1.0)   # a real mix of pairs
  return want, want_grads


@pytest.mark.slow
def test_shared_prompt_dpo_step_equals_two_rows(model_config, params, pair_examples,
                                                two_row_step):
  got, grads = _dpo_values(model_config, params, {},
                           _pair_batch(model_config, pair_examples, True, 1))
  _assert_same_step(got, grads, *two_row_step)


@pytest.mark.slow
def test_shared_prompt_dpo_step_equals_two_rows_under_lora(model_config, params, pair_examples):
  from saber_jax.train import lora
  lora_config = ml_collections.ConfigDict(dict(rank=4, alpha=8.0))
  # Non-zero B, so the adapters change the forward.
  lora_params = jax.tree.map(lambda x: x + 0.05, lora.init_lora(jax.random.key(1), params, rank=4))
  trainable, frozen = steps.split_params(params, 'lora', lora_params)
  values = [_dpo_values(model_config, trainable, frozen,
                        _pair_batch(model_config, pair_examples, shared, 1), lora_config)
            for shared in (True, False)]
  _assert_same_step(*values[0], *values[1])


@pytest.mark.slow
def test_shared_prompt_dpo_step_on_a_2x4_mesh_equals_two_rows(model_config, params,
                                                              pair_examples, two_row_step):
  mesh = sharding.make_mesh((2, 4, 1))
  placed = jax.device_put(params, sharding.tree_shardings(abstract_params(model_config), mesh))
  batch = sharding.global_batch(_pair_batch(model_config, pair_examples, True, 8), mesh)
  _assert_same_step(*_dpo_values(model_config, placed, {}, batch), *two_row_step)


@pytest.mark.slow
def test_shared_prompt_dpo_step_on_splash_on_a_2x4_mesh_equals_two_rows(model_config, params,
                                                                        pair_examples,
                                                                        two_row_step):
  """The pair rows on the splash kernel (Pallas' interpreter; two gathered causal rows per
  pair, no [B, 1, L, L] mask) under shard_map on a 2x4 mesh: the two-row XLA step's
  values and gradients. Unequal answers, GQA, a padding pair."""
  config = dataclasses.replace(model_config, attention='splash')
  assert config.text.num_attention_heads > config.text.num_key_value_heads    # GQA
  mesh = sharding.make_mesh((2, 4, 1))
  placed = jax.device_put(params, sharding.tree_shardings(abstract_params(config), mesh))
  batch = sharding.global_batch(_pair_batch(config, pair_examples, True, 8), mesh)
  _assert_same_step(*_dpo_values(config, placed, {}, batch, mesh=mesh), *two_row_step)
