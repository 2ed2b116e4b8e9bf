"""Tests for saber_jax/train/optim.py: schedule, clipping, accumulation, state of the
trainable split only and weight-decay masking, checked against closed forms and
torch.optim.AdamW + transformers' cosine schedule."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from saber_jax.train import optim, steps


def config(**overrides):
  return ml_collections.ConfigDict(overrides)


def toy_params(seed=0):
  """A thinker-shaped tree: stacked text layers with biases and norm scales, towers."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {
      'text': {
          'embed_tokens': {'embedding': normal(7, 4)},
          'layers': {
              'self_attn': {'q_proj': {'kernel': normal(2, 4, 4), 'bias': normal(2, 4)}},
              'input_layernorm': {'scale': normal(2, 4)},
          },
          'norm': {'scale': normal(4)},
          'lm_head': {'kernel': normal(4, 7)},
      },
      'audio': {'conv1': {'kernel': normal(3, 2, 4), 'bias': normal(4)}},
      'vision': {'patch_embed': {'kernel': normal(5, 4)}},
  }


def random_grads(params, seed, scale=1.0):
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(
      treedef, [jnp.asarray(scale * rng.normal(size=x.shape), jnp.float32) for x in leaves])


def run(tx, params, grads_seq):
  state = tx.init(params)
  step = jax.jit(tx.update)
  for grads in grads_seq:
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def state_array_sizes(state):
  """Total elements of the optimizer state's non-scalar arrays (moments, accumulators)."""
  return sum(x.size for x in jax.tree.leaves(state) if hasattr(x, 'ndim') and x.ndim > 0)


def tree_size(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------
# Schedule.

def test_schedule_closed_form_at_start_warmup_middle_and_end():
  schedule = optim.learning_rate_schedule(
      config(lr=1e-3, total_steps=110, warmup_steps=10, min_lr_ratio=0.1))
  np.testing.assert_allclose(schedule(0), 0.0)
  np.testing.assert_allclose(schedule(5), 5e-4, rtol=1e-6)            # halfway up the ramp
  np.testing.assert_allclose(schedule(10), 1e-3, rtol=1e-6)           # end of warmup: peak
  np.testing.assert_allclose(schedule(60), 1e-3 * (0.1 + 0.9 * 0.5), rtol=1e-6)  # cos(pi/2)
  np.testing.assert_allclose(schedule(35), 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))),
                             rtol=1e-6)
  np.testing.assert_allclose(schedule(110), 1e-4, rtol=1e-6)          # end: lr * min_lr_ratio
  np.testing.assert_allclose(schedule(500), 1e-4, rtol=1e-6)          # constant afterwards


def test_schedule_equals_transformers_cosine_with_min_lr_and_warmup_ratio():
  torch = pytest.importorskip('torch')
  from transformers import get_cosine_with_min_lr_schedule_with_warmup
  cfg = config(lr=2e-4, total_steps=40, warmup_ratio=0.06, min_lr_ratio=0.05)
  assert optim.warmup_steps(cfg) == 3  # ceil(0.06 * 40), as transformers' get_warmup_steps
  torch_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
  torch_sched = get_cosine_with_min_lr_schedule_with_warmup(torch_opt, 3, 40, min_lr_rate=0.05)
  schedule = optim.learning_rate_schedule(cfg)
  for step in range(41):
    np.testing.assert_allclose(schedule(step), torch_sched.get_last_lr()[0], rtol=1e-5, atol=1e-12,
                               err_msg=f'step {step}')
    torch_opt.step()
    torch_sched.step()


# ---------------------------------------------------------------------------
# The full optimizer against torch.

def test_matches_torch_adamw_with_clipping_decay_groups_and_schedule():
  torch = pytest.importorskip('torch')
  from transformers import get_cosine_with_min_lr_schedule_with_warmup
  cfg = config(lr=1e-2, total_steps=6, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.3,
               b1=0.8, b2=0.95, eps=1e-6, grad_clip_norm=2.0)
  params, _ = steps.split_params(toy_params(), 'llm')  # the text tree
  grads_seq = [random_grads(params, seed, scale=1.5) for seed in range(6)]
  final, _ = run(optim.make_optimizer(cfg), params, grads_seq)

  # torch: the same text tree; decay groups split by the same rule.
  text_leaves = jax.tree_util.tree_leaves_with_path(params['text'])
  decays = jax.tree.leaves(optim.weight_decay_mask(params['text']))
  torch_params = [torch.nn.Parameter(torch.tensor(np.asarray(x))) for _, x in text_leaves]
  groups = [{'params': [p for p, d in zip(torch_params, decays) if d], 'weight_decay': 0.3},
            {'params': [p for p, d in zip(torch_params, decays) if not d], 'weight_decay': 0.0}]
  torch_opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.8, 0.95), eps=1e-6)
  torch_sched = get_cosine_with_min_lr_schedule_with_warmup(torch_opt, 2, 6, min_lr_rate=0.1)
  for grads in grads_seq:
    for p, g in zip(torch_params, jax.tree.leaves(grads['text'])):
      p.grad = torch.tensor(np.asarray(g))
    torch.nn.utils.clip_grad_norm_(torch_params, 2.0)
    torch_opt.step()
    torch_sched.step()

  assert sum(decays) == 3 and len(decays) == 6  # embedding, q kernel, lm_head
  for (path, _), got, expected in zip(text_leaves, jax.tree.leaves(final['text']), torch_params):
    np.testing.assert_allclose(got, expected.detach().numpy(), rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------
# Properties.

def test_clipping_bounds_the_gradient_adam_sees():
  params = {'w': jnp.zeros((3, 4)), 'v': jnp.zeros((5,))}
  tx = optim.make_optimizer(config(lr=0.1, total_steps=10, weight_decay=0.0, b1=0.9,
                                   grad_clip_norm=1.0))
  for scale, expected_norm in ((100.0, 1.0), (1e-3, None)):
    grads = random_grads(params, 1, scale=scale)
    grad_norm = float(optax.tree.norm(grads))
    _, state = run(tx, params, [grads])
    first_moment = [s.mu for s in jax.tree.leaves(
        state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
                    if isinstance(s, optax.ScaleByAdamState)][0]
    # After one step mu = (1 - b1) * g_clipped.
    expected = expected_norm if expected_norm is not None else grad_norm
    np.testing.assert_allclose(optax.tree.norm(first_moment), 0.1 * expected, rtol=1e-5)
  # And the update of a clipped step equals the update on the pre-scaled gradient.
  grads = random_grads(params, 2, scale=50.0)
  rescaled = jax.tree.map(lambda g: g / optax.tree.norm(grads), grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               run(tx, params, [grads])[0], run(tx, params, [rescaled])[0])


@pytest.mark.parametrize('mode', ['full', 'llm'])
def test_accumulation_equals_one_step_on_the_mean_gradient(mode):
  params, _ = steps.split_params(toy_params(1), mode)
  common = dict(lr=1e-2, total_steps=4, warmup_steps=1, weight_decay=0.1, grad_clip_norm=0.5)
  accum_tx = optim.make_optimizer(config(grad_accum_steps=3, **common))
  plain_tx = optim.make_optimizer(config(**common))
  micro = [random_grads(params, seed) for seed in range(9)]
  means = [jax.tree.map(lambda *g: sum(g) / 3, *micro[i:i + 3]) for i in (0, 3, 6)]

  # Micro-steps that do not complete an accumulation change nothing.
  partial, _ = run(accum_tx, params, micro[:2])
  jax.tree.map(np.testing.assert_array_equal, partial, params)
  accumulated, _ = run(accum_tx, params, micro)
  reference, _ = run(plain_tx, params, means)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), accumulated, params)
  assert any(jax.tree.leaves(changed))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               accumulated, reference)


def test_optimizer_state_covers_only_the_trainable_split():
  params = toy_params(2)
  for mode, size in (('full', tree_size(params)), ('llm', tree_size(params['text']))):
    trainable, _ = steps.split_params(params, mode)
    for accum, slots in ((1, 2), (3, 3)):  # Adam mu, nu (+ the accumulator)
      tx = optim.make_optimizer(config(lr=0.1, total_steps=5, grad_accum_steps=accum))
      final, state = run(tx, trainable, [random_grads(trainable, seed) for seed in range(accum)])
      assert state_array_sizes(state) == slots * size, (mode, accum)
      assert not np.allclose(final['text']['lm_head']['kernel'],
                             params['text']['lm_head']['kernel'])

  # lora: the adapters train and hold state; the whole base is the frozen tree.
  adapters = {'q': {'a': jnp.ones((2, 4, 2)), 'b': jnp.zeros((2, 2, 4))}}
  trainable, frozen = steps.split_params(params, 'lora', adapters)
  assert frozen is params
  assert jax.tree.structure(trainable) == jax.tree.structure({'lora': adapters})
  final, state = run(optim.make_optimizer(config(lr=0.1, total_steps=5)), trainable,
                     [random_grads(trainable, 7)])
  assert not np.allclose(final['lora']['q']['b'], 0.0)
  assert state_array_sizes(state) == 2 * tree_size(adapters)


def test_no_weight_decay_on_biases_and_norm_scales():
  params = toy_params(3)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  lr, decay = 0.1, 0.5
  tx = optim.make_optimizer(config(lr=lr, total_steps=10, weight_decay=decay, grad_clip_norm=None))
  final, _ = run(tx, params, [zero_grads])  # zero gradient: Adam's step is 0, only decay moves
  mask = optim.weight_decay_mask(params)

  def check(path, before, after, decays):
    expected = before * (1 - lr * decay) if decays else before
    np.testing.assert_allclose(after, expected, rtol=1e-6, err_msg=jax.tree_util.keystr(path))
  jax.tree_util.tree_map_with_path(check, params, final, mask)
  names = {jax.tree_util.keystr(p): d for p, d in jax.tree_util.tree_leaves_with_path(mask)}
  assert names == {
      "['audio']['conv1']['bias']": False, "['audio']['conv1']['kernel']": True,
      "['text']['embed_tokens']['embedding']": True,
      "['text']['layers']['input_layernorm']['scale']": False,
      "['text']['layers']['self_attn']['q_proj']['bias']": False,
      "['text']['layers']['self_attn']['q_proj']['kernel']": True,
      "['text']['lm_head']['kernel']": True, "['text']['norm']['scale']": False,
      "['vision']['patch_embed']['kernel']": True}


def test_bad_configs_raise_errors_naming_the_field():
  with pytest.raises(ValueError, match='warmup_step'):
    optim.make_optimizer(config(warmup_step=3))
  with pytest.raises(ValueError, match='not both'):
    optim.learning_rate_schedule(config(warmup_steps=3, warmup_ratio=0.1))
  with pytest.raises(ValueError, match='trainable'):
    optim.make_optimizer(config(trainable='llm'))  # a run field (steps.split_params), not optim's
  with pytest.raises(ValueError, match='total_steps'):
    optim.learning_rate_schedule(config(total_steps=10, warmup_steps=11))
