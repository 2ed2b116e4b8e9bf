"""TMRoPE position ids on the host (numpy), and the multimodal rotary embedding.

`rope_index` mirrors `get_rope_index` of transformers' Qwen2.5-Omni (5.24): text runs get
consecutive positions on all three axes, image/video tokens (t, h, w) grid positions with
time in units of 1/25 s, audio tokens consecutive positions, and a video with its audio
interleaved in 2 s chunks. The cursor after each block is that block's max + 1, as there.
"""

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from saber_jax.models.audio import audio_token_count
from saber_jax.models.config import ThinkerConfig
from saber_jax.models.layers import rotate_half


def chunk_bounds(values: np.ndarray, per_chunk: int, offset: int) -> list[tuple[int, int]]:
  """[start, end) slices of a non-decreasing position list, cut where value - offset reaches
  the next multiple of `per_chunk` (one cut per token, as transformers' get_chunked_index)."""
  bounds, start, chunk = [], 0, 1
  for i, value in enumerate(values):
    if value - offset >= chunk * per_chunk:
      bounds.append((start, i))
      start, chunk = i, chunk + 1
  return bounds + [(start, len(values))]


def _grid_positions(grid_thw, merge: int, t_index: np.ndarray, start: int) -> np.ndarray:
  """[3, t*h*w/merge^2] positions of a vision grid: (t, h, w) per merged patch + start."""
  h, w = int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
  t = np.repeat(t_index, h * w)
  hh = np.tile(np.repeat(np.arange(h), w), len(t_index))
  ww = np.tile(np.arange(w), len(t_index) * h)
  return np.stack([t, hh, ww]) + start


def _video_time_index(grid_t: int, second_per_grid: float, per_second: int) -> np.ndarray:
  # float32 product truncated to int, as `(arange * second_per_grid.float() * 25).long()`.
  t = np.arange(grid_t, dtype=np.float32) * np.float32(second_per_grid) * np.float32(per_second)
  return t.astype(np.int64)


class _Media:
  """The grids and audio lengths of a batch, consumed in appearance order across rows."""

  def __init__(self, image_grid_thw, video_grid_thw, second_per_grid, audio_lengths):
    self.images = [] if image_grid_thw is None else list(np.asarray(image_grid_thw))
    self.videos = [] if video_grid_thw is None else list(np.asarray(video_grid_thw))
    self.seconds = ([1.0] * len(self.videos) if second_per_grid is None
                    else list(np.asarray(second_per_grid, np.float32).reshape(-1)))
    self.audios = [] if audio_lengths is None else list(np.asarray(audio_lengths))
    self.used = dict(image=0, video=0, audio=0)

  def take(self, kind: str, row: int):
    items = dict(image=self.images, video=self.videos, audio=self.audios)[kind]
    i = self.used[kind]
    if i >= len(items):
      raise ValueError(f'row {row}: more {kind} placeholders than {kind} inputs ({len(items)})')
    self.used[kind] += 1
    return i, items[i]


def _row_positions(tokens: np.ndarray, config: ThinkerConfig, media: _Media, row: int,
                   use_audio_in_video: bool) -> np.ndarray:
  """[3, len(tokens)] TMRoPE positions of one unpadded row."""
  c = config
  merge = c.vision.spatial_merge_size
  blocks: list[np.ndarray] = []

  def cursor() -> int:
    return int(blocks[-1].max()) + 1 if blocks else 0

  def run(n: int):                       # n consecutive positions on all three axes
    if n:
      blocks.append(np.broadcast_to(np.arange(n) + cursor(), (3, n)))

  def expect(start: int, n: int, token: int, what: str):
    if not np.all(tokens[start:start + n] == token):
      raise ValueError(f'row {row}: expected {n} {what} tokens at position {start}')

  i, text_start, n_tokens = 0, 0, len(tokens)
  while i < n_tokens:
    nxt = tokens[i + 1] if i + 1 < n_tokens else None
    tok = tokens[i]
    if tok == c.audio_start_token_id and nxt == c.audio_token_id:
      run(i - text_start)
      _, frames = media.take('audio', row)
      n = int(audio_token_count(frames))
      expect(i + 1, n, c.audio_token_id, 'audio')
      expect(i + 1 + n, 1, c.audio_end_token_id, '<|audio_eos|>')
      run(1)
      run(n)
      run(1)
      i += n + 2
    elif tok == c.vision_start_token_id and nxt in (c.image_token_id, c.video_token_id):
      run(i - text_start)
      run(1)
      if nxt == c.image_token_id:
        _, grid = media.take('image', row)
        t_index = np.arange(int(grid[0])) * c.position_id_per_seconds
      else:
        v, grid = media.take('video', row)
        t_index = _video_time_index(int(grid[0]), media.seconds[v], c.position_id_per_seconds)
      block = _grid_positions(grid, merge, t_index, cursor())
      n = block.shape[1]
      expect(i + 1, n, nxt, 'image' if nxt == c.image_token_id else 'video')
      blocks.append(block)
      run(1)
      i += n + 2
    elif (use_audio_in_video and tok == c.vision_start_token_id
          and nxt == c.audio_start_token_id):
      run(i - text_start)
      start = cursor()                   # <|vision_bos|> and <|audio_bos|> share a position
      blocks += [np.full((3, 1), start), np.full((3, 1), start)]
      v, grid = media.take('video', row)
      _, frames = media.take('audio', row)
      t_index = _video_time_index(int(grid[0]), media.seconds[v], c.position_id_per_seconds)
      video = _grid_positions(grid, merge, t_index, start + 1)
      audio = np.broadcast_to(np.arange(int(audio_token_count(frames))) + start + 1,
                              (3, int(audio_token_count(frames))))
      per_chunk = c.position_id_per_seconds * c.seconds_per_chunk
      video_chunks = chunk_bounds(video[0], per_chunk, start + 1)
      audio_chunks = chunk_bounds(audio[0], per_chunk, start + 1)
      j = i + 2
      for k in range(max(len(video_chunks), len(audio_chunks))):
        for chunks, positions, token, what in ((video_chunks, video, c.video_token_id, 'video'),
                                               (audio_chunks, audio, c.audio_token_id, 'audio')):
          if k < len(chunks):
            a, b = chunks[k]
            expect(j, b - a, token, what)
            blocks.append(positions[:, a:b])
            j += b - a
      expect(j, 1, c.audio_end_token_id, '<|audio_eos|>')
      expect(j + 1, 1, c.vision_end_token_id, '<|vision_eos|>')
      end = cursor()                     # <|audio_eos|> and <|vision_eos|> share one too
      blocks += [np.full((3, 1), end), np.full((3, 1), end)]
      i = j + 2
    else:
      i += 1
      continue
    text_start = i
  run(n_tokens - text_start)
  return np.concatenate(blocks, axis=1) if blocks else np.zeros((3, 0), np.int64)


def rope_index(config: ThinkerConfig, batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """TMRoPE `(position_ids int64 [3, B, L], rope_deltas int64 [B])` of a processor batch.

  Reads `input_ids`, `attention_mask` (all ones when absent; left or right padding),
  `image_grid_thw`, `video_grid_thw`, `video_second_per_grid`, `feature_attention_mask`
  and `use_audio_in_video`. Padded slots get position 1. For decoding, a new token's
  position is (valid tokens so far) + rope_deltas on all three axes.
  """
  input_ids = np.asarray(batch['input_ids'])
  mask = batch.get('attention_mask')
  mask = np.ones_like(input_ids, bool) if mask is None else np.asarray(mask) == 1
  image_grid, video_grid = batch.get('image_grid_thw'), batch.get('video_grid_thw')
  if image_grid is None and video_grid is None:
    # Text (and audio-only) rows: running count of valid tokens, as transformers does.
    positions = np.where(mask, np.cumsum(mask, -1) - 1, 1)
    deltas = positions.max(-1) + 1 - mask.sum(-1)
    return np.broadcast_to(positions, (3,) + positions.shape).astype(np.int64), deltas
  feature_mask = batch.get('feature_attention_mask')
  media = _Media(image_grid, video_grid, batch.get('video_second_per_grid'),
                 None if feature_mask is None else np.asarray(feature_mask).sum(-1))
  position_ids = np.ones((3,) + input_ids.shape, np.int64)
  deltas = np.zeros(input_ids.shape[0], np.int64)
  for row, (ids, valid) in enumerate(zip(input_ids, mask)):
    positions = _row_positions(ids[valid], config, media, row,
                               bool(batch.get('use_audio_in_video', False)))
    position_ids[:, row, valid] = positions
    deltas[row] = positions.max() + 1 - valid.sum()
  return position_ids, deltas


def shared_prefix_positions(position_ids: np.ndarray, segments: np.ndarray,
                            prefix: int = 1) -> np.ndarray:
  """Position ids [3, B, L] of rows holding several segments (ids [B, L], 0 padding, see
  `text.segment_mask`), from `rope_index` of the whole row: every segment other than the
  shared prefix is moved to start where the first of them starts, i.e. where it would
  start if it alone followed the prefix. The rejected answer of a `[prompt | chosen |
  rejected]` row thus gets the positions it has in a `[prompt | rejected]` row.
  (Segments after the first are text; a move keeps their positions consecutive.)"""
  out = np.array(position_ids, copy=True)
  for row, seg in enumerate(np.asarray(segments)):
    others = np.flatnonzero((seg > 0) & (seg != prefix))
    if not len(others):
      continue
    start = out[:, row, others[0]]
    for s in np.unique(seg[others]):
      tokens = np.flatnonzero(seg == s)
      out[:, row, tokens] += (start - out[:, row, tokens[0]])[:, None]
  return out


def mrope_cos_sin(position_ids, head_dim: int, theta: float, section: tuple[int, ...], dtype):
  """cos, sin [B, L, head_dim] of multimodal RoPE from position_ids [3, B, L]: the rotary
  pairs of `mrope_section` block s take their angle from axis (T, H, W)[s % 3], as
  Qwen2_5OmniRotaryEmbedding; computed in fp32, cast to the activation dtype."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq       # [3, B, L, hd/2]
  bounds = np.cumsum((0,) + tuple(section))
  freqs = jnp.concatenate([freqs[s % 3, ..., bounds[s]:bounds[s + 1]]
                           for s in range(len(section))], axis=-1)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x, cos, sin):
  """x [B, L, N, H] rotated by cos/sin [B, L, H] (half-split rotate_half convention)."""
  return x * cos[:, :, None, :] + rotate_half(x) * sin[:, :, None, :]
