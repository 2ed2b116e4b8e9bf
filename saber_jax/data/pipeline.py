"""Grain input pipelines: ArrayRecord shards of records -> fixed-shape training batches.

  size index (records.load_sizes) -> batch plan (global batches and their shapes) ->
  this process's slots -> read + decode + patch the frames (host) -> batches -> collate

The batch plan (`BatchPlan`) is computed alike by every process from the seed, the epoch
and the records' size index, with no communication: each epoch a seeded permutation of
all records, sorted by size within windows of `group_batches` global batches, cut into
global batches of `batch_size * process count` examples, the batches shuffled
(`group_by_size`). For each global batch it gives the text length bucket and media sizes
from ALL its rows, so every process pads its own rows to the same shapes with the full
bucket ladders, and any config runs on any number of processes. Process p reads and
decodes only examples [p * batch_size, (p + 1) * batch_size) of each global batch.

All stages after the plan are Grain `MapDataset`s, so batch k is a pure function of
(seed, k): output does not depend on the number of worker processes, and the iterator
state (`get_state` / `set_state`, saved by Orbax through `grain.checkpoint`) is just a
position, so a resumed run continues with exactly the next global batch. Each epoch
leaves out fewer than one global batch of records, different ones every epoch.

Collate (`collate`): a process's batch is split into `num_data_shards` contiguous row
groups; each group's media are encoded together on the devices holding those rows.
Every group is padded to the plan's text length (the smallest of `length_buckets` that
fits the longest row of the global batch) and media sizes (`bucket_size`: a short
geometric ladder above a floor, for the largest row group of the global batch), then
`thinker.model_inputs` builds its arrays (TMRoPE position ids included) and
`thinker.stack_shards` joins the groups. The batch holds those arrays plus

  labels [B, L] int32 (-100: not trained), segments [B, L] int32 (0 prompt, 1 visual,
  2 acoustic, 3 reasoning), example_mask [B] bool (False: a row with no example: an
  example dropped as too long, or padding in the reference pass), truncated [B] bool,

and for preference data `pair_segments` [B, L] int32 (1 prompt, 2 chosen, 3 rejected,
0 padding), `ref_chosen_logps` / `ref_rejected_logps` float32 [P] (0 where example_mask
is False), and in the reference pass `pair_index` int64 [P] (the pair's position in the
record files, -1 for padding). Pair i is row i `[prompt | chosen | rejected]`
(`shared_prompt`, the default: the prompt and media once; TMRoPE positions of the
rejected answer continue from the prompt as the chosen ones do) or rows 2i and 2i + 1
`[prompt | chosen]`, `[prompt | rejected]`; a pair never straddles two data shards.
Every batch also holds `fill` int64 [4] (FILL_FIELDS: real and padded text positions,
real and padded audio + vision positions of the global batch; not a model input). The
number of distinct shapes is bounded by the product of the bucket ladders.

Rows longer than the largest bucket are truncated (`overlong='truncate'`: the response
is cut, the prompt and media are kept; an example whose prompt alone does not fit is
dropped) or dropped (`overlong='drop'`). A dropped example becomes rows of one padding
token with no labels and example_mask False, so the batch keeps its shape; `truncated`
and `example_mask` let the trainer count both.
"""

import dataclasses
from typing import Any, Sequence

from absl import flags
import grain
import jax
import numpy as np

from saber_jax import losses
from saber_jax.data import media
from saber_jax.errors import UserError
from saber_jax.data import records
from saber_jax.data import sed
from saber_jax.models import thinker
from saber_jax.models.config import ThinkerConfig

PAD_ID = 0   # padding positions are masked out; any id below vocab_size would do


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Batching, bucketing and loading options (an ml_collections ConfigDict with any of
  these fields works too; missing ones take these defaults).

  batch_size: examples per batch on each process (pairs for preference data).
  shared_prompt: preference pairs as one row `[prompt | chosen | rejected]` (the prompt
    and media computed once) rather than two rows `[prompt | chosen]`, `[prompt |
    rejected]`.
  num_data_shards: row groups per batch, each with its own media arrays (the data-
    parallel devices of this process); must divide batch_size.
  length_buckets: padded text lengths; the largest is the longest row kept. Steps of
    256 tokens: with size-grouped batches they keep ~90% of text positions real.
  overlong: 'truncate' or 'drop' rows longer than max(length_buckets).
  bucket_steps: buckets per doubling of a media size (1: powers of two; 2: also 1.5x;
    4: also 1.25x, 1.5x, 1.75x).
  min_audio_chunks, min_patches, min_vision_blocks, min_frame_len: floors of the media
    buckets (chunks of 2 * n_window mel frames; vision patches; attention windows and
    frames; patches per frame).
  group_batches: global batches per window sorted by size (`group_by_size`); 0: random
    batches.
  num_epochs: None repeats forever.
  worker_count: Grain worker processes (0: decode in this process's threads).
  worker_buffer_size: batches each worker keeps ready.
  read_threads, prefetch: threads and batches in flight per process (or per worker).
  """
  batch_size: int = 8
  shared_prompt: bool = True
  num_data_shards: int = 1
  length_buckets: tuple[int, ...] = tuple(range(256, 4097, 256))
  overlong: str = 'truncate'
  bucket_steps: int = 4
  min_audio_chunks: int = 2
  min_patches: int = 256
  min_vision_blocks: int = 4
  min_frame_len: int = 64
  group_batches: int = 32
  num_epochs: int | None = None
  shuffle: bool = True
  worker_count: int = 0
  worker_buffer_size: int = 2
  read_threads: int = 2
  prefetch: int = 2


def data_options(data_config: Any) -> DataConfig:
  """A DataConfig from a DataConfig, a dict or a ConfigDict (missing fields: defaults)."""
  if isinstance(data_config, DataConfig):
    options = data_config
  else:
    get = getattr(data_config, 'get', None) or (lambda k, d: getattr(data_config, k, d))
    values = {}
    for field in dataclasses.fields(DataConfig):
      value = get(field.name, None)
      if value is not None:
        values[field.name] = tuple(value) if field.name == 'length_buckets' else value
    options = DataConfig(**values)
  if options.batch_size < 1 or options.num_data_shards < 1 or options.batch_size % options.num_data_shards:
    raise ValueError(f'batch_size ({options.batch_size}) must be a positive multiple of '
                     f'num_data_shards ({options.num_data_shards})')
  if options.overlong not in ('truncate', 'drop'):
    raise ValueError(f"overlong must be 'truncate' or 'drop', got {options.overlong!r}")
  if not options.length_buckets or list(options.length_buckets) != sorted(set(options.length_buckets)):
    raise ValueError(f'length_buckets must be increasing, got {options.length_buckets}')
  if options.bucket_steps < 1:
    raise ValueError(f'bucket_steps must be >= 1, got {options.bucket_steps}')
  return options


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


# ------------------------------------------------------------------------- examples


def _rows_of(record: dict, shared_prompt: bool) -> list[dict[str, np.ndarray]]:
  """Token rows of a record: one for SFT; for a preference pair one row `[prompt |
  chosen | rejected]` (shared_prompt) or the rows `[prompt | chosen]`, `[prompt |
  rejected]`. `pair_segments` marks the prompt (1) and the answers (2, 3). In the shared
  row each answer starts with a copy of the prompt's last token, which predicts the
  answer's first token: every token then predicts the label after it, in either layout.
The batch plan sizes these rows with `_row_lengths`: change both together."""
  if record['kind'] == records.SFT:
    return [{k: np.asarray(record[k]) for k in ('input_ids', 'labels', 'segments')}]
  prompt = np.asarray(record['prompt_ids'])
  answers = [(np.asarray(record[f'{side}_ids']), np.asarray(record[f'{side}_segments']))
             for side in ('chosen', 'rejected')]
  ignored = lambda n: np.full(n, sed.IGNORE_INDEX, np.int32)
  if not shared_prompt:
    return [{'input_ids': np.concatenate([prompt, ids]),
             'labels': np.concatenate([ignored(len(prompt)), ids]),
             'segments': np.concatenate([np.zeros(len(prompt), np.int8), segments]),
             'pair_segments': np.repeat([1, answer], [len(prompt), len(ids)]).astype(np.int8)}
            for answer, (ids, segments) in zip((losses.CHOSEN, losses.REJECTED), answers)]
  head, last = prompt[:-1], prompt[-1:]
  parts = [dict(input_ids=head, labels=ignored(len(head)), segments=np.zeros(len(head), np.int8),
                pair_segments=np.ones(len(head), np.int8))]
  for answer, (ids, segments) in zip((losses.CHOSEN, losses.REJECTED), answers):
    parts.append(dict(input_ids=np.concatenate([last, ids]),
                      labels=np.concatenate([ignored(1), ids]),
                      segments=np.concatenate([np.zeros(1, np.int8), segments]),
                      pair_segments=np.full(len(ids) + 1, answer, np.int8)))
  return [{k: np.concatenate([p[k] for p in parts]) for k in parts[0]}]


def _answer_cap(lengths: list[int], room: int) -> int:
  """The largest cap k with sum(min(n, k)) <= room: longer answers are cut first."""
  cap = 0
  while cap < max(lengths) and sum(min(n, cap + 1) for n in lengths) <= room:
    cap += 1
  return cap


def _fit_rows(rows: list[dict], max_len: int, overlong: str) -> tuple[list[dict] | None, bool]:
  """(rows cut to max_len, truncated?) or (None, False) when the example is dropped. A
  shared-prompt row cuts both answers to one cap, so the longer one loses tokens first."""
  if all(len(r['input_ids']) <= max_len for r in rows):
    return rows, False
  if overlong == 'drop':
    return None, False
  if 'pair_segments' in rows[0] and len(rows) == 1:
    row = rows[0]
    answers = [np.flatnonzero(row['pair_segments'] == a) for a in (losses.CHOSEN, losses.REJECTED)]
    room = max_len - answers[0][0] - 2          # the prompt and the two copies of its last token
    cap = _answer_cap([len(a) - 1 for a in answers], room)
    if cap < 1:
      return None, False   # the prompt and media alone do not fit: nothing left to train on
    keep = np.concatenate([np.arange(answers[0][0])] + [a[:cap + 1] for a in answers])
    return [{k: v[keep] for k, v in row.items()}], True
  for r in rows:
    trained = np.flatnonzero(r['labels'] != sed.IGNORE_INDEX)
    if not len(trained) or trained[0] >= max_len:
      return None, False   # the prompt and media alone do not fit: nothing left to train on
  return [{k: v[:max_len] for k, v in r.items()} for r in rows], True


def media_of(record: dict, config: ThinkerConfig, where: str) -> dict[str, Any]:
  """The record's media as processor-style arrays (frames patched here, on the host)."""
  v = config.vision
  out: dict[str, Any] = {'use_audio_in_video': bool(record['use_audio_in_video'])}
  if 'input_features' in record:
    features = record['input_features']
    if features.shape[0] != config.audio.num_mel_bins:
      raise records.RecordError(f'{where}: record {record["id"]!r}: field \'input_features\': '
                                f'{features.shape[0]} mel bins, the model expects '
                                f'{config.audio.num_mel_bins}')
    out['audio'] = features
  patch = dict(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
               merge_size=v.spatial_merge_size)
  try:
    if 'frames' in record:
      out['video'] = media.video_patches(record['frames'], record['video_fps'], **patch)
    if 'image' in record:
      out['image'] = media.image_patches(record['image'], **patch)
  except ValueError as e:
    raise records.RecordError(f'{where}: record {record["id"]!r}: {e}') from None
  return out


@dataclasses.dataclass(frozen=True)
class Example:
  """One record ready to collate. rows None: dropped as too long (media then unused)."""
  rows: list[dict] | None
  media: dict[str, Any]
  truncated: bool
  index: int
  ref_logps: tuple[float, float] | None = None


class RecordLoader:
  """Global record index -> Example (a Grain map function; picklable: readers open lazily).

  Index -1 is padding (None), used by the reference pass.
  """

  def __init__(self, paths: Sequence[str], kind: str, model_config: ThinkerConfig,
               options: DataConfig, require_reference: bool):
    self.paths, self.kind, self.model_config = list(paths), kind, model_config
    self.options, self.require_reference = options, require_reference
    counts = [records.count_records(p) for p in self.paths]
    self.starts = np.cumsum([0] + counts)
    self._source = None

  def __len__(self):
    return int(self.starts[-1])

  def where(self, index: int) -> str:
    file = int(np.searchsorted(self.starts, index, side='right')) - 1
    return f'{self.paths[file]}:{index - self.starts[file]}'

  def __call__(self, index: int) -> Example | None:
    index = int(index)
    if index < 0:   # padding of the reference pass
      return None
    if self._source is None:
      self._source = grain.sources.ArrayRecordDataSource(self.paths)
    where = self.where(index)
    record = records.decode_record(self._source[index], where)
    if record['kind'] != self.kind:
      raise records.RecordError(f'{where}: record {record["id"]!r}: field \'kind\': expected '
                                f'{self.kind!r} records here, got {record["kind"]!r}')
    rows, truncated = _fit_rows(_rows_of(record, self.options.shared_prompt),
                                max(self.options.length_buckets),
                                self.options.overlong)
    ref = None
    if self.kind == records.PREFERENCE:
      ref = (record['ref_chosen_logps'], record['ref_rejected_logps'])
      if self.require_reference and rows is not None and not np.all(np.isfinite(ref)):
        raise records.RecordError(
            f'{where}: record {record["id"]!r}: field \'ref_chosen_logps\': no reference '
            'log-probs (NaN); run the reference pass and records.fill_reference_logps first')
    media_arrays = media_of(record, self.model_config, where) if rows is not None else {}
    return Example(rows, media_arrays, truncated, index, ref)


# ------------------------------------------------------------------------- collate


def _vision_window(v) -> int:
  """Merge units per side of an attention window (`get_vision_window_index`)."""
  return v.window_size // v.spatial_merge_size // v.patch_size


def _vision_needs(grids: list[np.ndarray], v) -> dict[str, int]:
  m, win = v.spatial_merge_size, _vision_window(v)
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


def group_batch(examples: list[Example | None], rows_per_example: int, length: int,
                 pairs: bool = False) -> dict[str, Any]:
  """The processor-style batch of one row group, text right-padded to `length` (with
  `pair_segments` when `pairs`)."""
  num_rows = len(examples) * rows_per_example
  batch = dict(input_ids=np.full((num_rows, length), PAD_ID, np.int64),
               attention_mask=np.zeros((num_rows, length), np.int64),
               labels=np.full((num_rows, length), sed.IGNORE_INDEX, np.int32),
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
        batch['pair_segments'][first:first + rows_per_example, 0] = 1
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


def _group_needs(groups: list[dict[str, Any]], config: ThinkerConfig) -> dict[str, int]:
  """The largest tower needs of any row group (audio chunks; vision patches, windows,
  frames, patches per frame) before bucketing."""
  window = 2 * config.audio.n_window
  needs = dict(audio_chunks=0, num_patches=0, num_windows=0, num_frames=0, frame_len=0)
  for g in groups:
    if 'feature_attention_mask' in g:
      lengths = g['feature_attention_mask'].sum(-1)
      needs['audio_chunks'] = max(needs['audio_chunks'], int(np.sum(-(-lengths // window))))
    grids = [np.asarray(g[k]).reshape(-1, 3) for k in ('image_grid_thw', 'video_grid_thw') if k in g]
    vision = _vision_needs([tuple(int(x) for x in row) for grid in grids for row in grid],
                           config.vision)
    needs.update({k: max(needs[k], vision[k]) for k in vision})
  return needs


def _media_buckets(needs: dict[str, int], config: ThinkerConfig,
                   options: DataConfig) -> dict[str, int]:
  """Bucketed tower sizes (the `model_inputs` keywords) for the largest group needs."""
  a, v = config.audio, config.vision
  steps, unit = options.bucket_steps, v.spatial_merge_size ** 2
  num_chunks = bucket_size(needs['audio_chunks'], options.min_audio_chunks, steps)
  win = _vision_window(v)
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


def media_sizes(groups: list[dict[str, Any]], config: ThinkerConfig,
                options: DataConfig) -> dict[str, int]:
  """Bucketed tower sizes shared by all groups of a batch, from the groups themselves."""
  return _media_buckets(_group_needs(groups, config), config, options)


def collate(examples: Sequence[Example | None], *, model_config: ThinkerConfig,
            options: DataConfig, preference: bool, reference: bool = False,
            shapes: dict[str, Any] | None = None) -> dict[str, Any]:
  """Batch of the jitted step from `batch_size` examples (see the module docstring).

  `shapes` (from `BatchPlan.shapes`): the text length and media sizes of the global batch,
  and its fill counts (`fill`); without it, they follow from these examples alone."""
  examples = list(examples)
  shared = preference and options.shared_prompt
  rows_per_example = num_rows(records.PREFERENCE if preference else records.SFT,
                              options.shared_prompt)
  longest = max([len(r['input_ids']) for e in examples if e is not None and e.rows is not None
                 for r in e.rows] + [1])
  length = shapes['length'] if shapes else length_bucket(longest, options.length_buckets)
  per_group = len(examples) // options.num_data_shards
  groups = [group_batch(examples[g * per_group:(g + 1) * per_group], rows_per_example, length,
                         pairs=preference)
            for g in range(options.num_data_shards)]
  if shapes:
    sizes = shapes['media']
    needs = dict(_group_needs(groups, model_config), length=longest)
    planned = dict(audio_chunks=sizes['num_audio_chunks'], length=length,
                   **{k: sizes[k] for k in ('num_patches', 'num_windows', 'num_frames', 'frame_len')})
    over = {k: (needs[k], planned[k]) for k in planned if needs[k] > planned[k]}
    if over:
      raise records.RecordError(
          f'records {[e.index for e in examples if e is not None]}: sizes (needed, planned) '
          f'{over} exceed the batch plan: their size index does not match them; delete the '
          f'{records.SIZES_SUFFIX} files beside the shards to rebuild it')
  else:
    sizes = media_sizes(groups, model_config, options)
  text_keys = ('labels', 'segments', 'pair_segments') if preference else ('labels', 'segments')
  shards = []
  for g in groups:
    text = {k: g.pop(k) for k in text_keys}
    if shared:   # TMRoPE positions of the rejected answer continue from the prompt
      g['attention_segments'] = text['pair_segments']
    inputs = thinker.model_inputs(model_config, g, **sizes)
    inputs.pop('attention_segments', None)     # the step derives them from pair_segments
    shards.append((inputs, text))
  batch = thinker.stack_shards([s for s, _ in shards])
  for key in text_keys:
    batch[key] = np.concatenate([t[key] for _, t in shards])
  real = np.array([e is not None and e.rows is not None for e in examples])
  batch['example_mask'] = np.repeat(real, rows_per_example)
  batch['truncated'] = np.repeat([e is not None and e.truncated for e in examples], rows_per_example)
  if preference:
    ref = np.array([e.ref_logps if e is not None and e.rows is not None else (0.0, 0.0)
                    for e in examples], np.float32).reshape(-1, 2)
    ref = np.where(np.isfinite(ref), ref, 0.0)   # unused rows (and, in the pass itself, unknown)
    batch['ref_chosen_logps'], batch['ref_rejected_logps'] = ref[:, 0], ref[:, 1]
  if reference:
    batch['pair_index'] = np.array([-1 if e is None else e.index for e in examples], np.int64)
  if shapes:
    batch[FILL] = np.asarray(shapes['fill'], np.int64)
  return batch


# ------------------------------------------------------------------------- batch plan

FILL = 'fill'   # batch key: int64 [4], the global batch's text and media fill counts
FILL_FIELDS = ('text_real', 'text_padded', 'media_real', 'media_padded')


def _row_lengths(text: np.ndarray, kind: str, shared_prompt: bool) -> np.ndarray:
  """Tokens of each row [n, rows] from the index's (prompt, response, rejected) tokens
  [n, 3]; keep in step with `_rows_of` (and `_items`: media once per row)."""
  prompt, response, rejected = text.T
  if kind == records.SFT:
    return (prompt + response)[:, None]
  if shared_prompt:    # the prompt, then each answer after a copy of the prompt's last token
    return (prompt + response + rejected + 1)[:, None]
  return np.stack([prompt + response, prompt + rejected], 1)


def num_rows(kind: str, shared_prompt: bool) -> int:
  """Rows per example of a record kind."""
  return _row_lengths(np.zeros((0, 3), np.int64), kind, shared_prompt).shape[1]


def example_needs(sizes: np.ndarray, kind: str, model_config: ThinkerConfig,
                  options: DataConfig) -> dict[str, np.ndarray]:
  """What each record [n] (rows of `records.load_sizes`) needs of a batch, as `RecordLoader`
  and `collate` would find it: `length` (longest row after `_fit_rows`; 1 when dropped),
  `kept`, `text_real` (unpadded tokens of its rows), the tower needs `audio_chunks`,
  `num_patches`, `num_windows`, `num_frames`, `frame_len`, and `media_real` (mel frames
  + patches)."""
  field = {name: sizes[:, i].astype(np.int64) for i, name in enumerate(records.SIZE_FIELDS)}
  shared = kind == records.PREFERENCE and options.shared_prompt
  rows = _row_lengths(sizes[:, :3].astype(np.int64), kind, options.shared_prompt)
  max_len = max(options.length_buckets)
  fits = rows.max(1) <= max_len
  # Truncation keeps an example whose prompt fits and that has trained tokens (a shared
  # row: room for the prompt, its last token copied twice and a token of each answer).
  if shared:
    cut = (options.overlong == 'truncate') & (field['prompt_tokens'] + 3 <= max_len)
  else:
    cut = (options.overlong == 'truncate') & (field['prompt_tokens'] < max_len) & (
        rows > field['prompt_tokens'][:, None]).all(1)
  kept = fits | cut
  copies = np.where(kept, rows.shape[1], 0)
  a, v = model_config.audio, model_config.vision
  p, m, win = v.patch_size, v.spatial_merge_size, _vision_window(v)
  video_t = -(-field['video_frames'] // v.temporal_patch_size)
  video_h, video_w = field['video_height'] // p, field['video_width'] // p
  image = [media.smart_resize(h, w, p * m) if h else (0, 0)
           for h, w in zip(field['image_height'], field['image_width'])]
  image_h, image_w = (np.array([x[i] for x in image], np.int64).reshape(-1) // p for i in (0, 1))
  image_t = (image_h > 0).astype(np.int64)
  windows = lambda t, h, w: t * -(-(h // m) // win) * -(-(w // m) // win)
  needs = dict(
      length=np.where(kept, np.minimum(rows.max(1), max_len), 1), kept=kept,
      text_real=np.where(kept, np.minimum(rows, max_len).sum(1), rows.shape[1]),
      audio_chunks=copies * -(-field['mel_frames'] // (2 * a.n_window)),
      num_patches=copies * (video_t * video_h * video_w + image_t * image_h * image_w),
      num_windows=copies * (windows(video_t, video_h, video_w) + windows(image_t, image_h, image_w)),
      num_frames=copies * (video_t + image_t),
      frame_len=np.where(kept, np.maximum(video_h * video_w, image_h * image_w), 0))
  needs['media_real'] = copies * field['mel_frames'] + needs['num_patches']
  # int32 keeps a few ints per record (the plan travels to every Grain worker).
  return {k: v if k == 'kept' else v.astype(np.int32) for k, v in needs.items()}


def group_by_size(keys: np.ndarray, batch_size: int, window: int,
                  rng: np.random.Generator | None) -> np.ndarray:
  """Positions of `keys` [n] as batches [n // batch_size, batch_size] of similar keys:
  shuffled (rng None: in order), sorted by key within windows of `window` batches, cut
  into batches, batches shuffled. window 0: no sorting (random batches). The last
  n % batch_size positions (of the shuffled order) are left out."""
  n = len(keys) // batch_size * batch_size
  order = rng.permutation(len(keys))[:n] if rng is not None else np.arange(n)
  if window:
    span = window * batch_size
    order = np.concatenate([chunk[np.argsort(keys[chunk], kind='stable')]
                            for chunk in np.split(order, range(span, n, span))] or [order])
  batches = order.reshape(-1, batch_size)
  return batches[rng.permutation(len(batches))] if rng is not None and window else batches


def balanced_deal(weights: np.ndarray, num_groups: int) -> np.ndarray:
  """Positions [batches, B] that deal each batch's B examples to `num_groups` row groups of
  B / num_groups (group after group) so that no group carries much more of any weight
  than the others: `weights` [batches, B, D] (e.g. audio chunks and vision patches, which
  each group encodes as one padded array). Greedy: heaviest example first, each to the
  group with room whose largest share (of each weight's batch total) stays smallest."""
  batches, size, _ = weights.shape
  per_group = size // num_groups
  totals = weights.sum(1, keepdims=True)
  share = weights / np.where(totals > 0, totals, 1)
  load = np.zeros((batches, num_groups, share.shape[2]))
  count = np.zeros((batches, num_groups), np.int64)
  slot = np.zeros((batches, size), np.int64)      # example -> its place in the dealt batch
  rows = np.arange(batches)
  for i in np.argsort(-share.sum(2), axis=1, kind='stable').T:   # i: [batches]
    after = (load + share[rows, i][:, None]).max(2)
    group = np.where(count < per_group, after, np.inf).argmin(1)
    load[rows, group] += share[rows, i]
    slot[rows, i] = group * per_group + count[rows, group]
    count[rows, group] += 1
  return np.argsort(slot, axis=1)


class BatchPlan:
  """The global batches of a record set, alike on every process: from the seed, the epoch
  and the records' needs (`example_needs`), each step's examples (record positions, -1:
  padding) and the shapes all processes pad them to.

  Every epoch is `group_by_size` of a new permutation (seeded by (seed, epoch)), so
  batches hold records of similar size and the leftovers (< one global batch) differ
  between epochs. `reference`: every record once, in size order, the last batch padded.
  """

  def __init__(self, needs: dict[str, np.ndarray], *, rows_per_example: int, batch_size: int,
               num_groups: int, model_config: ThinkerConfig, options: DataConfig, seed: int,
               reference: bool = False):
    self.needs, self.rows_per_example = needs, rows_per_example
    self.batch_size, self.num_groups = batch_size, num_groups
    self.model_config, self.options, self.seed, self.reference = model_config, options, seed, reference
    n = len(needs['length'])
    self.steps_per_epoch = -(-n // batch_size) if reference else n // batch_size
    if not self.steps_per_epoch:
      raise UserError(f'{n} records are fewer than one global batch of {batch_size} '
                      '(data.batch_size x processes): add records or lower '
                      '--config.data.batch_size')
    self._orders = {}   # epoch -> its order; the current and the previous epoch

  def _key(self) -> np.ndarray:
    # Text length first (media placeholders are part of it), then the vision size.
    length, patches = (self.needs[k].astype(np.int64) for k in ('length', 'num_patches'))
    return length * (1 << 24) + np.minimum(patches, (1 << 24) - 1)

  def epoch(self, epoch: int) -> np.ndarray:
    """Record positions [steps_per_epoch, batch_size] of one epoch (-1: padding)."""
    order = self._orders.get(epoch)   # one read: Grain's threads share this cache
    if order is not None:
      return order
    if self.reference:
      order = np.argsort(self._key(), kind='stable')
      order = self._deal(np.pad(order, (0, self.steps_per_epoch * self.batch_size - len(order)),
                                constant_values=-1).reshape(-1, self.batch_size))
    else:
      shuffle = self.options.shuffle   # off: file order, ungrouped
      rng = np.random.default_rng([self.seed, epoch]) if shuffle else None
      order = group_by_size(self._key(), self.batch_size,
                            self.options.group_batches if shuffle else 0, rng)
      if shuffle and self.options.group_batches:
        order = self._deal(order)
    self._orders = {**{e: o for e, o in self._orders.items() if e == epoch - 1}, epoch: order}
    return order

  def _deal(self, order: np.ndarray) -> np.ndarray:
    """`order` with each batch's examples dealt to the row groups (devices) so each
    encodes about the same audio and vision (`balanced_deal`)."""
    if self.num_groups == 1:
      return order
    weights = np.stack([np.where(order >= 0, self.needs[k][order], 0)
                        for k in ('audio_chunks', 'num_patches')], -1).astype(np.float64)
    return np.take_along_axis(order, balanced_deal(weights, self.num_groups), 1)

  def examples(self, step: int) -> np.ndarray:
    """Record positions [batch_size] of global batch `step` (counted over all epochs)."""
    return self.epoch(step // self.steps_per_epoch)[step % self.steps_per_epoch]

  def shapes(self, step: int) -> dict[str, Any]:
    """`collate`'s shapes of global batch `step`: its text length bucket and media sizes
    (from the largest row group of all its rows) and fill counts (FILL_FIELDS)."""
    examples = self.examples(step)
    needs = {k: np.where(examples >= 0, v[np.maximum(examples, 0)], 0)
             for k, v in self.needs.items()}
    groups = {k: needs[k].reshape(self.num_groups, -1) for k in
              ('audio_chunks', 'num_patches', 'num_windows', 'num_frames', 'frame_len')}
    largest = {k: int(g.max() if k == 'frame_len' else g.sum(1).max()) for k, g in groups.items()}
    media_sizes = _media_buckets(largest, self.model_config, self.options)
    length = length_bucket(int(needs['length'].max(initial=1)), self.options.length_buckets)
    rows = self.rows_per_example * self.batch_size
    padding_rows = self.rows_per_example * int((examples < 0).sum())   # one token each
    audio_len = 2 * self.model_config.audio.n_window
    fill = (int(needs['text_real'].sum()) + padding_rows, rows * length,
            int(needs['media_real'].sum()),
            self.num_groups * (media_sizes['num_audio_chunks'] * audio_len
                               + media_sizes['num_patches']))
    return dict(length=length, media=media_sizes, fill=fill)


# ------------------------------------------------------------------------- datasets


def resolve_paths(paths: str | Sequence[str]) -> list[str]:
  if isinstance(paths, str):
    return records.shard_paths(paths)
  paths = list(paths)
  if not paths:
    raise ValueError('no record files given')
  return paths


def _process(shard_index, shard_count):
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index {shard_index} is not in [0, {shard_count})')
  return shard_index, shard_count


def steps_per_epoch(num_records: int, data_config: Any, shard_count: int | None = None) -> int:
  """Batches each process yields per epoch of a training pipeline over `num_records`."""
  options = data_options(data_config)
  shard_count = jax.process_count() if shard_count is None else shard_count
  return num_records // (options.batch_size * shard_count)


def _iter_dataset(batches: grain.MapDataset, options: DataConfig) -> grain.IterDataset:
  ds = batches.to_iter_dataset(grain.ReadOptions(num_threads=options.read_threads,
                                                 prefetch_buffer_size=options.prefetch))
  if options.worker_count > 0:
    # Grain 0.2.18 reads an absl flag when starting workers and fails in programs that do
    # not parse absl flags (google/grain#1355, fixed after 0.2.18): use the defaults then.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=options.worker_count, per_worker_buffer_size=options.worker_buffer_size))
  return ds


class _PlanSlot:
  """Position i of this process's slots -> (global step, record position or -1)."""

  def __init__(self, plan: BatchPlan, shard_index: int, batch_size: int):
    self.plan, self.first, self.batch_size = plan, shard_index * batch_size, batch_size

  def __call__(self, i: int, _) -> tuple[int, int]:
    step, slot = divmod(int(i), self.batch_size)
    return step, int(self.plan.examples(step)[self.first + slot])


class _Load:
  def __init__(self, loader: RecordLoader):
    self.loader = loader

  def __call__(self, slot: tuple[int, int]) -> tuple[int, Example | None]:
    step, index = slot
    return step, self.loader(index)


class _Collate:
  """A process's examples of one global step -> its batch, in the plan's shapes."""

  def __init__(self, plan: BatchPlan, **kwargs):
    self.plan, self.kwargs = plan, kwargs

  def __call__(self, slots: Sequence[tuple[int, Example | None]]) -> dict[str, Any]:
    step = slots[0][0]
    return collate([e for _, e in slots], shapes=self.plan.shapes(step), **self.kwargs)


def batch_plan(model_config: ThinkerConfig, data_config: Any, paths: Sequence[str], kind: str,
               *, seed: int, shard_count: int, reference: bool = False) -> BatchPlan:
  """The global batch plan of the record files (their size indexes, built if missing) for
  `shard_count` processes of `data_config.batch_size` examples each."""
  options = data_options(data_config)
  needs = example_needs(records.load_sizes(paths), kind, model_config, options)
  return BatchPlan(needs, rows_per_example=num_rows(kind, options.shared_prompt),
                   batch_size=options.batch_size * shard_count,
                   num_groups=options.num_data_shards * shard_count, model_config=model_config,
                   options=options, seed=seed, reference=reference)


def _dataset(model_config, data_config, paths, kind, *, seed, shard_index, shard_count,
             reference=False) -> grain.IterDataset:
  options = data_options(data_config)
  shard_index, shard_count = _process(shard_index, shard_count)
  paths = resolve_paths(paths)
  loader = RecordLoader(paths, kind, model_config, options,
                        require_reference=kind == records.PREFERENCE and not reference)
  plan = batch_plan(model_config, options, paths, kind, seed=seed, shard_count=shard_count,
                    reference=reference)
  if len(plan.needs['length']) != len(loader):
    raise records.RecordError(f'{paths}: the size indexes list {len(plan.needs["length"])} '
                              f'records, the shards hold {len(loader)}')
  # One slot per example of this process and step; a MapDataset, so slot k is a pure
  # function of (seed, k) and the iterator state is a position.
  b = options.batch_size
  slots = grain.MapDataset.range(plan.steps_per_epoch * b)
  slots = slots.repeat(1 if reference else options.num_epochs)
  batches = slots.map_with_index(_PlanSlot(plan, shard_index, b)).map(_Load(loader)).batch(
      b, drop_remainder=True,
      batch_fn=_Collate(plan, model_config=model_config, options=options,
                        preference=kind == records.PREFERENCE, reference=reference))
  return _iter_dataset(batches, options)


def sft_dataset(model_config: ThinkerConfig, data_config: Any, paths: str | Sequence[str], *,
                seed: int, shard_index: int | None = None,
                shard_count: int | None = None) -> grain.IterDataset:
  """SFT batches of SFT records (`paths`: shard files, or the prefix `records.shard_paths`
  expands). shard_index / shard_count default to this JAX process and the process count."""
  return _dataset(model_config, data_config, paths, records.SFT, seed=seed,
                  shard_index=shard_index, shard_count=shard_count)


def sft_batches(model_config: ThinkerConfig, data_config: Any, paths: str | Sequence[str], *,
                seed: int, shard_index: int | None = None,
                shard_count: int | None = None) -> grain.DatasetIterator:
  """Iterator over `sft_dataset`; checkpoint it with grain.checkpoint (get_state/set_state)."""
  return iter(sft_dataset(model_config, data_config, paths, seed=seed, shard_index=shard_index,
                          shard_count=shard_count))


def preference_dataset(model_config: ThinkerConfig, data_config: Any,
                       paths: str | Sequence[str], *, seed: int, shard_index: int | None = None,
                       shard_count: int | None = None) -> grain.IterDataset:
  """CA-DPO batches: pair i in rows (2i, 2i + 1) with its reference log-probs. Every pair
  kept must have them (a NaN raises RecordError naming the record)."""
  return _dataset(model_config, data_config, paths, records.PREFERENCE, seed=seed,
                  shard_index=shard_index, shard_count=shard_count)


def preference_batches(model_config, data_config, paths, *, seed, shard_index=None,
                       shard_count=None) -> grain.DatasetIterator:
  return iter(preference_dataset(model_config, data_config, paths, seed=seed,
                                 shard_index=shard_index, shard_count=shard_count))


def reference_batches(model_config: ThinkerConfig, data_config: Any,
                      paths: str | Sequence[str], *, shard_index: int | None = None,
                      shard_count: int | None = None) -> grain.DatasetIterator:
  """The reference pass: chosen/rejected rows of every pair once, in file order (one
  epoch, no shuffle), the last batches padded so all processes take the same number of
  steps. `pair_index` [B / 2] says which pair each row pair is (-1: padding; a pair
  dropped as too long has example_mask False), for `records.fill_reference_logps(...,
  key='index')`."""
  return iter(_dataset(model_config, data_config, paths, records.PREFERENCE, seed=0,
                       shard_index=shard_index, shard_count=shard_count, reference=True))


def prompt_batch(record_list: Sequence[dict], model_config: ThinkerConfig,
                 where: str = 'records') -> dict[str, Any]:
  """The prompts of decoded records (an SFT record's tokens before its first trained label,
  a preference record's `prompt_ids`) with their media, as one right-padded
  processor-style batch: what generation starts from."""
  examples = []
  for record in record_list:
    prompt = (np.asarray(record['prompt_ids']) if record['kind'] == records.PREFERENCE
              else np.asarray(record['input_ids'])[:records.prompt_length(record)])
    row = dict(input_ids=prompt, labels=np.full(len(prompt), sed.IGNORE_INDEX, np.int32),
               segments=np.zeros(len(prompt), np.int8))
    examples.append(Example([row], media_of(record, model_config, where), False, index=-1))
  length = max(len(e.rows[0]['input_ids']) for e in examples)
  batch = group_batch(examples, 1, length)
  del batch['labels'], batch['segments']
  return batch
