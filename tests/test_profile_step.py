"""`benchmarks/profile_step.py`: each side's operations are read from a real profiler trace
and sorted into the same categories (the whole benchmark takes minutes: run by hand)."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'benchmarks'))
import profile_step  # noqa: E402


def test_xla_trace_ops_are_found_and_dense_products_named_matmul(tmp_path):
  """A scanned layer's products, fused with elementwise work or not, come out as matmul;
  the loop and the conditional are found (their events span what they run); every other
  instruction the trace names is in a category, and the categories add up."""
  def layers(w, x):
    def layer(h, wi):
      h = jax.lax.cond(h.sum() > 0, lambda h: jnp.tanh(h @ wi), lambda h: h @ wi.T, h)
      return h.T.copy().T * 2, None
    return jax.lax.scan(layer, x, w)[0].sum()
  step = jax.jit(jax.grad(layers)).lower(jnp.ones((3, 64, 64)), jnp.ones((32, 64))).compile()
  w, x = jnp.full((3, 64, 64), 0.01), jnp.ones((32, 64))
  step(w, x).block_until_ready()
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    step(w, x).block_until_ready()
  times = profile_step.xla_op_times(str(tmp_path))
  dots = profile_step.dot_instructions(step.as_text())
  assert dots and set(times) & dots
  containers = profile_step.container_instructions(step.as_text())
  assert {op.split('.')[0] for op in containers} >= {'while', 'cond'}, containers
  assert not containers & dots
  summary = profile_step.summarize(times, lambda op: profile_step.xla_category(op, dots), 1.0)
  assert summary['categories']['matmul'] > 0
  assert sum(summary['categories'].values()) == pytest.approx(summary['op_s'])


def test_torch_profile_ops_land_in_matmul_attention_and_optimizer():
  torch = pytest.importorskip('torch')
  layer = torch.nn.Linear(32, 32)
  optimizer = torch.optim.AdamW(layer.parameters(), foreach=True)
  q = torch.randn(1, 2, 16, 32, requires_grad=True)
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    h = torch.nn.functional.scaled_dot_product_attention(q, q, layer(q), is_causal=True)
    h.sum().backward()
    optimizer.step()
  summary = profile_step.summarize(profile_step.torch_op_times(prof),
                                   profile_step.torch_category, 1.0)
  for category in ('matmul', 'attention', 'optimizer'):
    assert summary['categories'][category] > 0, (category, summary['top'])
