"""Tests for saber_jax/train/lora.py: LoRA as a pure transform of a nested param dict."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from saber_jax.errors import UserError
from saber_jax.train import lora, optim

NUM_LAYERS, HIDDEN, MLP = 3, 8, 12


def toy_params(seed=0, dtype=jnp.float32):
  """A thinker-shaped param dict: scanned text layers [L, in, out], unstacked head, towers."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
  attn = {name: {'kernel': normal(NUM_LAYERS, HIDDEN, HIDDEN), 'bias': normal(NUM_LAYERS, HIDDEN)}
          for name in ('q_proj', 'k_proj', 'v_proj')}
  attn['o_proj'] = {'kernel': normal(NUM_LAYERS, HIDDEN, HIDDEN)}
  mlp = {'gate_proj': {'kernel': normal(NUM_LAYERS, HIDDEN, MLP)},
         'up_proj': {'kernel': normal(NUM_LAYERS, HIDDEN, MLP)},
         'down_proj': {'kernel': normal(NUM_LAYERS, MLP, HIDDEN)}}
  return {
      'text': {'embed_tokens': {'embedding': normal(20, HIDDEN)},
               'layers': {'self_attn': attn, 'mlp': mlp,
                          'input_layernorm': {'scale': normal(NUM_LAYERS, HIDDEN)}},
               'norm': {'scale': normal(HIDDEN)},
               'lm_head': {'kernel': normal(HIDDEN, 20)}},
      'audio': {'layers': {'self_attn': {'q_proj': {'kernel': normal(2, HIDDEN, HIDDEN)}}}},
  }


def random_lora(lora_params, seed):
  leaves, treedef = jax.tree.flatten(lora_params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [jnp.asarray(rng.normal(size=x.shape), jnp.float32)
                                      for x in leaves])


def paths(tree):
  return {'/'.join(str(k.key) for k in path)
          for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


def params_at(params, names):
  for name in names:
    params = params[name]
  return params


def test_targets_regex_selects_exactly_the_decoder_projections():
  params = toy_params()
  projections = ['self_attn/q_proj', 'self_attn/k_proj', 'self_attn/v_proj', 'self_attn/o_proj',
                 'mlp/gate_proj', 'mlp/up_proj', 'mlp/down_proj']
  selected = ['/'.join(p) for p in lora.target_kernel_paths(params)]
  assert sorted(selected) == sorted(f'text/layers/{p}/kernel' for p in projections)
  adapters = lora.init_lora(jax.random.key(0), params, rank=2)
  assert paths(adapters) == {f'text/layers/{p}/{f}' for p in projections for f in 'ab'}
  # A custom regex can reach the audio tower too; biases and norms are never targets.
  picked = lora.target_kernel_paths(params, targets=[r'q_proj', r'lm_head'])
  assert sorted('/'.join(p) for p in picked) == [
      'audio/layers/self_attn/q_proj/kernel', 'text/layers/self_attn/q_proj/kernel',
      'text/lm_head/kernel']
  with pytest.raises(ValueError, match='matched no kernel'):
    lora.init_lora(jax.random.key(0), params, rank=2, targets=[r'qkv_proj'])
  # A rank wider than an adapted kernel is a config error naming the kernel and its widths.
  narrowest = min(min(params_at(params, p).shape[-2:]) for p in lora.target_kernel_paths(params))
  with pytest.raises(UserError, match=rf'config.lora.rank = {narrowest + 1}: expected <= '
                     rf'{narrowest}, the narrowest width of the adapted kernels \(text/'):
    lora.init_lora(jax.random.key(0), params, rank=narrowest + 1)
  lora.init_lora(jax.random.key(0), params, rank=narrowest)


def test_init_shapes_keep_the_layer_axis_and_b_starts_at_zero():
  params = toy_params()
  adapters = lora.init_lora(jax.random.key(1), params, rank=4)
  down = adapters['text']['layers']['mlp']['down_proj']
  assert down['a'].shape == (NUM_LAYERS, MLP, 4) and down['b'].shape == (NUM_LAYERS, 4, HIDDEN)
  assert down['a'].dtype == jnp.float32 and np.all(down['b'] == 0)
  assert np.all(np.abs(down['a']) <= 1 / np.sqrt(MLP)) and np.std(down['a']) > 0.1 / np.sqrt(MLP)
  # Every layer gets its own factors.
  assert not np.allclose(down['a'][0], down['a'][1])


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_merge_with_zero_b_is_the_identity(dtype):
  params = toy_params(dtype=dtype)
  adapters = lora.init_lora(jax.random.key(2), params, rank=4)
  merged = jax.jit(lambda p, a: lora.merge_lora(p, a, rank=4, alpha=16.0))(params, adapters)
  jax.tree.map(np.testing.assert_array_equal, merged, params)
  assert jax.tree.map(lambda x: x.dtype, merged) == jax.tree.map(lambda x: x.dtype, params)


def test_merge_equals_the_explicit_formula_per_layer():
  params = toy_params()
  targets = lora.DEFAULT_TARGETS + (r'^text/lm_head/kernel$',)  # plus an unstacked [in, out]
  rank, alpha = 3, 6.0
  adapters = random_lora(lora.init_lora(jax.random.key(3), params, rank=rank, targets=targets), 4)
  merged = lora.merge_lora(params, adapters, rank=rank, alpha=alpha)
  for names in lora.target_kernel_paths(params, targets):
    module = names[:-1]
    a = np.asarray(lora._get(adapters, module)['a'], np.float64)
    b = np.asarray(lora._get(adapters, module)['b'], np.float64)
    kernel = np.asarray(lora._get(params, names), np.float64)
    if kernel.ndim == 2:
      expected = kernel + alpha / rank * a @ b
    else:
      expected = np.stack([kernel[i] + alpha / rank * a[i] @ b[i] for i in range(kernel.shape[0])])
    np.testing.assert_allclose(lora._get(merged, names), expected, rtol=1e-5, atol=1e-5,
                               err_msg='/'.join(names))
  # Everything else is untouched (the very same arrays).
  assert merged['text']['layers']['self_attn']['q_proj']['bias'] is \
      params['text']['layers']['self_attn']['q_proj']['bias']
  assert merged['audio'] is params['audio'] and merged['text']['embed_tokens'] is \
      params['text']['embed_tokens']


def stacked_forward(params, x):
  """A two-projection toy network applied layer by layer over the stacked kernels."""
  attn, mlp = params['text']['layers']['self_attn'], params['text']['layers']['mlp']
  for i in range(NUM_LAYERS):
    x = x + jnp.tanh(x @ attn['q_proj']['kernel'][i]) @ attn['o_proj']['kernel'][i] * 0.1
    x = x + jnp.tanh(x @ mlp['up_proj']['kernel'][i]) @ mlp['down_proj']['kernel'][i] * 0.1
  return x


def test_gradients_reach_a_and_b_after_one_step_and_never_the_base():
  params = toy_params(5)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, HIDDEN)), jnp.float32)
  adapters = lora.init_lora(jax.random.key(6), params, rank=2)

  def loss(base, adapters):
    merged = lora.merge_lora(jax.lax.stop_gradient(base), adapters, rank=2, alpha=4.0)
    return jnp.mean(stacked_forward(merged, x) ** 2)

  base_grads, lora_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, adapters)
  assert all(np.all(g == 0) for g in jax.tree.leaves(base_grads))
  q = lora_grads['text']['layers']['self_attn']['q_proj']
  # At init b = 0, so d/da = dW @ b^T is zero and only b learns.
  assert np.all(q['a'] == 0) and np.all(np.any(q['b'] != 0, axis=(1, 2)))

  # One optimizer step on the adapters (the lora trainable split), then both factors get gradient.
  tx = optim.make_optimizer(ml_collections.ConfigDict({'lr': 1e-2, 'total_steps': 10}))
  tree = {'lora': adapters}
  grads = jax.jit(jax.grad(lambda t: loss(params, t['lora'])))(tree)
  updates, _ = jax.jit(tx.update)(grads, tx.init(tree), tree)
  stepped = optax.apply_updates(tree, updates)
  lora_grads = jax.jit(jax.grad(loss, argnums=1))(params, stepped['lora'])
  for name in ('q_proj', 'o_proj'):
    factors = lora_grads['text']['layers']['self_attn'][name]
    for f in ('a', 'b'):
      assert np.all(np.any(factors[f] != 0, axis=(1, 2))), (name, f)


def test_lora_gradient_equals_the_chain_rule_through_the_merged_kernel():
  params = toy_params(7)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, HIDDEN)), jnp.float32)
  adapters = random_lora(lora.init_lora(jax.random.key(8), params, rank=2), 9)
  scale = 4.0 / 2
  lora_grads = jax.grad(
      lambda a: jnp.mean(stacked_forward(lora.merge_lora(params, a, rank=2, alpha=4.0), x) ** 2))(
          adapters)
  merged = lora.merge_lora(params, adapters, rank=2, alpha=4.0)
  kernel_grads = jax.grad(lambda p: jnp.mean(stacked_forward(p, x) ** 2))(merged)
  dw = kernel_grads['text']['layers']['mlp']['up_proj']['kernel']
  factors = adapters['text']['layers']['mlp']['up_proj']
  # dL/da = s dW b^T and dL/db = s a^T dW, layer by layer.
  np.testing.assert_allclose(lora_grads['text']['layers']['mlp']['up_proj']['a'],
                             scale * jnp.einsum('lio,lro->lir', dw, factors['b']),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(lora_grads['text']['layers']['mlp']['up_proj']['b'],
                             scale * jnp.einsum('lir,lio->lro', factors['a'], dw),
                             rtol=1e-5, atol=1e-6)


def test_merge_rejects_mismatched_rank_and_missing_kernels():
  params = toy_params()
  adapters = lora.init_lora(jax.random.key(0), params, rank=2)
  with pytest.raises(ValueError, match=r'LoRA factors at text/layers/.*do not fit.*rank 3'):
    lora.merge_lora(params, adapters, rank=3, alpha=1.0)
  with pytest.raises(ValueError, match='no kernel'):
    lora.merge_lora(params, {'text': {'missing': adapters['text']['layers']['mlp']['up_proj']}},
                    rank=2, alpha=1.0)


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    dense = lambda features, axes, name: nn.Dense(
        features, name=name, kernel_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), axes))
    x = x + dense(HIDDEN, ('mlp', 'embed'), 'down_proj')(dense(MLP, ('embed', 'mlp'), 'up_proj')(x))
    return x, None


class _Text(nn.Module):
  @nn.compact
  def __call__(self, x):
    stack = nn.scan(_Block, variable_axes={'params': 0}, split_rngs={'params': True},
                    length=NUM_LAYERS, metadata_params={nn.PARTITION_NAME: 'layers'})
    return stack(name='layers')(x, None)[0]


class _Model(nn.Module):
  @nn.compact
  def __call__(self, x):
    return _Text(name='text')(x)


def test_logical_axes_follow_the_base_kernel_and_merge_runs_the_flax_model():
  model = _Model()
  x = jnp.ones((2, HIDDEN))
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)['params']
  specs = nn.get_partition_spec(abstract)
  assert specs['text']['layers']['up_proj']['kernel'] == P('layers', 'embed', 'mlp')
  adapters = lora.init_lora(jax.random.key(1), nn.meta.unbox(abstract), rank=2)
  axes = lora.lora_logical_axes(specs, adapters)
  assert axes['text']['layers']['up_proj'] == {'a': P('layers', 'embed', None),
                                               'b': P('layers', None, 'mlp')}
  assert axes['text']['layers']['down_proj'] == {'a': P('layers', 'mlp', None),
                                                 'b': P('layers', None, 'embed')}
  # The specs map to mesh shardings with ordinary logical rules.
  mesh = jax.make_mesh((1,), ('fsdp',), axis_types=(jax.sharding.AxisType.Auto,))
  shardings = nn.logical_to_mesh_sharding(axes, mesh, [('embed', 'fsdp')])
  assert shardings['text']['layers']['up_proj']['a'].spec == P(None, 'fsdp', None)

  # The merged params run through the unchanged model.
  params = nn.meta.unbox(model.init(jax.random.key(0), x)['params'])
  adapters = random_lora(adapters, 3)
  merged = lora.merge_lora(params, adapters, rank=2, alpha=2.0)
  manual = x
  for i in range(NUM_LAYERS):
    up = params['text']['layers']['up_proj']
    down = params['text']['layers']['down_proj']
    lo_up, lo_down = adapters['text']['layers']['up_proj'], adapters['text']['layers']['down_proj']
    h = manual @ (up['kernel'][i] + lo_up['a'][i] @ lo_up['b'][i]) + up['bias'][i]
    manual = manual + h @ (down['kernel'][i] + lo_down['a'][i] @ lo_down['b'][i]) + down['bias'][i]
  np.testing.assert_allclose(model.apply({'params': merged}, x), manual, rtol=1e-5, atol=1e-5)
