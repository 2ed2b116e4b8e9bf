"""The Qwen2.5-Omni vision tower (ViT with 2D RoPE, windowed attention and a patch merger).

Mirrors transformers' `Qwen2_5OmniVisionEncoder` (5.24). Everything that depends on the
grids (the window permutation, rope coordinates, which tokens share an attention block) is
computed on the host by `vision_inputs`; the module sees fixed-shape arrays only, so a padded
size ("bucket") compiles once.

Token orders. `pixel_values` rows come in the processor's order: per item, per frame, per
merge unit (m x m patches), so m^2 consecutive rows form one merged token. The tower works
in *window order*: merge units permuted so each attention window (and each frame) is a
contiguous run. The merger's output is permuted back, so the result is in reference order.

Attention is block-diagonal (windows, or whole frames in `fullatt_block_indexes` layers) and
computed block-wise: tokens are gathered into [num_blocks, block_len] with a key-padding mask,
attended, and gathered back.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from saber_jax.models import layers
from saber_jax.models.config import VisionConfig

# ----------------------------------------------------------------------------- host side


def vision_token_count(grid_thw, merge: int = 2) -> np.ndarray:
  """[K] merged tokens (<|IMAGE|> / <|VIDEO|> placeholders) per item: t*h*w // merge^2."""
  grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
  return grid.prod(-1) // merge**2


def _check_grid(config: VisionConfig, grid_thw) -> np.ndarray:
  grid = np.asarray(grid_thw)
  if grid.ndim != 2 or grid.shape[1] != 3 or not np.issubdtype(grid.dtype, np.integer):
    raise ValueError(f'grid_thw must be an integer array [K, 3], got {grid.dtype} {grid.shape}')
  m = config.spatial_merge_size
  for k, (t, h, w) in enumerate(grid.tolist()):
    if t < 1 or h < 1 or w < 1 or h % m or w % m:
      raise ValueError(f'grid_thw[{k}] = {[t, h, w]}: t, h, w must be positive and h, w '
                       f'multiples of spatial_merge_size {m}')
  return grid.astype(np.int64)


def _windows(t: int, units_h: int, units_w: int, window: int) -> tuple[np.ndarray, np.ndarray]:
  """Window order of one item's merge units (ids t-major) and the units in each window.

  Mirrors `get_vision_window_index`: per frame, the unit grid is cut into window x window
  tiles enumerated row-major (edge tiles smaller), units row-major inside a tile.
  """
  tiles_h, tiles_w = -(-units_h // window), -(-units_w // window)
  ids = np.full((t, tiles_h * window, tiles_w * window), -1)
  ids[:, :units_h, :units_w] = np.arange(t * units_h * units_w).reshape(t, units_h, units_w)
  tiles = ids.reshape(t, tiles_h, window, tiles_w, window).transpose(0, 1, 3, 2, 4)
  tiles = tiles.reshape(t * tiles_h * tiles_w, window * window)
  valid = tiles >= 0
  return tiles[valid], valid.sum(-1)


def _blocks(starts: np.ndarray, lengths: np.ndarray, num_blocks: int | None,
            block_len: int | None, num_tokens: int, what: str) -> dict[str, np.ndarray]:
  """Gather tables for attention over contiguous token runs [start, start + length).

  blocks [B, L] int32: token of each slot; mask [B, L]: slot holds a token of the run;
  slots [num_tokens] int32: flat slot (b * L + l) of each token, to gather results back.
  Tokens outside every run (padding) read slot 0. A block with no token gets one unmasked
  slot on token 0, so no softmax row is fully masked (keeps padded values finite).
  """
  natural_blocks, natural_len = len(lengths), int(lengths.max(initial=1))
  num_blocks = max(natural_blocks, 1) if num_blocks is None else num_blocks
  block_len = natural_len if block_len is None else block_len
  if num_blocks < natural_blocks:
    raise ValueError(f'num_{what}s={num_blocks} is smaller than the {natural_blocks} {what}s '
                     'of grid_thw')
  if block_len < natural_len:
    raise ValueError(f'{what}_len={block_len} is smaller than the longest {what} '
                     f'({natural_len} patches)')
  offsets = np.arange(block_len)
  mask = np.zeros((num_blocks, block_len), bool)
  mask[:natural_blocks] = offsets < lengths[:, None]
  blocks = np.zeros((num_blocks, block_len), np.int64)
  blocks[:natural_blocks] = np.where(mask[:natural_blocks], starts[:, None] + offsets, 0)
  mask[natural_blocks:, 0] = True
  slots = np.zeros(num_tokens, np.int64)
  slots[blocks[:natural_blocks][mask[:natural_blocks]]] = np.flatnonzero(mask[:natural_blocks])
  return dict(blocks=blocks.astype(np.int32), mask=mask, slots=slots.astype(np.int32))


def vision_inputs(config: VisionConfig, grid_thw, *, num_patches: int | None = None,
                  num_windows: int | None = None, window_len: int | None = None,
                  num_frames: int | None = None, frame_len: int | None = None
                  ) -> dict[str, np.ndarray]:
  """Host-side index tables of `VisionEncoder` for K items (images and/or video clips).

  Args:
    grid_thw: int [K, 3] patch grids (t, h, w), in the order of their rows in pixel_values.
    num_patches: pad the patch count N (and the merged count N / m^2) to this size; it must
      be a multiple of m^2. Defaults to the sum of t*h*w.
    num_windows, window_len: pad the windowed-attention table to this many blocks of this
      many patches (defaults: the number of windows, the longest window).
    num_frames, frame_len: same for the full-attention table, one block per frame of each
      item (defaults: the number of frames, the largest frame h*w).

  Returns numpy arrays (P = padded patches, M = P / m^2):
    window_index int32 [P]: patch permutation to window order (x_window = x[window_index]);
    rope_positions int32 [P, 2]: (h, w) patch coordinates of each patch, in window order;
    window_blocks int32 [Bw, Lw], window_block_mask bool [Bw, Lw], window_slots int32 [P]:
      windowed-attention gather tables over the window-ordered sequence (see `_blocks`);
    frame_blocks, frame_block_mask, frame_slots: same for the per-frame attention;
    reverse_index int32 [M]: merged tokens back to reference order (argsort of the window
      permutation at merge-unit granularity);
    patch_mask bool [P], token_mask bool [M]: valid patches / output tokens (padding last).
  """
  grid = _check_grid(config, grid_thw)
  m = config.spatial_merge_size
  unit = m * m
  window = config.window_size // m // config.patch_size
  if window < 1:
    raise ValueError(f'window_size {config.window_size} is smaller than one merge unit '
                     f'({m} x {config.patch_size} pixels)')
  total = int(grid.prod(-1).sum())
  num_patches = total if num_patches is None else num_patches
  if num_patches < total or num_patches % unit:
    raise ValueError(f'num_patches={num_patches} must be >= {total} (sum of t*h*w of grid_thw) '
                     f'and a multiple of spatial_merge_size^2 = {unit}')

  unit_order, unit_h, unit_w, window_units, frame_sizes = [], [], [], [], []
  offset = 0
  for t, h, w in grid.tolist():
    uh, uw = h // m, w // m
    order, sizes = _windows(t, uh, uw, window)
    unit_order.append(order + offset)
    within = order % (uh * uw)          # position of the unit inside its frame
    unit_h.append(within // uw)
    unit_w.append(within % uw)
    window_units.append(sizes)
    frame_sizes.append(np.full(t, h * w))
    offset += t * uh * uw
  cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)
  unit_order, unit_h, unit_w = cat(unit_order), cat(unit_h), cat(unit_w)
  window_sizes, frame_sizes = cat(window_units) * unit, cat(frame_sizes)

  num_units, valid_units = num_patches // unit, total // unit
  units = np.concatenate([unit_order, np.arange(valid_units, num_units)])
  within = np.arange(unit)
  window_index = (units[:, None] * unit + within).ravel()
  # Patch (i, j) of merge unit (a, b) sits at (a*m + i, b*m + j): get_vision_position_ids.
  rope_positions = np.zeros((num_patches, 2), np.int64)
  rope_positions[:total, 0] = (unit_h[:, None] * m + within // m).ravel()
  rope_positions[:total, 1] = (unit_w[:, None] * m + within % m).ravel()

  # Windows and frames are contiguous runs of the window-ordered sequence.
  starts = lambda sizes: np.cumsum(sizes) - sizes
  windows = _blocks(starts(window_sizes), window_sizes, num_windows, window_len, num_patches,
                    'window')
  frames = _blocks(starts(frame_sizes), frame_sizes, num_frames, frame_len, num_patches, 'frame')
  return dict(
      window_index=window_index.astype(np.int32),
      rope_positions=rope_positions.astype(np.int32),
      window_blocks=windows['blocks'], window_block_mask=windows['mask'],
      window_slots=windows['slots'],
      frame_blocks=frames['blocks'], frame_block_mask=frames['mask'], frame_slots=frames['slots'],
      reverse_index=np.argsort(units, kind='stable').astype(np.int32),
      patch_mask=np.arange(num_patches) < total,
      token_mask=np.arange(num_units) < valid_units)


# ----------------------------------------------------------------------------- model


def rope_cos_sin(rope_positions, head_dim: int, theta: float):
  """fp32 cos, sin [N, head_dim] of the axial 2D rope (Qwen2_5OmniVisionRotaryEmbedding):
  angles concat(h * inv, w * inv), duplicated, with inv over head_dim / 2 dims."""
  spatial = head_dim // 2
  inv = 1.0 / (theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
  angles = rope_positions.astype(jnp.float32)[..., None] * inv           # [N, 2, hd / 4]
  angles = angles.reshape(angles.shape[0], -1)                            # h then w
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
  """x [N, heads, hd] rotated in fp32 and cast back (apply_rotary_pos_emb_vision)."""
  x32 = x.astype(jnp.float32)
  cos, sin = cos[:, None], sin[:, None]
  return (x32 * cos + layers.rotate_half(x32) * sin).astype(x.dtype)


def block_attention(q, k, v, blocks, mask, slots):
  """Attention within blocks of tokens: q, k, v [N, heads, hd] -> [N, heads, hd].

  blocks/mask [B, L] pick each block's tokens; slots [N] reads each token's result back.
  """
  gather = lambda x: x[blocks]                                            # [B, L, heads, hd]
  out = layers.attention(gather(q), gather(k), gather(v), mask[:, None, None, :])
  return out.reshape(-1, *out.shape[2:])[slots]


class VisionModule(nn.Module):
  """The fields every vision-tower module takes: its config and compute / storage dtypes."""
  config: VisionConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32


class PatchEmbed(VisionModule):
  """Conv3d with kernel = stride and no bias, as a matmul over the flattened patch rows.

  The kernel is stored [tp, p, p, C_in, C] (flax Conv layout); rows are (C_in, tp, p, p).
  """

  @nn.compact
  def __call__(self, pixel_values):
    c = self.config
    shape = (c.temporal_patch_size, c.patch_size, c.patch_size, c.in_channels, c.hidden_size)
    kernel = self.param('kernel', nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, None, None, None, 'vision_embed')),
                        shape, self.param_dtype)
    kernel = jnp.asarray(kernel, self.dtype).transpose(3, 0, 1, 2, 4).reshape(-1, c.hidden_size)
    if pixel_values.shape[-1] != kernel.shape[0]:
      raise ValueError(f'pixel_values rows have {pixel_values.shape[-1]} values; the patch '
                       f'embedding expects in_channels*tp*p*p = {kernel.shape[0]}')
    return jnp.asarray(pixel_values, self.dtype) @ kernel


class Attention(VisionModule):
  """Self-attention of one block (`Qwen2_5OmniVisionAttention`), per frame or per window."""

  @nn.compact
  def __call__(self, x, rope, tables, full_attention):
    c = self.config
    heads = c.num_heads
    dense = lambda axes, name: layers.dense(c.hidden_size, axes, use_bias=True, dtype=self.dtype,
                                            param_dtype=self.param_dtype, name=name)
    split = lambda y: y.reshape(y.shape[0], heads, -1)
    q, k, v = (split(dense(('vision_embed', 'vision_heads'), n)(x)) for n in ('q', 'k', 'v'))
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    # Layers in fullatt_block_indexes attend within each frame, the others within windows.
    # Under autodiff a cond keeps the residuals of *both* branches in every scanned layer
    # (frame-sized score matrices in all 32 layers), so each branch keeps only its inputs
    # and recomputes its scores in the backward pass.
    attend = jax.checkpoint(block_attention, prevent_cse=False)
    tables_of = lambda kind: tuple(tables[f'{kind}_{n}'] for n in ('blocks', 'block_mask', 'slots'))
    out = jax.lax.cond(full_attention,
                       lambda q, k, v: attend(q, k, v, *tables_of('frame')),
                       lambda q, k, v: attend(q, k, v, *tables_of('window')),
                       q, k, v)
    return dense(('vision_heads', 'vision_embed'), 'proj')(out.reshape(x.shape))


class Block(VisionModule):
  """One pre-norm ViT block. The carry holds the layer number, which picks the attention
  layout (per frame or per window) inside the scan."""

  @nn.compact
  def __call__(self, carry, rope, tables):
    x, layer = carry
    norm = lambda name: layers.RMSNorm(1e-6, self.dtype, self.param_dtype, name=name)
    kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
    full = jnp.isin(layer, jnp.asarray(self.config.fullatt_block_indexes, jnp.int32))
    x = x + Attention(**kw, name='attn')(norm('norm1')(x), rope, tables, full)
    c = self.config
    mlp = layers.SwiGLU(c.hidden_size, c.intermediate_size, use_bias=True,
                        axes=('vision_embed', 'vision_mlp'), dtype=self.dtype,
                        param_dtype=self.param_dtype, name='mlp')
    x = x + mlp(norm('norm2')(x))
    return (x, layer + 1), None


class PatchMerger(VisionModule):
  """RMSNorm, then each merge unit's m^2 patches concatenated -> Linear -> GELU -> Linear."""

  @nn.compact
  def __call__(self, x):
    c = self.config
    merged = c.hidden_size * c.spatial_merge_size**2
    x = layers.RMSNorm(1e-6, self.dtype, self.param_dtype, name='ln_q')(x)
    x = x.reshape(-1, merged)
    dense = lambda n, axes, name: layers.dense(n, axes, use_bias=True, dtype=self.dtype,
                                               param_dtype=self.param_dtype, name=name)
    x = layers.gelu(dense(merged, ('vision_merge', 'vision_merge'), 'mlp_0')(x))
    return dense(c.out_hidden_size, ('vision_merge', 'embed'), 'mlp_2')(x)


class VisionEncoder(VisionModule):
  """pixel_values [P, C_in*tp*p*p] (+ the tables of `vision_inputs`) -> [P / m^2, out_hidden].

  Output rows are in reference order (items in order, t*h*w/m^2 tokens each), padded rows
  (token_mask False) are zero.
  """
  remat: str = 'none'

  @nn.compact
  def __call__(self, pixel_values, *, window_index, rope_positions, window_blocks,
               window_block_mask, window_slots, frame_blocks, frame_block_mask, frame_slots,
               reverse_index, patch_mask, token_mask):
    c = self.config
    if c.hidden_size % c.num_heads or (c.hidden_size // c.num_heads) % 4:
      raise ValueError(f'vision head_dim = {c.hidden_size}/{c.num_heads} must be a multiple of 4')
    kw = dict(config=c, dtype=self.dtype, param_dtype=self.param_dtype)
    x = PatchEmbed(**kw, name='patch_embed')(pixel_values)
    x = jnp.where(patch_mask[:, None], x, 0)[window_index]               # window order
    rope = rope_cos_sin(rope_positions, c.hidden_size // c.num_heads, c.rope_theta)
    tables = dict(window_blocks=window_blocks, window_block_mask=window_block_mask,
                  window_slots=window_slots, frame_blocks=frame_blocks,
                  frame_block_mask=frame_block_mask, frame_slots=frame_slots)
    stack = layers.layer_stack(Block, c.depth, self.remat, broadcast_args=2)
    (x, _), _ = stack(**kw, name='blocks')((x, jnp.zeros((), jnp.int32)), rope, tables)
    out = PatchMerger(**kw, name='merger')(x)[reverse_index]              # reference order
    return jnp.where(token_mask[:, None], out, 0)


_linear = layers.linear_rules


_LAYER = r'blocks\.(?P<layer>\d+)'

CHECKPOINT_RULES: list[tuple[str, str, tuple[int, ...] | None]] = [
    # torch Conv3d [C, C_in, tp, p, p] -> [tp, p, p, C_in, C]
    (r'patch_embed\.proj\.weight', 'patch_embed/kernel', (2, 3, 4, 1, 0)),
    *[(rf'{_LAYER}\.{n}\.weight', f'blocks/{n}/scale', None) for n in ('norm1', 'norm2')],
    *[rule for n in ('q', 'k', 'v', 'proj') for rule in _linear(rf'{_LAYER}\.attn\.{n}',
                                                                 f'blocks/attn/{n}')],
    *[rule for n in ('gate_proj', 'up_proj', 'down_proj')
      for rule in _linear(rf'{_LAYER}\.mlp\.{n}', f'blocks/mlp/{n}')],
    (r'merger\.ln_q\.weight', 'merger/ln_q/scale', None),
    *_linear(r'merger\.mlp\.0', 'merger/mlp_0'),
    *_linear(r'merger\.mlp\.2', 'merger/mlp_2'),
]
