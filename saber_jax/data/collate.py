"""Examples -> one batch: rows padded to bucket shapes, split into data shards, encoded.

A process's batch is split into `num_data_shards` contiguous data shards; each data
shard's media are encoded together on the devices holding its rows. Every data shard is
padded to one text length (the smallest of `length_buckets` that fits the longest row)
and the same media sizes (`bucket_size`: a short geometric ladder above a floor, for the
largest data shard), then `thinker.model_inputs` builds its arrays (TMRoPE position ids
included) and `thinker.stack_shards` joins them: `encode`, the one path of training, the
reference pass (right padding) and generation (left padding). The batch's keys, shapes
and split axes are listed in `saber_jax.batch`.

Pair i of preference data is row i `[prompt | chosen | rejected]` (`shared_prompt`, the
default: the prompt and media once; TMRoPE positions of the rejected answer continue from
the prompt as the chosen ones do) or rows 2i and 2i + 1 `[prompt | chosen]`, `[prompt |
rejected]`; a pair never straddles two data shards. A dropped example (or a padding slot
of the reference pass) becomes rows of one padding token with no labels and
example_mask False. The number of distinct shapes is bounded by the product of the
bucket ladders.
"""

from typing import Any, Mapping, Sequence

import numpy as np

from saber_jax.batch import FILL, IGNORE_INDEX, PAD_ID, PAIR_INDEX, PAIR_PROMPT
from saber_jax.data import records
from saber_jax.data.examples import DataConfig, Example, num_rows
from saber_jax.models import thinker
from saber_jax.models.config import ThinkerConfig

# The rows of `shard_batch` that are not model inputs (the losses read them).
TEXT_KEYS = ('labels', 'segments', 'pair_segments')


def bucket_size(needed: int, minimum: int, steps: int = 2, multiple: int = 1) -> int:
  """The smallest size >= needed on the ladder minimum * 2^k * (1 + j / steps),
  j < steps, rounded up to a multiple of `multiple`."""
  size = max(int(minimum), 1)
  while True:
    for j in range(steps):
      candidate = -(-(size + size * j // steps) // multiple) * multiple
      if candidate >= needed:
        return candidate
    size *= 2


def length_bucket(length: int, buckets: Sequence[int]) -> int:
  for bucket in buckets:
    if length <= bucket:
      return bucket
  raise ValueError(f'a row of {length} tokens exceeds the largest length bucket {buckets[-1]}')


def vision_window(v) -> int:
  """Merge units per side of an attention window (`get_vision_window_index`)."""
  return v.window_size // v.spatial_merge_size // v.patch_size


def _vision_needs(grids: list[np.ndarray], v) -> dict[str, int]:
  m, win = v.spatial_merge_size, vision_window(v)
  needs = dict(num_patches=0, num_windows=0, num_frames=0, frame_len=0)
  for t, h, w in grids:
    needs['num_patches'] += t * h * w
    needs['num_windows'] += t * -(-(h // m) // win) * -(-(w // m) // win)
    needs['num_frames'] += t
    needs['frame_len'] = max(needs['frame_len'], h * w)
  return needs


def _items(example: Example):
  """Media per row of an example, in row order (each row has its own placeholders)."""
  return [example.media] * len(example.rows) if example.rows is not None else []


def shard_batch(examples: list[Example | None], rows_per_example: int, length: int,
                pairs: bool = False) -> dict[str, Any]:
  """The processor-style batch of one data shard, text right-padded to `length` (with
  `pair_segments` when `pairs`)."""
  num_rows = len(examples) * rows_per_example
  batch = dict(input_ids=np.full((num_rows, length), PAD_ID, np.int64),
               attention_mask=np.zeros((num_rows, length), np.int64),
               labels=np.full((num_rows, length), IGNORE_INDEX, np.int32),
               segments=np.zeros((num_rows, length), np.int32))
  text_keys = ['attention_mask', 'input_ids', 'labels', 'segments']
  if pairs:
    batch['pair_segments'] = np.zeros((num_rows, length), np.int32)
    text_keys.append('pair_segments')
  audio, videos, images, in_video = [], [], [], False
  for e, example in enumerate(examples):
    first = e * rows_per_example
    if example is None or example.rows is None:   # padding / dropped: one token, no labels
      batch['attention_mask'][first:first + rows_per_example, 0] = 1
      if pairs:
        batch['pair_segments'][first:first + rows_per_example, 0] = PAIR_PROMPT
      continue
    for r, row in enumerate(example.rows):
      n = len(row['input_ids'])
      row = dict(row, attention_mask=1)
      for key in text_keys:
        batch[key][first + r, :n] = row[key]
    for item in _items(example):
      if 'audio' in item:
        audio.append(item['audio'])
      if 'video' in item:
        videos.append(item['video'])
      if 'image' in item:
        images.append(item['image'])
      in_video |= item['use_audio_in_video']
  if audio:
    frames = max(a.shape[1] for a in audio)
    batch['input_features'] = np.zeros((len(audio), audio[0].shape[0], frames), np.float32)
    batch['feature_attention_mask'] = np.zeros((len(audio), frames), np.int64)
    for i, a in enumerate(audio):
      batch['input_features'][i, :, :a.shape[1]] = a
      batch['feature_attention_mask'][i, :a.shape[1]] = 1
  if videos:
    batch['pixel_values_videos'] = np.concatenate([v['pixel_values_videos'] for v in videos])
    batch['video_grid_thw'] = np.concatenate([v['video_grid_thw'] for v in videos])
    batch['video_second_per_grid'] = np.concatenate([v['video_second_per_grid'] for v in videos])
  if images:
    batch['pixel_values'] = np.concatenate([i['pixel_values'] for i in images])
    batch['image_grid_thw'] = np.concatenate([i['image_grid_thw'] for i in images])
  batch['use_audio_in_video'] = in_video
  return batch


def left_pad(batch: Mapping[str, Any], length: int | None, pad_id: int) -> dict[str, Any]:
  """The batch with each row's tokens moved to the right end (left padding), `length`
  slots wide (None: as wide as now), padded with `pad_id`. `input_ids`, `attention_mask`
  and, when present, `position_ids` [3, B, L] move; media inputs stay as they are."""
  input_ids = np.asarray(batch['input_ids'])
  mask = batch.get('attention_mask')
  mask = np.ones(input_ids.shape, bool) if mask is None else np.asarray(mask).astype(bool)
  rows, width = input_ids.shape
  length = width if length is None else length
  counts = mask.sum(-1)
  starts = np.argmax(mask, axis=-1)
  for row in range(rows):
    if not mask[row, starts[row]:starts[row] + counts[row]].all():
      raise ValueError(f'row {row}: attention_mask has padding between prompt tokens')
  if counts.max(initial=0) > length:
    raise ValueError(f'a prompt has {counts.max()} tokens, more than the {length} slots asked for')
  out = dict(batch)
  out['input_ids'] = np.full((rows, length), pad_id, input_ids.dtype)
  out['attention_mask'] = np.zeros((rows, length), np.int64)
  positions = batch.get('position_ids')
  if positions is not None:
    positions = np.asarray(positions)
    # Padding gets position 1, as in rope_index.
    out['position_ids'] = np.ones((3, rows, length), positions.dtype)
  for row in range(rows):
    src = slice(starts[row], starts[row] + counts[row])
    dst = slice(length - counts[row], length)
    out['input_ids'][row, dst] = input_ids[row, src]
    out['attention_mask'][row, dst] = 1
    if positions is not None:
      out['position_ids'][:, row, dst] = positions[:, row, src]
  return out


def data_shard_batches(examples: Sequence[Example | None], num_data_shards: int,
                       rows_per_example: int, length: int, pairs: bool = False) -> list[dict]:
  """The right-padded processor-style batch (`shard_batch`) of each of `num_data_shards`
  contiguous data shards of `examples` (None: a padding slot)."""
  per_shard = len(examples) // num_data_shards
  return [shard_batch(list(examples[s * per_shard:(s + 1) * per_shard]), rows_per_example,
                      length, pairs)
          for s in range(num_data_shards)]


def _shard_needs(shards: list[dict[str, Any]], config: ThinkerConfig) -> dict[str, int]:
  """The largest tower needs of any data shard (audio chunks; vision patches, windows,
  frames, patches per frame) before bucketing."""
  window = 2 * config.audio.n_window
  needs = dict(audio_chunks=0, num_patches=0, num_windows=0, num_frames=0, frame_len=0)
  for g in shards:
    if 'feature_attention_mask' in g:
      lengths = g['feature_attention_mask'].sum(-1)
      needs['audio_chunks'] = max(needs['audio_chunks'], int(np.sum(-(-lengths // window))))
    grids = [np.asarray(g[k]).reshape(-1, 3)
             for k in ('image_grid_thw', 'video_grid_thw') if k in g]
    vision = _vision_needs([tuple(int(x) for x in row) for grid in grids for row in grid],
                           config.vision)
    needs.update({k: max(needs[k], vision[k]) for k in vision})
  return needs


def media_buckets(needs: dict[str, int], config: ThinkerConfig,
                   options: DataConfig) -> dict[str, int]:
  """Bucketed tower sizes (the `model_inputs` keywords) for the largest data shard's needs."""
  a, v = config.audio, config.vision
  steps, unit = options.bucket_steps, v.spatial_merge_size ** 2
  num_chunks = bucket_size(needs['audio_chunks'], options.min_audio_chunks, steps)
  win = vision_window(v)
  return dict(
      num_audio_chunks=num_chunks,
      # A chunk of 2W frames yields at most W / 2 tokens (conv stride 2, pool 2), so this
      # always fits and adds no shape of its own.
      num_audio_tokens=max(1, num_chunks * a.n_window // 2),
      num_patches=bucket_size(needs['num_patches'], options.min_patches, steps, unit),
      num_windows=bucket_size(needs['num_windows'], options.min_vision_blocks, steps),
      window_len=win * win * unit,
      num_frames=bucket_size(needs['num_frames'], options.min_vision_blocks, steps),
      frame_len=bucket_size(needs['frame_len'], options.min_frame_len, steps, unit))


def media_sizes(shards: list[dict[str, Any]], config: ThinkerConfig,
                options: DataConfig) -> dict[str, int]:
  """Bucketed tower sizes shared by all data shards of a batch, from the shards themselves."""
  return media_buckets(_shard_needs(shards, config), config, options)


def encode(shards: list[dict[str, Any]], model_config: ThinkerConfig, sizes: dict[str, int],
           *, padding: str = 'right', length: int | None = None, pad_id: int = PAD_ID,
           shared_prompt: bool = False, keep_text: bool = True) -> dict[str, Any]:
  """One batch from the data shards' processor-style batches (`data_shard_batches`): the
  `model_inputs` of each at the media `sizes`, stacked, and (`keep_text`) their TEXT_KEYS
  rows joined. padding 'right': the rows as built (training, the reference pass); 'left':
  each row moved to the right end of `length` slots padded with `pad_id` (generation).
  `shared_prompt`: pair rows `[prompt | chosen | rejected]`, whose answers both continue
  the prompt's TMRoPE positions."""
  if padding not in ('right', 'left'):
    raise ValueError(f"padding must be 'right' or 'left', got {padding!r}")
  encoded, texts = [], []
  for shard in shards:
    shard = dict(shard)
    text = {k: shard.pop(k) for k in TEXT_KEYS if k in shard}
    if padding == 'left':
      shard = left_pad(shard, length, pad_id)
    if shared_prompt:   # TMRoPE positions of the rejected answer continue from the prompt
      shard['attention_segments'] = text['pair_segments']
    inputs = thinker.model_inputs(model_config, shard, **sizes)
    inputs.pop('attention_segments', None)     # the step derives them from pair_segments
    encoded.append(inputs)
    texts.append(text)
  batch = thinker.stack_shards(encoded)
  if keep_text:
    batch.update({k: np.concatenate([t[k] for t in texts]) for k in texts[0]})
  return batch


def collate(examples: Sequence[Example | None], *, model_config: ThinkerConfig,
            options: DataConfig, preference: bool, reference: bool = False,
            shapes: dict[str, Any] | None = None) -> dict[str, Any]:
  """Batch of the jitted step from `batch_size` examples (keys: `saber_jax.batch`).

  `shapes` (from `BatchPlan.shapes`): the text length and media sizes of the global batch,
  and its fill counts (`fill`); without it, they follow from these examples alone."""
  examples = list(examples)
  rows_per_example = num_rows(records.PREFERENCE if preference else records.SFT,
                              options.shared_prompt)
  longest = max([len(r['input_ids']) for e in examples if e is not None and e.rows is not None
                 for r in e.rows] + [1])
  length = shapes['length'] if shapes else length_bucket(longest, options.length_buckets)
  shards = data_shard_batches(examples, options.num_data_shards, rows_per_example, length,
                              pairs=preference)
  if shapes:
    sizes = shapes['media']
    needs = dict(_shard_needs(shards, model_config), length=longest)
    planned = dict(audio_chunks=sizes['num_audio_chunks'], length=length,
                   **{k: sizes[k]
                      for k in ('num_patches', 'num_windows', 'num_frames', 'frame_len')})
    over = {k: (needs[k], planned[k]) for k in planned if needs[k] > planned[k]}
    if over:
      raise records.RecordError(
          f'records {[e.index for e in examples if e is not None]}: sizes (needed, planned) '
          f'{over} exceed the batch plan: their size index does not match them; delete the '
          f'{records.SIZES_SUFFIX} files beside the shards to rebuild it')
  else:
    sizes = media_sizes(shards, model_config, options)
  batch = encode(shards, model_config, sizes,
                 shared_prompt=preference and options.shared_prompt)
  real = np.array([e is not None and e.rows is not None for e in examples])
  batch['example_mask'] = np.repeat(real, rows_per_example)
  batch['truncated'] = np.repeat([e is not None and e.truncated for e in examples],
                                 rows_per_example)
  if preference:
    ref = np.array([e.ref_logps if e is not None and e.rows is not None else (0.0, 0.0)
                    for e in examples], np.float32).reshape(-1, 2)
    ref = np.where(np.isfinite(ref), ref, 0.0)   # unused rows (and, in the pass itself, unknown)
    batch['ref_chosen_logps'], batch['ref_rejected_logps'] = ref[:, 0], ref[:, 1]
  if reference:
    batch[PAIR_INDEX] = np.array([-1 if e is None else e.index for e in examples], np.int64)
  if shapes:
    batch[FILL] = np.asarray(shapes['fill'], np.int64)
  return batch
