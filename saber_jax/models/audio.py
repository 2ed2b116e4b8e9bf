"""The Qwen2.5-Omni audio encoder (Whisper-style), mirroring transformers'
`Qwen2_5OmniAudioEncoder`.

The reference splits every clip's valid mel frames into chunks of `2 * n_window` frames,
runs the convolutions per chunk, attends only within each chunk (block-diagonal over the
packed sequence), then average-pools pairs of tokens within each clip. Here the host
(`audio_inputs`, numpy) does all the data-dependent bookkeeping — chunking, padding and the
pooling indices — so the module sees fixed shapes only: chunks are a batch [C, M, 2W]
(W = n_window), attention is batched over chunks with a key-padding mask, and pooling is a
gather by `pool_index` into the flattened [C * W] post-conv sequence.
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from saber_jax.models import layers
from saber_jax.models.config import AudioConfig

LAYER_NORM_EPS = 1e-5          # torch nn.LayerNorm default, used throughout the tower
_CONV_KERNEL = (2, 1, 0)       # torch Conv1d [out, in, k] -> flax Conv [k, in, out]


def audio_token_count(num_frames):
  """Number of `<|AUDIO|>` tokens of a clip with `num_frames` valid mel frames (int or array).

  Mirrors `_get_feat_extract_output_lengths`: stride-2 conv, then stride-2 pooling that drops
  an odd last token.
  """
  after_conv = (num_frames - 1) // 2 + 1
  return (after_conv - 2) // 2 + 1


def _post_conv_length(chunk_length):
  """Tokens that conv2 (k3, s2, p1) makes of `chunk_length` frames; 0 for an empty chunk."""
  return (chunk_length + 1) // 2


def audio_inputs(config: AudioConfig, input_features: np.ndarray,
                 feature_attention_mask: np.ndarray, *, num_chunks: int | None = None,
                 num_tokens: int | None = None) -> dict[str, np.ndarray]:
  """Host-side chunking and pooling indices for `AudioEncoder` (numpy, no JAX).

  Args:
    input_features: [A, M, T] log-mel features of A clips (the processor's output).
    feature_attention_mask: [A, T], nonzero at each clip's valid frames.
    num_chunks, num_tokens: padded sizes C and N (a bucket); default: exactly what is needed.

  Returns a dict:
    chunks          [C, M, 2W]  each clip's valid frames cut into chunks of 2W = 2 * n_window
                                frames (the last one holds the remainder), zero-padded; clip
                                order, padding chunks at the end.
    chunk_lengths   int32 [C]   valid frames per chunk, 0 for padding chunks.
    pool_index      int32 [N, 2] for each output token the two post-conv positions it averages,
                                as indices into the flattened [C * W] post-conv sequence.
    token_mask      bool [N]    False for padding tokens (their rows of the output are junk).
  Output tokens come in clip order, `audio_token_count(L_i)` per clip: the order in which the
  thinker scatters them into the `<|AUDIO|>` placeholders.
  """
  features = np.asarray(input_features)
  mask = np.asarray(feature_attention_mask)
  if features.ndim != 3 or features.shape[1] != config.num_mel_bins:
    raise ValueError(f'input_features: expected [clips, {config.num_mel_bins} mel bins, frames], '
                     f'got shape {features.shape}')
  if mask.shape != (features.shape[0], features.shape[2]):
    raise ValueError('feature_attention_mask: expected shape '
                     f'{(features.shape[0], features.shape[2])} '
                     f'to match input_features {features.shape}, got {mask.shape}')
  window = 2 * config.n_window
  per_chunk = config.n_window                  # post-conv tokens of a full chunk
  chunks, chunk_lengths, pairs = [], [], []
  for clip, (clip_features, valid) in enumerate(zip(features, mask.astype(bool))):
    frames = clip_features[:, valid]           # like the reference: the masked frames, in order
    num_frames = frames.shape[1]
    if num_frames == 0:
      raise ValueError(f'feature_attention_mask: audio clip {clip} has no valid frames')
    positions = []                             # the clip's post-conv sequence, as flat indices
    for start in range(0, num_frames, window):
      length = min(window, num_frames - start)
      chunk = np.zeros((config.num_mel_bins, window), features.dtype)
      chunk[:, :length] = frames[:, start:start + length]
      positions.append(len(chunks) * per_chunk + np.arange(_post_conv_length(length)))
      chunks.append(chunk)
      chunk_lengths.append(length)
    positions = np.concatenate(positions)
    count = audio_token_count(num_frames)
    # Pairs run over the clip's whole post-conv sequence, so with an odd chunk length a pair
    # may straddle two chunks; an odd last token is dropped (mirrors get_pool_indices).
    pairs.append(positions[:2 * count].reshape(count, 2))

  num_chunks = _padded_size('num_chunks', len(chunks), num_chunks)
  num_valid_tokens = sum(len(p) for p in pairs)
  num_tokens = _padded_size('num_tokens', num_valid_tokens, num_tokens)
  out_chunks = np.zeros((num_chunks, config.num_mel_bins, window), features.dtype)
  if chunks:
    out_chunks[:len(chunks)] = np.stack(chunks)
  out_lengths = np.zeros((num_chunks,), np.int32)
  out_lengths[:len(chunk_lengths)] = chunk_lengths
  pool_index = np.zeros((num_tokens, 2), np.int32)   # padding tokens read position 0: finite junk
  if pairs:
    pool_index[:num_valid_tokens] = np.concatenate(pairs)
  token_mask = np.arange(num_tokens) < num_valid_tokens
  return dict(chunks=out_chunks, chunk_lengths=out_lengths, pool_index=pool_index,
              token_mask=token_mask)


def _padded_size(name: str, needed: int, requested: int | None) -> int:
  if requested is None:
    return needed
  if requested < needed:
    raise ValueError(f'{name}={requested} is too small: these clips need {needed}')
  return requested


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
  """[length, channels] float32 table concat(sin(t * inv), cos(t * inv)), a constant.

  Mirrors `SinusoidsPositionEmbedding` (inv = exp(-ln(max_timescale) / (channels/2 - 1) * i),
  float32 inverse timescales and angles); exp/sin/cos are evaluated in float64 and rounded,
  which matches torch's float32 table to ~1 ulp.
  """
  if channels % 2:
    raise ValueError(f'sinusoidal positions need an even width, got d_model={channels}')
  increment = np.float32(-np.log(max_timescale) / (channels // 2 - 1))
  arguments = increment * np.arange(channels // 2, dtype=np.float32)
  inv_timescales = np.exp(arguments.astype(np.float64)).astype(np.float32)
  angles = (np.arange(length, dtype=np.float32)[:, None] * inv_timescales[None]).astype(np.float64)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def _conv(features: int, stride: int, dtype, param_dtype, name: str) -> nn.Conv:
  """Conv1d k3 p1 over [C, frames, channels]; zero padding at each chunk's own edges."""
  return nn.Conv(features, kernel_size=(3,), strides=(stride,), padding=((1, 1),), dtype=dtype,
                 param_dtype=param_dtype, name=name,
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                          (None, None, 'audio_embed')),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('audio_embed',)))


class AudioModule(nn.Module):
  """The fields every audio-tower module takes: its config and compute / storage dtypes."""
  config: AudioConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32


class AudioAttention(AudioModule):
  """Multi-head attention within each chunk (`Qwen2_5OmniAudioAttention`); k_proj has no bias."""

  @nn.compact
  def __call__(self, x, key_mask):
    """x [C, W, D]; key_mask bool [C, 1, 1, W] -> [C, W, D]."""
    cfg = self.config
    heads = cfg.encoder_attention_heads
    head_dim = cfg.d_model // heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    split = lambda t: t.reshape(*t.shape[:-1], heads, head_dim)
    proj = lambda name, bias=True: layers.dense(cfg.d_model, ('audio_embed', 'audio_heads'),
                                                use_bias=bias, name=name, **kw)
    q, k, v = (split(proj(name, bias)(x)) for name, bias in
               (('q_proj', True), ('k_proj', False), ('v_proj', True)))
    out = layers.attention(q, k, v, key_mask)
    out = out.reshape(*out.shape[:-2], cfg.d_model)
    return layers.dense(cfg.d_model, ('audio_heads', 'audio_embed'), use_bias=True,
                        name='out_proj', **kw)(out)


class AudioEncoderLayer(AudioModule):
  """Pre-LN transformer layer (`Qwen2_5OmniAudioEncoderLayer`), shaped for `layers.layer_stack`."""

  @nn.compact
  def __call__(self, x, key_mask):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.layer_norm(LAYER_NORM_EPS, name='self_attn_layer_norm', **kw)(x)
    x = x + AudioAttention(cfg, name='self_attn', **kw)(h, key_mask)
    h = layers.layer_norm(LAYER_NORM_EPS, name='final_layer_norm', **kw)(x)
    h = layers.dense(cfg.encoder_ffn_dim, ('audio_embed', 'audio_mlp'), use_bias=True, name='fc1',
                     **kw)(h)
    h = layers.dense(cfg.d_model, ('audio_mlp', 'audio_embed'), use_bias=True, name='fc2',
                     **kw)(layers.gelu(h))
    x = x + h
    if x.dtype == jnp.float16:                 # the reference clamps fp16 activations only
      bound = jnp.finfo(jnp.float16).max - 1000
      x = jnp.clip(x, -bound, bound)
    return x, None


class AudioEncoder(AudioModule):
  """Qwen2.5-Omni audio tower: mel chunks -> [N, output_dim] `<|AUDIO|>` embeddings.

  Call with the arrays of `audio_inputs` as keyword arguments (all but `token_mask`):
  `AudioEncoder(cfg)(chunks=..., chunk_lengths=..., pool_index=...)`.
  """
  remat: str = 'none'

  @nn.compact
  def __call__(self, chunks, chunk_lengths, pool_index):
    """chunks [C, M, 2W]; chunk_lengths int [C]; pool_index int [N, 2] -> [N, output_dim]."""
    cfg = self.config
    window = 2 * cfg.n_window
    if tuple(chunks.shape[1:]) != (cfg.num_mel_bins, window):
      raise ValueError(f'chunks: expected [C, {cfg.num_mel_bins}, {window}], got {chunks.shape}')
    if cfg.n_window > cfg.max_source_positions:
      raise ValueError(f'n_window={cfg.n_window} exceeds '
                       f'max_source_positions={cfg.max_source_positions}')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # Unused in the forward pass; kept so checkpoints round-trip.
    self.param('audio_bos_eos_token',
               nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, 'embed')),
               (2, cfg.output_dim), self.param_dtype)

    # Zero the frames past each chunk's length before conv1 and zero conv1's output there
    # before conv2, as the reference's zero-padded chunks and `padded_mask` do: every valid
    # output then sees exactly the zero padding at its chunk's own edge.
    frame_valid = (jnp.arange(window)[None, :] < chunk_lengths[:, None])[..., None]   # [C, 2W, 1]
    x = jnp.where(frame_valid, jnp.swapaxes(chunks, 1, 2).astype(self.dtype), 0)     # [C, 2W, M]
    x = layers.gelu(_conv(cfg.d_model, 1, name='conv1', **kw)(x))
    x = jnp.where(frame_valid, x, 0)
    x = layers.gelu(_conv(cfg.d_model, 2, name='conv2', **kw)(x))                    # [C, W, D]
    x = x + jnp.asarray(sinusoids(x.shape[1], cfg.d_model), x.dtype)   # restarts at 0 per chunk

    positions = jnp.arange(x.shape[1])[None, :]
    key_valid = positions < _post_conv_length(chunk_lengths)[:, None]
    # Padding chunks have no valid key; letting them see key 0 keeps their (unused) rows finite.
    key_valid = key_valid | (positions == 0)
    stack = layers.layer_stack(AudioEncoderLayer, cfg.encoder_layers, self.remat, broadcast_args=1)
    x, _ = stack(cfg, name='layers', **kw)(x, key_valid[:, None, None, :])

    flat = x.reshape(-1, cfg.d_model)                                  # [C * W, D]
    x = (flat[pool_index[:, 0]] + flat[pool_index[:, 1]]) / 2         # AvgPool1d(2, 2) per clip
    x = layers.layer_norm(LAYER_NORM_EPS, name='ln_post', **kw)(x)
    return layers.dense(cfg.output_dim, ('audio_embed', 'embed'), use_bias=True, name='proj',
                        **kw)(x)


Rule = layers.Rule
_linear = layers.linear_rules


def _norm(torch_name: str, path: str) -> list[Rule]:
  return [(torch_name + r'\.weight', path + '/scale', None),
          (torch_name + r'\.bias', path + '/bias', None)]


_LAYER = r'layers\.(?P<layer>\d+)\.'

# Tensor names inside the HF tower's state_dict (after 'audio_tower.') -> param paths.
CHECKPOINT_RULES: list[Rule] = [
    (r'conv1\.weight', 'conv1/kernel', _CONV_KERNEL),
    (r'conv1\.bias', 'conv1/bias', None),
    (r'conv2\.weight', 'conv2/kernel', _CONV_KERNEL),
    (r'conv2\.bias', 'conv2/bias', None),
    (r'audio_bos_eos_token\.weight', 'audio_bos_eos_token', None),
    *_norm(_LAYER + r'self_attn_layer_norm', 'layers/self_attn_layer_norm'),
    *_linear(_LAYER + r'self_attn\.q_proj', 'layers/self_attn/q_proj'),
    *_linear(_LAYER + r'self_attn\.k_proj', 'layers/self_attn/k_proj', bias=False),
    *_linear(_LAYER + r'self_attn\.v_proj', 'layers/self_attn/v_proj'),
    *_linear(_LAYER + r'self_attn\.out_proj', 'layers/self_attn/out_proj'),
    *_norm(_LAYER + r'final_layer_norm', 'layers/final_layer_norm'),
    *_linear(_LAYER + r'fc1', 'layers/fc1'),
    *_linear(_LAYER + r'fc2', 'layers/fc2'),
    *_norm(r'ln_post', 'ln_post'),
    *_linear(r'proj', 'proj'),
]
