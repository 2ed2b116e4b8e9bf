"""Grain input pipelines: ArrayRecord shards of records -> fixed-shape training batches.

  records (ArrayRecord) -> seeded shuffle (a new order every epoch) -> this process's
  share -> decode + patch the frames (host) -> batches -> collate

All stages up to the batches are Grain `MapDataset`s, so batch k is a pure function of
(seed, k): output does not depend on the number of worker processes, and the iterator
state (`get_state` / `set_state`, saved by Orbax through `grain.checkpoint`) is just a
position, so a resumed run continues with exactly the next batch.

Sharding by JAX process: every process draws the same global permutation of the
records and takes every `shard_count`-th one from `shard_index` on. Each epoch uses
the first `steps_per_epoch * batch_size * shard_count` records of its permutation, so
all processes take the same number of steps (the few left over differ each epoch).

Collate (`collate`): a process's batch is split into `num_data_shards` contiguous row
groups; each group's media are encoded together on the devices holding those rows.
Every group is padded to one text length (the smallest of `length_buckets` that fits the
longest row of the batch) and to the same media sizes (`bucket_size`: a short geometric
ladder above a floor), then `thinker.model_inputs` builds its arrays (TMRoPE position ids
included) and `thinker.stack_shards` joins the groups. The batch holds those arrays plus

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
The number of distinct shapes is bounded by the product of the bucket ladders.

Rows longer than the largest bucket are truncated (`overlong='truncate'`: the response
is cut, the prompt and media are kept; an example whose prompt alone does not fit is
dropped) or dropped (`overlong='drop'`). A dropped example becomes rows of one padding
token with no labels and example_mask False, so the batch keeps its shape; `truncated`
and `example_mask` let the trainer count both.
"""

import dataclasses
import functools
from typing import Any, Sequence

from absl import flags
import grain
import jax
import numpy as np

from saber_jax import losses
from saber_jax.data import media
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
  length_buckets: padded text lengths; the largest is the longest row kept.
  overlong: 'truncate' or 'drop' rows longer than max(length_buckets).
  bucket_steps: buckets per doubling of a media size (1: powers of two; 2: also 1.5x).
  min_audio_chunks, min_patches, min_vision_blocks, min_frame_len: floors of the media
    buckets (chunks of 2 * n_window mel frames; vision patches; attention windows and
    frames; patches per frame).
  num_epochs: None repeats forever.
  worker_count: Grain worker processes (0: decode in this process's threads).
  worker_buffer_size: batches each worker keeps ready.
  read_threads, prefetch: threads and batches in flight per process (or per worker).
  """
  batch_size: int = 8
  shared_prompt: bool = True
  num_data_shards: int = 1
  length_buckets: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
  overlong: str = 'truncate'
  bucket_steps: int = 2
  min_audio_chunks: int = 2
  min_patches: int = 256
  min_vision_blocks: int = 4
  min_frame_len: int = 64
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
  answer's first token: every token then predicts the label after it, in either layout."""
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


def _media_of(record: dict, config: ThinkerConfig, where: str) -> dict[str, Any]:
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

  Indices >= the number of records are padding (None), used by the reference pass.
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
    if index >= len(self):
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
    media_arrays = _media_of(record, self.model_config, where) if rows is not None else {}
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


def _group_batch(examples: list[Example | None], rows_per_example: int, length: int,
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


def media_sizes(groups: list[dict[str, Any]], config: ThinkerConfig,
                options: DataConfig) -> dict[str, int]:
  """Bucketed tower sizes (the `model_inputs` keywords) shared by all groups of a batch."""
  a, v = config.audio, config.vision
  window = 2 * a.n_window
  chunks, vision = 0, dict(num_patches=0, num_windows=0, num_frames=0, frame_len=0)
  for g in groups:
    if 'feature_attention_mask' in g:
      lengths = g['feature_attention_mask'].sum(-1)
      chunks = max(chunks, int(np.sum(-(-lengths // window))))
    grids = [np.asarray(g[k]).reshape(-1, 3) for k in ('image_grid_thw', 'video_grid_thw') if k in g]
    needs = _vision_needs([tuple(int(x) for x in row) for grid in grids for row in grid], v)
    vision = {k: max(vision[k], needs[k]) for k in vision}
  steps, unit = options.bucket_steps, v.spatial_merge_size ** 2
  num_chunks = bucket_size(chunks, options.min_audio_chunks, steps)
  win = _vision_window(v)
  return dict(
      num_audio_chunks=num_chunks,
      # A chunk of 2W frames yields at most W / 2 tokens (conv stride 2, pool 2), so this
      # always fits and adds no shape of its own.
      num_audio_tokens=max(1, num_chunks * a.n_window // 2),
      num_patches=bucket_size(vision['num_patches'], options.min_patches, steps, unit),
      num_windows=bucket_size(vision['num_windows'], options.min_vision_blocks, steps),
      window_len=win * win * unit,
      num_frames=bucket_size(vision['num_frames'], options.min_vision_blocks, steps),
      frame_len=bucket_size(vision['frame_len'], options.min_frame_len, steps, unit))


def collate(examples: Sequence[Example | None], *, model_config: ThinkerConfig,
            options: DataConfig, preference: bool, reference: bool = False) -> dict[str, Any]:
  """Batch of the jitted step from `batch_size` examples (see the module docstring)."""
  examples = list(examples)
  shared = preference and options.shared_prompt
  rows_per_example = 2 if preference and not shared else 1
  longest = max([len(r['input_ids']) for e in examples if e is not None and e.rows is not None
                 for r in e.rows] + [1])
  length = length_bucket(longest, options.length_buckets)
  per_group = len(examples) // options.num_data_shards
  groups = [_group_batch(examples[g * per_group:(g + 1) * per_group], rows_per_example, length,
                         pairs=preference)
            for g in range(options.num_data_shards)]
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
  return batch


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


def _dataset(model_config, data_config, paths, kind, *, seed, shard_index, shard_count,
             reference=False) -> grain.IterDataset:
  options = data_options(data_config)
  shard_index, shard_count = _process(shard_index, shard_count)
  loader = RecordLoader(resolve_paths(paths), kind, model_config, options,
                        require_reference=kind == records.PREFERENCE and not reference)
  n, per_step = len(loader), options.batch_size * shard_count
  if reference:
    # Every pair exactly once: no shuffle, padded (index >= n) to whole batches everywhere.
    indices = grain.MapDataset.range(-(-n // per_step) * per_step)
  else:
    usable = n // per_step * per_step
    if not usable:
      raise ValueError(f'{n} records are fewer than one batch of {options.batch_size} on each of '
                       f'{shard_count} processes')
    indices = grain.MapDataset.range(n)
    if options.shuffle:
      # One global permutation per epoch (the seed is folded with the epoch); slicing after
      # it keeps processes disjoint and lets every epoch drop different leftovers.
      # Grain seeds epoch e with seed + e; mixing the seed first keeps runs with seeds s
      # and s + 1 from sharing all but one epoch order.
      indices = indices.shuffle(seed=int(np.random.SeedSequence(int(seed)).generate_state(1)[0]))
    indices = indices[:usable]
  indices = indices[shard_index::shard_count]
  if not reference:
    indices = indices.repeat(options.num_epochs)
  batches = indices.map(loader).batch(
      options.batch_size, drop_remainder=True,
      batch_fn=functools.partial(collate, model_config=model_config, options=options,
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
    examples.append(Example([row], _media_of(record, model_config, where), False, index=-1))
  length = max(len(e.rows[0]['input_ids']) for e in examples)
  batch = _group_batch(examples, 1, length)
  del batch['labels'], batch['segments']
  return batch
