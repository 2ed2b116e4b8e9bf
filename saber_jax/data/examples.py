"""Records -> examples: a record's token rows, cut to fit, with its media patched.

A record (`data.records`) becomes an `Example`: its token rows (one for SFT; for a
preference pair one row `[prompt | chosen | rejected]` with `shared_prompt`, the default,
or the two rows `[prompt | chosen]`, `[prompt | rejected]`), its media as processor-style
arrays (video frames patched here, on the host) and its reference log-probs.

Rows longer than the largest length bucket are truncated (`overlong='truncate'`: the
response is cut, the prompt and media are kept; an example whose prompt alone does not
fit is dropped) or dropped (`overlong='drop'`). A dropped example keeps its place (rows
None): collate makes it padding rows, so the batch keeps its shape, and counts it.

`DataConfig` holds the options of the whole input pipeline (examples, `data.collate`,
`data.plan`, `data.datasets`); `RecordLoader` is the Grain map function from a record's
global index to its Example.
"""

import dataclasses
from typing import Any, Sequence

import numpy as np

from saber_jax import files
from saber_jax.batch import CHOSEN, IGNORE_INDEX, PAIR_PROMPT, PROMPT, REJECTED
from saber_jax.data import media, records
from saber_jax.data.prompt import vision_token_count
from saber_jax.models.audio import audio_token_count
from saber_jax.models.config import ThinkerConfig

OVERLONG_MODES = ('truncate', 'drop')     # DataConfig.overlong


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Batching, bucketing and loading options (an ml_collections ConfigDict with any of
  these fields works too; missing ones take these defaults).

  batch_size: examples per batch on each process (pairs for preference data).
  shared_prompt: preference pairs as one row `[prompt | chosen | rejected]` (the prompt
    and media computed once) rather than two rows `[prompt | chosen]`, `[prompt |
    rejected]`.
  num_data_shards: data shards per batch, each with its own media arrays (the data-
    parallel devices of this process); must divide batch_size.
  length_buckets: padded text lengths; the largest is the longest row kept. Steps of
    256 tokens: with size-grouped batches they keep ~90% of text positions real.
  overlong: 'truncate' or 'drop' rows longer than max(length_buckets).
  max_dropped_fraction: the largest fraction of the records that may train nothing
    (dropped as too long, or an empty answer) before a stage refuses to start; in [0, 1].
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
  max_dropped_fraction: float = 0.01
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
  shards = options.num_data_shards
  if options.batch_size < 1 or shards < 1 or options.batch_size % shards:
    raise ValueError(f'batch_size ({options.batch_size}) must be a positive multiple of '
                     f'num_data_shards ({options.num_data_shards})')
  if options.overlong not in OVERLONG_MODES:
    raise ValueError(f"overlong must be 'truncate' or 'drop', got {options.overlong!r}")
  buckets = options.length_buckets
  if not buckets or list(buckets) != sorted(set(buckets)):
    raise ValueError(f'length_buckets must be increasing, got {options.length_buckets}')
  if not 0 <= options.max_dropped_fraction <= 1:
    raise ValueError(f'max_dropped_fraction must be in [0, 1], got '
                     f'{options.max_dropped_fraction}')
  if options.bucket_steps < 1:
    raise ValueError(f'bucket_steps must be >= 1, got {options.bucket_steps}')
  return options


def _rows_of(record: dict, shared_prompt: bool) -> list[dict[str, np.ndarray]]:
  """Token rows of a record: one for SFT; for a preference pair one row `[prompt |
  chosen | rejected]` (shared_prompt) or the rows `[prompt | chosen]`, `[prompt |
  rejected]`. `pair_segments` marks the prompt (PAIR_PROMPT) and the answers (CHOSEN,
  REJECTED). In the shared row each answer starts with a copy of the prompt's last token,
  which predicts the answer's first token: every token then predicts the label after it,
  in either layout. The batch plan sizes these rows with `row_lengths`: change both
  together."""
  if record['kind'] == records.SFT:
    return [{k: np.asarray(record[k]) for k in ('input_ids', 'labels', 'segments')}]
  prompt = np.asarray(record['prompt_ids'])
  answers = [(np.asarray(record[f'{side}_ids']), np.asarray(record[f'{side}_segments']))
             for side in ('chosen', 'rejected')]
  ignored = lambda n: np.full(n, IGNORE_INDEX, np.int32)
  if not shared_prompt:
    return [{'input_ids': np.concatenate([prompt, ids]),
             'labels': np.concatenate([ignored(len(prompt)), ids]),
             'segments': np.concatenate([np.full(len(prompt), PROMPT, np.int8), segments]),
             'pair_segments': np.repeat([PAIR_PROMPT, answer],
                                        [len(prompt), len(ids)]).astype(np.int8)}
            for answer, (ids, segments) in zip((CHOSEN, REJECTED), answers)]
  head, last = prompt[:-1], prompt[-1:]
  parts = [dict(input_ids=head, labels=ignored(len(head)),
                segments=np.full(len(head), PROMPT, np.int8),
                pair_segments=np.full(len(head), PAIR_PROMPT, np.int8))]
  for answer, (ids, segments) in zip((CHOSEN, REJECTED), answers):
    parts.append(dict(input_ids=np.concatenate([last, ids]),
                      labels=np.concatenate([ignored(1), ids]),
                      segments=np.concatenate([np.full(1, PROMPT, np.int8), segments]),
                      pair_segments=np.full(len(ids) + 1, answer, np.int8)))
  return [{k: np.concatenate([p[k] for p in parts]) for k in parts[0]}]


def row_lengths(text: np.ndarray, kind: str, shared_prompt: bool) -> np.ndarray:
  """Tokens of each row [n, rows] from the index's (prompt, response, rejected) tokens
  [n, 3]; keep in step with `_rows_of` (and collate's `_items`: media once per row)."""
  prompt, response, rejected = text.T
  if kind == records.SFT:
    return (prompt + response)[:, None]
  if shared_prompt:    # the prompt, then each answer after a copy of the prompt's last token
    return (prompt + response + rejected + 1)[:, None]
  return np.stack([prompt + response, prompt + rejected], 1)


def num_rows(kind: str, shared_prompt: bool) -> int:
  """Rows per example of a record kind."""
  return row_lengths(np.zeros((0, 3), np.int64), kind, shared_prompt).shape[1]


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
    answers = [np.flatnonzero(row['pair_segments'] == a) for a in (CHOSEN, REJECTED)]
    room = max_len - answers[0][0] - 2          # the prompt and the two copies of its last token
    cap = _answer_cap([len(a) - 1 for a in answers], room)
    if cap < 1:
      return None, False   # the prompt and media alone do not fit: nothing left to train on
    keep = np.concatenate([np.arange(answers[0][0])] + [a[:cap + 1] for a in answers])
    return [{k: v[keep] for k, v in row.items()}], True
  for r in rows:
    trained = np.flatnonzero(r['labels'] != IGNORE_INDEX)
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
  check_placeholders(record, out, config, where)
  return out


def _prompt_tokens(record: dict) -> np.ndarray:
  if record['kind'] == records.PREFERENCE:
    return np.asarray(record['prompt_ids'])
  return np.asarray(record['input_ids'])


def check_placeholders(record: dict, media_arrays: dict[str, Any], config: ThinkerConfig,
                       where: str) -> None:
  """The record's audio / video / image placeholder tokens against the media it holds (a
  record whose arrays were cut or removed, its prompt kept): a RecordError naming the
  record, the field and both counts, instead of a failure deep in collate or the model."""
  tokens = _prompt_tokens(record)
  merge = config.vision.spatial_merge_size
  audio = media_arrays.get('audio')
  video, image = media_arrays.get('video'), media_arrays.get('image')
  made = {
      'input_features': (config.audio_token_id, 'audio', 0 if audio is None else
                         int(audio_token_count(audio.shape[1]))),
      'frames': (config.video_token_id, 'video', 0 if video is None else sum(
          vision_token_count(g, merge) for g in video['video_grid_thw'])),
      'image': (config.image_token_id, 'image', 0 if image is None else sum(
          vision_token_count(g, merge) for g in image['image_grid_thw'])),
  }
  for field, (token, what, want) in made.items():
    have = int(np.sum(tokens == token))
    if have != want:
      shape = list(record[field].shape) if field in record else 'absent'
      raise records.RecordError(
          f'{where}: record {record["id"]!r}: field {field!r}: the prompt has {have} {what} '
          f'tokens (placeholders), its {field} ({shape}) make {want} (media cut or removed?)')


@dataclasses.dataclass(frozen=True)
class Example:
  """One record ready to collate. rows None: dropped as too long (media then unused)."""
  rows: list[dict] | None
  media: dict[str, Any]
  truncated: bool
  index: int
  ref_logps: tuple[float, float] | None = None


def prompt_example(record: dict, model_config: ThinkerConfig, where: str) -> Example:
  """A decoded record's prompt (an SFT record's tokens before its first trained label, a
  preference record's `prompt_ids`) with its media, as an example with nothing to train:
  what generation starts from."""
  prompt = (np.asarray(record['prompt_ids']) if record['kind'] == records.PREFERENCE
            else np.asarray(record['input_ids'])[:records.prompt_length(record)])
  row = dict(input_ids=prompt, labels=np.full(len(prompt), IGNORE_INDEX, np.int32),
             segments=np.full(len(prompt), PROMPT, np.int8))
  return Example([row], media_of(record, model_config, where), False, index=-1)


class RecordLoader:
  """Global record index -> Example (a Grain map function; picklable: readers open lazily).

  Index -1 is padding (None), used by the reference pass. A record that cannot be read
  or decoded is a RecordError naming 'path:index' and the id; with `damaged_log` (the
  reference pass) it is appended there ({"id", "index", "where", "reason"}) and dropped.
  """

  def __init__(self, paths: Sequence[str], kind: str, model_config: ThinkerConfig,
               options: DataConfig, require_reference: bool, damaged_log: str | None = None):
    self.paths, self.kind, self.model_config = list(paths), kind, model_config
    self.options, self.require_reference = options, require_reference
    self.damaged_log = damaged_log
    self._source = records.ShardSource(self.paths)

  def __len__(self):
    return len(self._source)

  def where(self, index: int) -> str:
    return self._source.where(index)

  def __call__(self, index: int) -> Example | None:
    index = int(index)
    if index < 0:   # padding of the reference pass
      return None
    try:
      return self._load(index)
    except records.RecordError as e:
      if self.damaged_log is None:
        raise
      # The reference pass logs a damaged record and goes on: it is dropped from the pairs.
      files.append_jsonl(self.damaged_log, [dict(id=None, index=index, where=self.where(index),
                                                 reason=str(e))])
      print(f'[data] skipped {self.where(index)}: {e}', flush=True)
      return Example(None, {}, False, index)

  def _load(self, index: int) -> Example:
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
      problem = self.require_reference and records.pair_problem(record)
      if problem:   # the reference pass leaves these out; other records are refused here
        raise records.RecordError(f'{where}: record {record["id"]!r}: degenerate pair: '
                                  f'{problem}; rebuild the preference records')
      if self.require_reference and rows is not None and not np.all(np.isfinite(ref)):
        raise records.RecordError(
            f'{where}: record {record["id"]!r}: field \'ref_chosen_logps\': no reference '
            'log-probs (NaN); run the reference pass and records.fill_reference_logps first')
    media_arrays = media_of(record, self.model_config, where) if rows is not None else {}
    return Example(rows, media_arrays, truncated, index, ref)
