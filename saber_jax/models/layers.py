"""Building blocks shared by the three towers: dense layers with logical axis names,
norms, attention, and the scanned layer stack."""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from saber_jax import sharding

Dtype = jnp.dtype | str

_init = nn.initializers.normal(0.02)

# A checkpoint rule (see convert.py, which imports the towers, so they cannot import it):
# (regex over the tensor name, '/'-joined param path, axis permutation from torch's layout
# or None).
Rule = tuple[str, str, tuple[int, ...] | None]
LINEAR = (1, 0)           # torch Linear [out, in] -> flax Dense [in, out]


def linear_rules(torch_name: str, path: str, bias: bool = True) -> list[Rule]:
  """The rules of one torch Linear (regex name) stored as a Dense at `path`."""
  rules = [(torch_name + r'\.weight', path + '/kernel', LINEAR)]
  if bias:
    rules.append((torch_name + r'\.bias', path + '/bias', None))
  return rules


def dense(features: int, axes: tuple[str | None, str | None], *, use_bias: bool, dtype: Dtype,
          param_dtype: Dtype, name: str | None = None) -> nn.Dense:
  """A linear layer whose kernel [in, out] and bias [out] carry logical axis names."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(_init, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))


class RMSNorm(nn.Module):
  """`w * (x * rsqrt(mean(x^2) + eps))`, statistics in fp32 and the cast back to the
  activation dtype before the weight (as Qwen2RMSNorm)."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  axis_name: str = 'norm'

  @nn.compact
  def __call__(self, x):
    init = nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,))
    scale = self.param('scale', init, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return jnp.asarray(scale, self.dtype) * normed.astype(self.dtype)


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str,
               axis_name: str = 'norm') -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axis_name,)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis_name,)))


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)): the MLP of the Qwen2 decoder and of the vision blocks."""
  hidden_size: int
  intermediate_size: int
  use_bias: bool
  axes: tuple[str, str]              # logical names of (hidden, intermediate)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    embed, mlp = self.axes
    proj = lambda n, axes, name: dense(n, axes, use_bias=self.use_bias, dtype=self.dtype,
                                       param_dtype=self.param_dtype, name=name)
    # On [tokens, hidden]: the kernels' gradients then contract one axis. Given [batch,
    # length, hidden], XLA:CPU copied the SwiGLU derivative into a transposed layout for
    # them (strided writes: the benchmark's train step took 4.89 s instead of 3.92 s); the
    # TPU dry runs' memory grows by at most 0.05 GiB.
    flat = x.reshape(-1, x.shape[-1])
    hidden = (jax.nn.silu(proj(self.intermediate_size, (embed, mlp), 'gate_proj')(flat))
              * proj(self.intermediate_size, (embed, mlp), 'up_proj')(flat))
    return proj(self.hidden_size, (mlp, embed), 'down_proj')(hidden).reshape(x.shape)


def gelu(x):
  """Exact (erf) GELU, as torch's default; `jax.nn.gelu` defaults to the tanh form."""
  return jax.nn.gelu(x, approximate=False)


def rotate_half(x):
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


ATTENTION_IMPLEMENTATIONS = ('xla', 'cudnn', 'splash')


def attention(q, k, v, mask=None, *, is_causal: bool = False):
  """Softmax attention through `jax.nn.dot_product_attention` (XLA).

  q [B, T, N, H]; k, v [B, S, K, H] with N % K == 0 (grouped-query); mask bool,
  broadcastable to [B, N, T, S], True where a query may attend. Scale is H ** -0.5.
  """
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)


def causal_attention(q, k, v, lengths, implementation: str):
  """Causal self-attention of right-padded rows: row b's first lengths[b] positions attend
  among themselves; outputs at padding are not meaningful. q [B, L, N, H]; k, v
  [B, L, K, H]; lengths int [B]. No [B, N, L, L] mask is built, so `implementation`
  'cudnn' runs cuDNN's fused flash attention (bf16/fp16 on NVIDIA GPUs)."""
  lengths = lengths.astype(jnp.int32)
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                      key_value_seq_lengths=lengths,
                                      implementation=implementation)


SPLASH_BLOCKS = (512, 256, 128)     # tile sizes tried, largest first; 128 is the TPU lane width


def splash_attention(q, k, v, segment_ids, *, interpret: bool | None = None):
  """Causal self-attention with Pallas' TPU splash kernel: a token attends to earlier
  tokens of its own segment. q [B, L, N, H]; k, v [B, L, K, H] (N % K == 0); segment_ids
  int [B, L] (padding is a segment of its own, e.g. 0; outputs there are not meaningful).

  Inside a jit whose arguments carry a mesh (the train step's shardings do), the kernel
  runs per device under `shard_map`: rows over the batch axes, heads over 'tensor' when
  it divides both N and K. `interpret` runs the kernel in Pallas' interpreter: by default
  on CPU devices (tests), never on TPUs.
  """
  mesh = jax.sharding.get_abstract_mesh()
  platform = jax.default_backend() if mesh.empty else mesh.abstract_device.platform
  if platform not in ('tpu', 'cpu'):
    raise ValueError(f"attention='splash' is a TPU kernel; on {platform} use 'xla' or 'cudnn'")
  interpret = platform == 'cpu' if interpret is None else interpret
  batch, length, _, head_dim = q.shape
  pad = -length % SPLASH_BLOCKS[-1]
  # [B, L, N, H] -> [B, N, L', H]; the padded tail is a segment no real token shares.
  to_kernel = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  q, k, v = to_kernel(q * head_dim ** -0.5), to_kernel(k), to_kernel(v)
  segment_ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)),
                        constant_values=jnp.iinfo(jnp.int32).min)

  def local(q, k, v, segment_ids):
    kernel = _splash_kernel(q.shape[1], q.shape[2], interpret)
    return jax.vmap(kernel)(q, k, v, segment_ids=splash.SegmentIds(segment_ids, segment_ids))

  if mesh.empty:
    out = local(q, k, v, segment_ids)
  else:
    q_spec = sharding.mesh_spec(q.shape, ('batch', 'heads', None, None), mesh)
    k_spec = sharding.mesh_spec(k.shape, ('batch', 'kv_heads', None, None), mesh)
    if q_spec != k_spec:            # 'tensor' divides the query heads but not the kv heads
      q_spec = k_spec = jax.P(q_spec[0])
    rows = jax.P(q_spec[0])
    out = jax.shard_map(local, in_specs=(q_spec, k_spec, k_spec, rows), out_specs=q_spec,
                        check_vma=False)(q, k, v, segment_ids)
  return out.transpose(0, 2, 1, 3)[:, :length]


def _splash_kernel(num_heads: int, length: int, interpret: bool):
  """The causal splash kernel of one row: q [N, L, H], k, v [K, L, H] -> [N, L, H]."""
  block = next(b for b in SPLASH_BLOCKS if length % b == 0)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * num_heads)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)


# Rematerialisation of a layer stack (ThinkerConfig.remat): none, everything recomputed in
# the backward pass, or the dense layers' outputs kept.
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(name: str):
  """The `jax.checkpoint` policy of a layer stack, or None for no rematerialisation."""
  if name not in REMAT_POLICIES:
    raise ValueError(f'unknown remat policy {name!r}; expected one of {sorted(REMAT_POLICIES)}')
  return REMAT_POLICIES[name]


def layer_stack(block: Callable[..., nn.Module], length: int, remat: str,
                broadcast_args: int) -> Callable[..., nn.Module]:
  """`block` repeated `length` times with `nn.scan`: params stacked on a leading 'layers'
  axis so compile time does not grow with depth. The carry is the first call argument;
  the next `broadcast_args` arguments are shared by every layer."""
  if remat != 'none':
    block = nn.remat(block, policy=remat_policy(remat), prevent_cse=False)
  return nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                 in_axes=(nn.broadcast,) * broadcast_args, length=length,
                 metadata_params={nn.PARTITION_NAME: 'layers'})

