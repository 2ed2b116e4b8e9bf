"""The Qwen2 decoder of the thinker: GQA attention with q/k/v biases and multimodal RoPE,
SwiGLU MLP, RMSNorm, layers scanned with `nn.scan`."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from saber_jax.models import layers
from saber_jax.models.config import TextConfig
from saber_jax.models.rope import apply_rope, mrope_cos_sin


class Attention(nn.Module):
  config: TextConfig
  dtype: layers.Dtype
  param_dtype: layers.Dtype

  @nn.compact
  def __call__(self, x, cos, sin, mask):
    c = self.config
    b, length, _ = x.shape
    hd = c.head_dim
    proj = lambda n, axis, name: layers.dense(n * hd, ('embed', axis), use_bias=True,
                                               dtype=self.dtype, param_dtype=self.param_dtype,
                                               name=name)(x).reshape(b, length, n, hd)
    q = proj(c.num_attention_heads, 'heads', 'q_proj')
    k = proj(c.num_key_value_heads, 'kv_heads', 'k_proj')
    v = proj(c.num_key_value_heads, 'kv_heads', 'v_proj')
    out = layers.attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, mask)
    return layers.dense(c.hidden_size, ('heads', 'embed'), use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, name='o_proj')(out.reshape(b, length, -1))


class MLP(nn.Module):
  config: TextConfig
  dtype: layers.Dtype
  param_dtype: layers.Dtype

  @nn.compact
  def __call__(self, x):
    c = self.config
    dense = lambda n, axes, name: layers.dense(n, axes, use_bias=False, dtype=self.dtype,
                                               param_dtype=self.param_dtype, name=name)
    hidden = (jax.nn.silu(dense(c.intermediate_size, ('embed', 'mlp'), 'gate_proj')(x))
              * dense(c.intermediate_size, ('embed', 'mlp'), 'up_proj')(x))
    return dense(c.hidden_size, ('mlp', 'embed'), 'down_proj')(hidden)


class DecoderLayer(nn.Module):
  config: TextConfig
  dtype: layers.Dtype
  param_dtype: layers.Dtype

  @nn.compact
  def __call__(self, x, cos, sin, mask):
    norm = lambda name: layers.RMSNorm(self.config.rms_norm_eps, self.dtype, self.param_dtype,
                                       name=name)
    kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
    x = x + Attention(**kw, name='self_attn')(norm('input_layernorm')(x), cos, sin, mask)
    x = x + MLP(**kw, name='mlp')(norm('post_attention_layernorm')(x))
    return x, None


def attention_mask(attention_mask):
  """bool [B, 1, L, L]: causal, and keys limited to valid (non-padding) tokens."""
  length = attention_mask.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), bool))
  return causal[None, None] & attention_mask[:, None, None, :].astype(bool)


class TextModel(nn.Module):
  """Token embedding, scanned decoder layers, final norm and the lm_head (tied to the
  embedding when the config says so). The thinker embeds tokens, scatters media features
  in, then runs the decoder and the head."""
  config: TextConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  remat: str = 'none'

  def setup(self):
    c = self.config
    self.embed_tokens = nn.Embed(
        c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                    ('vocab', 'embed')))
    stack = layers.layer_stack(DecoderLayer, c.num_hidden_layers, self.remat, broadcast_args=3)
    self.layers = stack(c, self.dtype, self.param_dtype)
    self.norm = layers.RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype)
    if not c.tie_word_embeddings:
      self.lm_head = layers.dense(c.vocab_size, ('embed', 'vocab'), use_bias=False,
                                  dtype=self.dtype, param_dtype=self.param_dtype, name='lm_head')

  def embed(self, input_ids):
    return self.embed_tokens(input_ids)

  def __call__(self, x, position_ids, mask):
    """x [B, L, H] embeddings, position_ids [3, B, L], mask bool [B, 1, L, S] -> hidden [B, L, H]."""
    c = self.config
    cos, sin = mrope_cos_sin(position_ids, c.head_dim, c.rope_theta, c.mrope_section, self.dtype)
    x, _ = self.layers(x.astype(self.dtype), cos, sin, mask)
    return self.norm(x)

  def logits(self, hidden):
    """hidden [B, L, H] -> logits [B, L, V] in the compute dtype."""
    if self.config.tie_word_embeddings:
      return self.embed_tokens.attend(hidden)
    return self.lm_head(hidden)


CHECKPOINT_RULES = [
    (r'embed_tokens\.weight', 'embed_tokens/embedding', None),
    (r'norm\.weight', 'norm/scale', None),
    (r'lm_head\.weight', 'lm_head/kernel', (1, 0)),
    *[(rf'layers\.(?P<layer>\d+)\.self_attn\.{p}\.{k}', f'layers/self_attn/{p}/{f}', perm)
      for p in ('q_proj', 'k_proj', 'v_proj')
      for k, f, perm in (('weight', 'kernel', (1, 0)), ('bias', 'bias', None))],
    (r'layers\.(?P<layer>\d+)\.self_attn\.o_proj\.weight', 'layers/self_attn/o_proj/kernel', (1, 0)),
    *[(rf'layers\.(?P<layer>\d+)\.mlp\.{p}\.weight', f'layers/mlp/{p}/kernel', (1, 0))
      for p in ('gate_proj', 'up_proj', 'down_proj')],
    *[(rf'layers\.(?P<layer>\d+)\.{n}\.weight', f'layers/{n}/scale', None)
      for n in ('input_layernorm', 'post_attention_layernorm')],
]
