"""The Qwen2.5-Omni thinker: audio and vision features scattered into the token embeddings
at their placeholders, then the Qwen2 decoder and the head.

Host side, `model_inputs` turns a processor-style batch (dict of numpy arrays) into the
fixed-shape arrays the jitted forward needs: TMRoPE position ids, the towers' chunk/window
tables and, for every feature row, the flat [B * L] slot it fills. `stack_shards` joins
the inputs of several data shards into one batch.
"""

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from saber_jax.batch import split_axis
from saber_jax.models import audio as audio_lib
from saber_jax.models import layers
from saber_jax.models import vision as vision_lib
from saber_jax.models.config import ThinkerConfig
from saber_jax.models.rope import rope_index, shared_prefix_positions
from saber_jax.models.text import TextModel


class Thinker(nn.Module):
  config: ThinkerConfig

  def setup(self):
    c = self.config
    kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype), remat=c.remat)
    self.audio = audio_lib.AudioEncoder(c.audio, **kw)
    self.vision = vision_lib.VisionEncoder(c.vision, **kw)
    self.text = TextModel(c.text, **kw, attention=c.attention)

  def __call__(self, inputs: Mapping[str, Any]):
    """Hidden states [B, L, H] of the `model_inputs` arrays."""
    return self.text(self.embed(inputs), inputs['position_ids'], inputs['attention_mask'],
                     inputs.get('attention_segments'))

  def embed(self, inputs: Mapping[str, Any]):
    """Token embeddings [B, L, H] with the audio and vision features at their placeholders.

    Media arrays carry a leading data-shard axis S: shard s holds the media of rows
    [s * B / S, (s + 1) * B / S) with indices local to those rows, so under data
    parallelism each device encodes its own rows' media and scatters them locally.
    """
    x = self.text.embed(inputs['input_ids'])
    batch, length, width = x.shape
    for name, tower in (('audio', self.audio), ('vision', self.vision)):
      if name in inputs:
        media = dict(inputs[name])
        slots = media.pop('slots')                                   # [S, N]
        features = nn.vmap(lambda module, m: module(**m), variable_axes={'params': None},
                           split_rngs={'params': False})(tower, media)  # [S, N, H]
        x = x.reshape(slots.shape[0], -1, width)
        # Feature rows whose slot is one past the shard's end (padding) are dropped.
        x = jax.vmap(lambda xs, s, f: xs.at[s].set(f.astype(xs.dtype), mode='drop'))(
            x, slots, features)
    return x.reshape(batch, length, width)

  def logits(self, hidden):
    return self.text.logits(hidden)


def _placeholders(input_ids: np.ndarray, token_id: int, count: int, what: str) -> np.ndarray:
  """Flat [B * L] positions of the `count` placeholder tokens of one kind, in token order."""
  positions = np.flatnonzero(input_ids.reshape(-1) == token_id)
  if len(positions) != count:
    raise ValueError(f'{len(positions)} {what} placeholder tokens, but the {what} inputs '
                     f'give {count} features')
  return positions


def _slots(valid: np.ndarray, positions: np.ndarray, size: int) -> np.ndarray:
  """For each feature row, the flat slot it fills; padding rows get `size` (dropped)."""
  slots = np.full(valid.shape, size, np.int32)
  slots[valid] = positions
  return slots


def _check_padding_for_attention(config: ThinkerConfig, mask: np.ndarray):
  """The 'cudnn' decoder attention knows each row by its length: padding must be at the end."""
  if config.attention not in layers.ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f'unknown attention {config.attention!r}; expected one of '
                     f'{layers.ATTENTION_IMPLEMENTATIONS}')
  if config.attention in ('xla', 'splash'):
    return
  valid = mask.astype(bool)
  prefix = np.arange(valid.shape[-1]) < valid.sum(-1, keepdims=True)
  bad = np.flatnonzero(np.any(valid != prefix, axis=-1))
  if bad.size:
    raise ValueError(f'attention={config.attention!r} needs right-padded rows (padding only at '
                     f'the end); rows {bad.tolist()} are not. Use attention="xla" for them.')


def model_inputs(config: ThinkerConfig, batch: Mapping[str, Any], *,
                 num_audio_chunks: int | None = None, num_audio_tokens: int | None = None,
                 num_patches: int | None = None, **vision_sizes: int) -> dict[str, Any]:
  """Host-side arrays of the jitted forward from a processor-style batch (see
  `thinker_logits`). The optional sizes pad the towers' inputs to fixed buckets:
  `num_audio_chunks` / `num_audio_tokens` (see `audio.audio_inputs`), `num_patches` and
  `vision_sizes` (`num_windows`, `window_len`, `num_frames`, `frame_len`; see
  `vision.vision_inputs`)."""
  input_ids = np.asarray(batch['input_ids'])
  mask = batch.get('attention_mask')
  mask = np.ones_like(input_ids) if mask is None else np.asarray(mask)
  _check_padding_for_attention(config, mask)
  segments = batch.get('attention_segments')
  position_ids = batch.get('position_ids')
  if position_ids is None:
    position_ids, _ = rope_index(config, {**batch, 'attention_mask': mask})
    if segments is not None:
      position_ids = shared_prefix_positions(position_ids, np.asarray(segments))
  inputs = dict(input_ids=input_ids.astype(np.int32), attention_mask=mask.astype(bool),
                position_ids=np.asarray(position_ids, np.int32))
  if segments is not None:
    inputs['attention_segments'] = np.asarray(segments, np.int32)
  # With bucket sizes given, a modality is always present (empty when this batch has none)
  # so that every batch of the bucket has one structure.
  if batch.get('input_features') is not None or num_audio_chunks is not None:
    a = config.audio
    features = batch.get('input_features')
    features = (np.zeros((0, a.num_mel_bins, 0), np.float32) if features is None
                else np.asarray(features, np.float32))
    feature_mask = batch.get('feature_attention_mask')
    if feature_mask is None:
      feature_mask = np.ones(features.shape[::2], np.int32)
    audio = audio_lib.audio_inputs(a, features, np.asarray(feature_mask),
                                   num_chunks=num_audio_chunks, num_tokens=num_audio_tokens)
    valid = audio.pop('token_mask')
    positions = _placeholders(input_ids, config.audio_token_id, int(valid.sum()), 'audio')
    audio['slots'] = _slots(valid, positions, input_ids.size)
    inputs['audio'] = jax.tree.map(lambda a: a[None], audio)
  kinds = [(pixels, grid, token_id, what) for pixels, grid, token_id, what in (
      ('pixel_values', 'image_grid_thw', config.image_token_id, 'image'),
      ('pixel_values_videos', 'video_grid_thw', config.video_token_id, 'video'))
           if batch.get(pixels) is not None]
  if kinds or num_patches is not None:
    # Images and videos share one tower call; each kind fills its own placeholders in order.
    v = config.vision
    grids = [np.asarray(batch[grid], np.int64).reshape(-1, 3) for _, grid, _, _ in kinds]
    vision = vision_lib.vision_inputs(v, np.concatenate(grids or [np.zeros((0, 3), np.int64)]),
                                      num_patches=num_patches, **vision_sizes)
    pixel_values = np.concatenate([np.zeros((0, v.patch_dim), np.float32)] +
                                  [np.asarray(batch[p], np.float32) for p, _, _, _ in kinds])
    if num_patches is not None:
      pixel_values = np.pad(pixel_values, ((0, num_patches - len(pixel_values)), (0, 0)))
    merge = v.spatial_merge_size ** 2
    positions = np.concatenate([np.zeros(0, np.int64)] + [
        _placeholders(input_ids, token_id, int(g.prod(-1).sum()) // merge, what)
        for g, (_, _, token_id, what) in zip(grids, kinds)])
    vision['slots'] = _slots(vision['token_mask'], positions, input_ids.size)
    inputs['vision'] = jax.tree.map(lambda a: a[None], dict(vision, pixel_values=pixel_values))
  return inputs


def stack_shards(shards: list[dict[str, Any]]) -> dict[str, Any]:
  """One batch from the `model_inputs` of each data shard (all padded to the same sizes):
  rows concatenated, media stacked on the shard axis."""
  first = shards[0]
  out = {k: np.concatenate([s[k] for s in shards], axis=split_axis(k))
         for k in ('input_ids', 'attention_mask', 'position_ids', 'attention_segments')
         if k in first}
  for name in ('audio', 'vision'):
    if name in first:
      out[name] = {k: np.concatenate([s[name][k] for s in shards]) for k in first[name]}
  return out


@functools.partial(jax.jit, static_argnums=0)
def _forward_logits(config: ThinkerConfig, params, inputs):
  model = Thinker(config)
  hidden = model.apply({'params': params}, inputs)
  return model.apply({'params': params}, hidden, method=Thinker.logits).astype(jnp.float32)


def thinker_logits(config: ThinkerConfig, params, batch: Mapping[str, Any]) -> jax.Array:
  """float32 logits [B, L, V] of a processor-style batch.

  `batch` holds numpy arrays keyed like the Qwen2.5-Omni processor output (`input_ids`,
  `attention_mask`, `input_features`, `feature_attention_mask`, `pixel_values`,
  `image_grid_thw`, `pixel_values_videos`, `video_grid_thw`, `video_second_per_grid`,
  optional `position_ids`) and optionally `use_audio_in_video`. `params` is the thinker's
  param dict (`audio`, `vision`, `text`), as `convert.load_hf` returns it.
  """
  return _forward_logits(config, params, model_inputs(config, batch))


def dummy_inputs(config: ThinkerConfig) -> dict[str, Any]:
  """A minimal batch touching every tower, for `init` and `jax.eval_shape`."""
  c = config
  m = c.vision.spatial_merge_size
  frames = 2 * c.audio.n_window
  n_audio = int(audio_lib.audio_token_count(frames))
  ids = ([c.audio_start_token_id] + [c.audio_token_id] * n_audio + [c.audio_end_token_id,
         c.vision_start_token_id, c.image_token_id, c.vision_end_token_id])
  batch = dict(input_ids=np.array([ids]),
               input_features=np.zeros((1, c.audio.num_mel_bins, frames), np.float32),
               feature_attention_mask=np.ones((1, frames), np.int32),
               pixel_values=np.zeros((m * m, c.vision.patch_dim), np.float32),
               image_grid_thw=np.array([[1, m, m]]))
  return model_inputs(c, batch)


def init_params(config: ThinkerConfig, rng: jax.Array) -> dict:
  """Randomly initialised params (boxed with their logical axis names)."""
  return Thinker(config).init(rng, dummy_inputs(config),
                              method=lambda model, x: model.logits(model(x)))['params']


def abstract_params(config: ThinkerConfig) -> dict:
  """Shapes and dtypes of every param (boxed with logical axis names), nothing allocated."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
