"""Splash attention (`ThinkerConfig.attention='splash'`, Pallas' TPU kernel) against the XLA
path with its explicit mask, in fp32, forward and gradients. No TPU here: the kernel runs in
Pallas' interpreter on CPU, the same kernel code the TPU compiles (`tests/test_dry_run_tpu.py`
compiles it for a TPU topology)."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from saber_jax import sharding, weights
from saber_jax.models import layers
from saber_jax.models.config import ThinkerConfig
from saber_jax.models.text import TextModel


def _segments(length: int) -> tuple[np.ndarray, np.ndarray]:
  """valid bool [4, L] and segment ids [4, L]: right and left padding, packed rows."""
  valid = np.ones((4, length), bool)
  valid[0, length - 23:] = False
  valid[1, :9] = False
  valid[3, length - 5:] = False
  segments = np.zeros((4, length), np.int32)
  segments[2, 40:] = 1
  segments[3, 17:] = 1
  segments[3, 61:] = 2
  return valid, segments


def _max_error(got, want, valid) -> float:
  return float(np.max(np.abs(np.asarray(got)[valid] - np.asarray(want)[valid])))


def test_splash_kernel_equals_masked_attention_gqa():
  """Grouped-query heads (4 query heads on 2 kv heads, as Qwen2), a length the kernel's
  128-wide tiles do not divide, padding on either side and packed segments."""
  rng = np.random.default_rng(0)
  length, heads, kv_heads, head_dim = 100, 4, 2, 16
  valid, segment_ids = _segments(length)
  q = jnp.asarray(rng.normal(size=(4, length, heads, head_dim)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(4, length, kv_heads, head_dim)), jnp.float32)
          for _ in range(2))
  segments = np.where(valid, segment_ids, -1)
  causal = np.tril(np.ones((length, length), bool))
  mask = jnp.asarray((causal & (segments[:, :, None] == segments[:, None, :]))[:, None])
  weight = jnp.asarray(rng.normal(size=q.shape) * valid[..., None, None], jnp.float32)

  def loss(attend, q, k, v):
    out = attend(q, k, v)
    return jnp.sum(out * weight), out

  grad = lambda attend: jax.grad(loss, argnums=(1, 2, 3), has_aux=True)(attend, q, k, v)
  want_grads, want = grad(lambda q, k, v: layers.attention(q, k, v, mask))
  got_grads, got = grad(lambda q, k, v: layers.splash_attention(q, k, v, jnp.asarray(segments)))
  assert _max_error(got, want, valid) < 1e-5
  for g, w in zip(got_grads, want_grads):
    assert float(jnp.max(jnp.abs(g - w))) < 1e-4 * float(jnp.max(jnp.abs(w)))


def test_splash_decoder_equals_xla_on_a_mesh():
  """A two-layer GQA decoder (layers rematerialised) jitted on a (data 2, fsdp 2, tensor 2)
  mesh of CPU devices, so the kernel runs under shard_map with rows and heads split: hidden
  states and every parameter's gradient equal the XLA path's. Rows padded on the right,
  on the left, not at all, and both."""
  config = ThinkerConfig.tiny().text
  length = 72
  valid, _ = _segments(length)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, length, config.hidden_size)), jnp.float32)
  position_ids = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (3, 4, length))
  model = lambda attention: TextModel(config, remat='full', attention=attention)
  params = nn.unbox(model('xla').init(jax.random.key(0), x, position_ids, valid))
  weight = jnp.asarray(rng.normal(size=x.shape) * valid[..., None], jnp.float32)
  mesh = sharding.make_mesh((2, 2, 2))
  replicated = NamedSharding(mesh, PartitionSpec())
  rows = NamedSharding(mesh, PartitionSpec(('data', 'fsdp')))

  def run(attention):
    def loss(params):
      hidden = model(attention).apply(params, x, position_ids, valid)
      return jnp.sum(hidden * weight), hidden
    step = jax.jit(sharding.on_mesh(jax.grad(loss, has_aux=True), mesh),
                   in_shardings=(replicated,), out_shardings=(replicated, rows))
    # The kernel runs per device: inside shard_map, rows and heads split.
    assert ('shard_map' in str(step.trace(params).jaxpr)) == (attention == 'splash')
    return step(params)

  want_grads, want = run('xla')
  got_grads, got = run('splash')
  assert _max_error(got, want, valid) < 1e-4
  for path, w in jax.tree_util.tree_leaves_with_path(want_grads):
    g = dict(jax.tree_util.tree_leaves_with_path(got_grads))[path]
    scale = float(jnp.max(jnp.abs(w)))
    assert float(jnp.max(jnp.abs(g - w))) < 1e-4 * scale, jax.tree_util.keystr(path)


def test_auto_attention_picks_splash_on_tpu(monkeypatch):
  from saber_jax.train.config import paper_config
  config = paper_config('sed_sft')
  config.model.name = 'tiny'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  assert weights.model_config_of(config).attention == 'splash'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert weights.model_config_of(config).attention == 'cudnn'


def _pair_segments(length: int) -> np.ndarray:
  """Pair segment ids [3, L] (1 prompt, 2 chosen, 3 rejected, 0 padding): unequal answers
  either way round, and a padding pair (one prompt token, as the pipeline pads)."""
  segments = np.zeros((3, length), np.int32)
  segments[0, :30], segments[0, 30:50], segments[0, 50:length - 10] = 1, 2, 3
  segments[1, :10], segments[1, 10:length - 30], segments[1, length - 30:length - 25] = 1, 2, 3
  segments[2, :1] = 1
  return segments


def test_pair_rows_on_splash_equal_the_masked_pair_attention():
  """`[prompt | chosen | rejected]` rows as two gathered causal rows on the splash kernel:
  outputs at every real token and the q/k/v gradients equal attention under
  `text.segment_mask` (GQA, fp32)."""
  from saber_jax.models import text
  rng = np.random.default_rng(2)
  length, heads, kv_heads, head_dim = 100, 4, 2, 16
  segments = _pair_segments(length)
  valid = segments > 0
  q = jnp.asarray(rng.normal(size=(3, length, heads, head_dim)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(3, length, kv_heads, head_dim)), jnp.float32)
          for _ in range(2))
  weight = jnp.asarray(rng.normal(size=q.shape) * valid[..., None, None], jnp.float32)
  mask = text.segment_mask(jnp.asarray(segments))

  def loss(attend, q, k, v):
    out = attend(q, k, v)
    return jnp.sum(out * weight), out

  grad = lambda attend: jax.grad(loss, argnums=(1, 2, 3), has_aux=True)(attend, q, k, v)
  want_grads, want = grad(lambda q, k, v: layers.attention(q, k, v, mask))
  rows = text.pair_rows(jnp.asarray(segments), 'splash')
  np.testing.assert_array_equal(np.asarray(rows.kernel == 0).sum(-1),
                                [50, 70, 70, 15, 1, 1])    # prompt + each answer
  got_grads, got = grad(lambda q, k, v: text.pair_row_attention(q, k, v, rows, 'splash'))
  assert bool(jnp.all(jnp.isfinite(got)))                  # padding too
  assert _max_error(got, want, valid) < 1e-5
  for g, w in zip(got_grads, want_grads):
    assert float(jnp.max(jnp.abs(g - w))) < 1e-5 * float(jnp.max(jnp.abs(w)))


def _square_shapes(hlo: str, length: int) -> list[str]:
  """The HLO's array shapes whose last two dimensions are both `length`."""
  import re
  return re.findall(rf'\w+\[[\d,]*\b{length},{length}\]', hlo)


def test_pair_rows_on_splash_hold_no_length_squared_tensor():
  """The compiled forward and backward of a decoder on pair rows: with the XLA path the
  [B, 1, L, L] mask and [B, N, L, L] scores are there; on splash no [.., L, L] array."""
  config = ThinkerConfig.tiny().text
  length = 384                        # three of the kernel's 128-wide tiles (one tile: L x L)
  segments = jnp.asarray(_pair_segments(length))
  x = jnp.zeros((3, length, config.hidden_size), jnp.float32)
  position_ids = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (3, 3, length))
  model = lambda attention: TextModel(config, remat='full', attention=attention)
  params = nn.unbox(model('xla').init(jax.random.key(0), x, position_ids, segments > 0,
                                      segments))

  def hlo(attention):
    loss = lambda p: jnp.sum(model(attention).apply(p, x, position_ids, segments > 0,
                                                    segments))
    return jax.jit(jax.grad(loss)).lower(params).compile().as_text()

  assert _square_shapes(hlo('xla'), length)
  assert not _square_shapes(hlo('splash'), length)
