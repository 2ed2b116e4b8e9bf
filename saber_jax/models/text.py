"""The Qwen2 decoder of the thinker: GQA attention with q/k/v biases and multimodal RoPE,
SwiGLU MLP, RMSNorm, layers scanned with `nn.scan`.

`TextModel.decode` runs the same layers (same params) over new tokens with a KV cache, for
`saber_jax.decode`.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from saber_jax.batch import CHOSEN, PAIR_PROMPT, REJECTED
from saber_jax.models import layers
from saber_jax.models.config import TextConfig
from saber_jax.models.rope import apply_rope, mrope_cos_sin


class KVCache(NamedTuple):
  """Rotated keys and the values of every cache slot: k, v [layers, B, S, K, H] (one
  layer's [B, S, K, H] inside the stack). Slots past what was written are zeros."""
  k: jax.Array
  v: jax.Array

  @classmethod
  def zeros(cls, config: TextConfig, batch: int, length: int, dtype) -> 'KVCache':
    shape = (config.num_hidden_layers, batch, length, config.num_key_value_heads,
             config.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

  def write(self, rows: 'KVCache', index, axis: int) -> 'KVCache':
    """These slots with `rows` (T new slots each) written at [index, index + T) of `axis`."""
    put = lambda slots, new: jax.lax.dynamic_update_slice_in_dim(
        slots, new.astype(slots.dtype), index, axis)
    return KVCache(put(self.k, rows.k), put(self.v, rows.v))


class DecoderModule(nn.Module):
  """The fields every decoder-layer module takes: its config, compute / storage dtypes and
  the attention implementation (see ThinkerConfig.attention)."""
  config: TextConfig
  dtype: layers.Dtype
  param_dtype: layers.Dtype
  attention: str = 'xla'


class Attention(DecoderModule):
  @nn.compact
  def __call__(self, x, cos, sin, mask, cache: KVCache | None = None, cache_index=None):
    """x [B, L, H] -> (out [B, L, H], new rows). Without a cache the queries attend to the
    keys of x (mask bool [B, 1, L, L]; or, for `attention` 'cudnn', the right-padded rows'
    valid lengths [B], see `layers.causal_attention`; or, for 'splash', segment ids [B, L],
    see `layers.splash_attention`; or, for pair rows on either kernel, `PairRows`) and the
    new rows are None. With
    one layer's cache [B, S, K, H], the keys and values of x take slots [cache_index,
    cache_index + L) and the queries attend over all S slots (mask [B, 1, L, S]); the new
    rows returned are those keys and values, KVCache [B, L, K, H], for the caller to write
    into its cache."""
    c = self.config
    b, length, _ = x.shape
    hd = c.head_dim
    proj = lambda n, axis, name: layers.dense(n * hd, ('embed', axis), use_bias=True,
                                               dtype=self.dtype, param_dtype=self.param_dtype,
                                               name=name)(x).reshape(b, length, n, hd)
    q = proj(c.num_attention_heads, 'heads', 'q_proj')
    k = proj(c.num_key_value_heads, 'kv_heads', 'k_proj')
    v = proj(c.num_key_value_heads, 'kv_heads', 'v_proj')
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    new_rows = None
    if cache is not None:
      new_rows = KVCache(k, v)
      k, v = cache.write(new_rows, cache_index, axis=1)
    if isinstance(mask, PairRows):             # shared-prompt pair rows, see PairRows
      out = pair_row_attention(q, k, v, mask, self.attention)
    elif cache is None and mask.ndim == 1:     # row lengths [B]: cuDNN's fused kernel
      out = layers.causal_attention(q, k, v, mask, self.attention)
    elif cache is None and mask.ndim == 2:     # segment ids [B, L]: the splash kernel
      out = layers.splash_attention(q, k, v, mask)
    else:
      out = layers.attention(q, k, v, mask)
    out = layers.dense(c.hidden_size, ('heads', 'embed'), use_bias=False, dtype=self.dtype,
                       param_dtype=self.param_dtype, name='o_proj')(out.reshape(b, length, -1))
    return out, new_rows


class DecoderLayer(DecoderModule):

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache: KVCache | None = None, cache_index=None):
    """-> (x, the new KV rows or None): the `nn.scan` carry and per-layer output (see
    Attention)."""
    norm = lambda name: layers.RMSNorm(self.config.rms_norm_eps, self.dtype, self.param_dtype,
                                       name=name)
    kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
    attended, new_rows = Attention(**kw, attention=self.attention, name='self_attn')(
        norm('input_layernorm')(x), cos, sin, mask, cache, cache_index)
    x = x + attended
    c = self.config
    mlp = layers.SwiGLU(c.hidden_size, c.intermediate_size, use_bias=False, axes=('embed', 'mlp'),
                        dtype=self.dtype, param_dtype=self.param_dtype, name='mlp')
    x = x + mlp(norm('post_attention_layernorm')(x))
    return x, new_rows


def attention_mask(attention_mask):
  """bool [B, 1, L, L]: causal, and keys limited to valid (non-padding) tokens."""
  length = attention_mask.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), bool))
  return causal[None, None] & attention_mask[:, None, None, :].astype(bool)


SHARED_PREFIX = PAIR_PROMPT   # the segment every other segment of the row also attends to


def segment_mask(segments):
  """bool [B, 1, L, L] from segment ids [B, L] (0: padding): query i sees key j iff
  j <= i and j is in i's segment or in the shared prefix (SHARED_PREFIX). A CA-DPO pair
  row `[prompt | chosen | rejected]` has segments 1, 2, 3: each answer sees the prompt
  and itself, never the other; rows of independent sequences (packing) use 2, 3, ...
  with no prefix."""
  length = segments.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), bool))
  query, key = segments[:, :, None], segments[:, None, :]
  visible = (key > 0) & ((key == query) | (key == SHARED_PREFIX))
  return (causal[None] & visible)[:, None]


def cache_attention_mask(valid_slots, cache_index, num_queries: int):
  """bool [B, 1, T, S]: the query in slot cache_index + t sees the valid slots up to its own.

  valid_slots bool [B, S]: False at the prompt's padding (slots not yet written are kept
  out by the causal part).
  """
  slots = jnp.arange(valid_slots.shape[-1])
  causal = slots[None, :] <= cache_index + jnp.arange(num_queries)[:, None]
  return causal[None, None] & valid_slots[:, None, None, :]


class PairRows(NamedTuple):
  """The two causal rows `[prompt | chosen]` and `[prompt | rejected]` of every shared-
  prompt pair row, as gathers of the pair row's tokens (see `pair_rows`): the fused
  kernels run them without a [B, 1, L, L] mask, so only the prompt's attention is
  computed twice (its projections, the MLPs and the towers once).

  order int [B, 2, L]: row r of pair b holds the pair row's tokens order[b, r] (the
    prompt's and answer r's first, in order, then the rest, which the kernel ignores).
  source int [B, L]: where token t's output is in the flat [2 * L] outputs of its pair's
    rows (the prompt's and the chosen answer's in row 0, the rejected answer's in row 1).
  kernel int: the gathered rows' valid lengths [2B] ('cudnn', 'xla') or segment ids
    [2B, L] ('splash'; the ignored tail is a segment of its own).
  """
  order: jax.Array
  source: jax.Array
  kernel: jax.Array


PAIR_ANSWERS = (CHOSEN, REJECTED)    # the segment ids of the two answers


def pair_rows(segments, attention: str) -> PairRows:
  """The gathers of `PairRows` from pair segment ids [B, L] (SHARED_PREFIX the prompt,
  PAIR_ANSWERS the answers, 0 padding; any order within the row). Padding tokens take
  row 0's output at a position past its valid length: finite, not meaningful."""
  length = segments.shape[-1]
  positions = jnp.arange(length, dtype=jnp.int32)
  keep = jnp.stack([(segments == SHARED_PREFIX) | (segments == a) for a in PAIR_ANSWERS], 1)
  # Kept tokens first, each group in row order: a stable sort on (not kept, position).
  order = jnp.argsort(jnp.where(keep, 0, length) + positions, axis=-1).astype(jnp.int32)
  where = jnp.argsort(order, axis=-1).astype(jnp.int32)          # inverse permutation
  row = (segments == PAIR_ANSWERS[1]).astype(jnp.int32)           # [B, L]
  source = row * length + jnp.take_along_axis(where, row[:, None], axis=1)[:, 0]
  lengths = jnp.sum(keep, axis=-1, dtype=jnp.int32).reshape(-1)   # [2B]
  if attention == 'splash':
    kernel = jnp.where(positions[None] < lengths[:, None], 0, -1).astype(jnp.int32)
  else:
    kernel = lengths
  return PairRows(order, source, kernel)


def pair_row_attention(q, k, v, rows: PairRows, attention: str):
  """Attention of shared-prompt pair rows through a causal kernel on their two gathered
  rows. q [B, L, N, H]; k, v [B, L, K, H] -> [B, L, N, H]."""
  b, length = q.shape[:2]
  gather = lambda x: jnp.take_along_axis(
      x[:, None], rows.order[..., None, None], axis=2).reshape(2 * b, length, *x.shape[2:])
  q, k, v = gather(q), gather(k), gather(v)
  if attention == 'splash':
    out = layers.splash_attention(q, k, v, rows.kernel)
  else:
    out = layers.causal_attention(q, k, v, rows.kernel, attention)
  out = out.reshape(b, 2 * length, *out.shape[2:])
  return jnp.take_along_axis(out, rows.source[..., None, None], axis=1)


def _attention_arg(attention: str, valid, segments):
  """What the decoder's attention needs to know of padding and segments (see Attention):
  pair rows (segments given) become `PairRows` for the fused kernels (segment ids other
  than SHARED_PREFIX and PAIR_ANSWERS are left out there) and the explicit [B, 1, L, L]
  mask for 'xla', where two gathered rows cost twice one masked row (XLA computes every
  (query, key) pair: 1.9x slower measured on CPU, see the README)."""
  if segments is not None:
    return segment_mask(segments) if attention == 'xla' else pair_rows(segments, attention)
  if attention == 'xla':
    return attention_mask(valid)
  if attention == 'splash':       # padding becomes a segment of its own (-1)
    return jnp.where(valid, 0, -1).astype(jnp.int32)
  return jnp.sum(valid, axis=-1)


class TextModel(nn.Module):
  """Token embedding, scanned decoder layers, final norm and the lm_head (tied to the
  embedding when the config says so). The thinker embeds tokens, scatters media features
  in, then runs the decoder and the head."""
  config: TextConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  remat: str = 'none'
  attention: str = 'xla'          # see ThinkerConfig.attention

  def setup(self):
    c = self.config
    self.embed_tokens = nn.Embed(
        c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                    ('vocab', 'embed')))
    stack = layers.layer_stack(DecoderLayer, c.num_hidden_layers, self.remat, broadcast_args=3)
    self.layers = stack(c, self.dtype, self.param_dtype, self.attention)
    self.norm = layers.RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype)
    if not c.tie_word_embeddings:
      self.lm_head = layers.dense(c.vocab_size, ('embed', 'vocab'), use_bias=False,
                                  dtype=self.dtype, param_dtype=self.param_dtype, name='lm_head')

  def embed(self, input_ids):
    return self.embed_tokens(input_ids)

  def __call__(self, x, position_ids, valid, segments=None):
    """x [B, L, H] embeddings, position_ids [3, B, L], valid bool [B, L] (False at padding),
    optional segments int [B, L] (see `segment_mask`) -> hidden [B, L, H]."""
    c = self.config
    cos, sin = mrope_cos_sin(position_ids, c.head_dim, c.rope_theta, c.mrope_section, self.dtype)
    mask = _attention_arg(self.attention, valid, segments)
    x, _ = self.layers(x.astype(self.dtype), cos, sin, mask)
    return self.norm(x)

  def decode(self, x, position_ids, mask, cache: KVCache, cache_index):
    """The decoder layers over new embeddings with a KV cache of the earlier slots.

    x [B, T, H] fills slots [cache_index, cache_index + T) of the cache [layers, B, S, K, H];
    position_ids [3, B, T]; mask bool [B, 1, T, S] (`cache_attention_mask`). T is the prompt
    at prefill and 1 per decoding step. Returns (hidden [B, T, H] after the final norm,
    updated cache). Same params and layer code as `__call__`, applied layer by layer.
    """
    c = self.config
    cos, sin = mrope_cos_sin(position_ids, c.head_dim, c.rope_theta, c.mrope_section, self.dtype)
    layer = DecoderLayer(c, self.dtype, self.param_dtype, parent=None)

    def one_layer(x, params_and_cache):
      params, layer_cache = params_and_cache
      return layer.apply({'params': params}, x, cos, sin, mask, layer_cache, cache_index)

    stacked = nn.unbox(self.layers.variables['params'])       # every leaf [layers, ...]
    x, new_rows = jax.lax.scan(one_layer, x.astype(self.dtype), (stacked, cache))
    # The layers only read the cache; their new rows [layers, B, T, K, H] go in with one
    # write, in place when the cache is a loop carry. (Scanning the cache out as per-layer
    # outputs copied all of it every step: 1.5x slower decode layers, measured on CPU.)
    return self.norm(x), cache.write(new_rows, cache_index, axis=2)

  def logits(self, hidden):
    """hidden [B, L, H] -> logits [B, L, V] in the compute dtype."""
    if self.config.tie_word_embeddings:
      return self.embed_tokens.attend(hidden)
    return self.lm_head(hidden)


CHECKPOINT_RULES = [
    (r'embed_tokens\.weight', 'embed_tokens/embedding', None),
    (r'norm\.weight', 'norm/scale', None),
    (r'lm_head\.weight', 'lm_head/kernel', layers.LINEAR),
    *[(rf'layers\.(?P<layer>\d+)\.self_attn\.{p}\.{k}', f'layers/self_attn/{p}/{f}', perm)
      for p in ('q_proj', 'k_proj', 'v_proj')
      for k, f, perm in (('weight', 'kernel', layers.LINEAR), ('bias', 'bias', None))],
    (r'layers\.(?P<layer>\d+)\.self_attn\.o_proj\.weight', 'layers/self_attn/o_proj/kernel',
     layers.LINEAR),
    *[(rf'layers\.(?P<layer>\d+)\.mlp\.{p}\.weight', f'layers/mlp/{p}/kernel', layers.LINEAR)
      for p in ('gate_proj', 'up_proj', 'down_proj')],
    *[(rf'layers\.(?P<layer>\d+)\.{n}\.weight', f'layers/{n}/scale', None)
      for n in ('input_layernorm', 'post_attention_layernorm')],
]
