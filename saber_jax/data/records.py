"""Training records (one msgpack blob per clip or pair) and their ArrayRecord shards.

Two kinds of record, both a msgpack map of scalars, strings and numpy arrays (arrays are
msgpack ext type 1 holding [dtype, shape, raw bytes]; plain `msgpack` reads them, no JAX
needed, so preprocessing and data-loader workers stay light):

SFT record (`kind` 'sft'), written by saber-preprocess:
  id, lang, subset: str; duration: float seconds; schema_version: int
  input_ids  int32 [L]   prompt + SED response (sed.build_sft_example)
  labels     int32 [L]   -100 on the prompt, the token id on the response
  segments   int8  [L]   0 prompt, 1 visual, 2 acoustic, 3 reasoning
  input_features float32 [128, T]   log-mel of the audio, valid frames only (optional)
  frames     uint8 [T, H, W, 3]      sampled video frames, already smart-resized (optional)
  video_fps  float                   the fps the frames stand for: the processor's
                                     video_second_per_grid = temporal_patch_size / video_fps
  image      uint8 [H, W, 3]         (optional; resized by the pipeline)
  use_audio_in_video: bool           the audio is the video's track, interleaved with it

Preference record (`kind` 'preference'), for CA-DPO: the prompt and media once, both
responses, and the reference model's log-probs once the reference pass has run:
  id, clip_id, lang, subset, duration, schema_version, the media fields above
  prompt_ids int32 [P]               ends with '<|im_start|>assistant\\n'
  chosen_ids / rejected_ids int32    response tokens incl. the closing '<|im_end|>\\n'
  chosen_segments / rejected_segments int8   SED segment of each response token
  chosen / rejected: str             the response texts
  chosen_score, rejected_score, margin: float   judge scores (NaN when not judged)
  ref_chosen_logps, ref_rejected_logps: float   TRL's column names; NaN until filled

Patches are not stored: uint8 frames are 4x smaller than float32 patch rows, and the
pipeline patches them on the host (media.video_patches).

Shards are ArrayRecord files named `{prefix}-{index:05d}-of-{count:05d}.array_record`,
written with group_size 1 (random access for Grain) under a temporary name and renamed
when complete, so a killed writer never leaves a shard that looks finished.

Size index: beside each shard, `{shard}.sizes.npz` holds the sizes batching needs, a row
of SIZE_FIELDS (int32) per record, and the shard's fingerprint (bytes, mtime, record
count, a hash of its first and last 64 KiB). `write_records` writes it with the shard;
`load_sizes` builds a missing or stale one (the shard was rewritten) by reading the shard
once and caches it, so the batch plan never trusts sizes of other bytes.
"""

import contextlib
import glob
import hashlib
import math
import os
import re
import sys
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import msgpack
import numpy as np

from saber_jax import batch, files
from saber_jax.errors import UserError
from saber_jax.data import sed

SCHEMA_VERSION = 1
SFT, PREFERENCE = 'sft', 'preference'
ARRAY_EXT = 1
WRITER_OPTIONS = 'group_size:1'
SHARD_SUFFIX = '.array_record'


class RecordError(UserError):
  """A record blob or field that does not follow the schema; names the record and field."""


# ------------------------------------------------------------------------------ msgpack


def _pack_default(value):
  if isinstance(value, np.ndarray):
    array = np.ascontiguousarray(value)
    if array.dtype.hasobject:
      raise TypeError(f'cannot store an object array {array.shape}')
    return msgpack.ExtType(ARRAY_EXT, msgpack.packb(
        [array.dtype.str, list(array.shape), array.tobytes()], use_bin_type=True))
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f'cannot store a {type(value).__name__}')


def _unpack_ext(code, data):
  if code != ARRAY_EXT:
    raise ValueError(f'unknown msgpack ext type {code}')
  dtype, shape, raw = msgpack.unpackb(data, raw=False)
  # Read-only view of the blob's bytes: no copy until a consumer needs one.
  return np.frombuffer(raw, np.dtype(dtype)).reshape(shape)


def pack(fields: Mapping[str, Any]) -> bytes:
  """msgpack bytes of a flat dict of scalars, strings and numpy arrays."""
  return msgpack.packb(dict(fields), default=_pack_default, use_bin_type=True)


def unpack(blob: bytes) -> dict[str, Any]:
  """Inverse of `pack`; raises ValueError (or msgpack's errors) on malformed bytes."""
  value = msgpack.unpackb(blob, raw=False, ext_hook=_unpack_ext, strict_map_key=True)
  if not isinstance(value, dict):
    raise ValueError(f'expected a msgpack map, got {type(value).__name__}')
  return value


# ------------------------------------------------------------------------------ schema

_MEDIA_FIELDS = ('input_features', 'frames', 'video_fps', 'image')
_COMMON_REQUIRED = {'kind': str, 'schema_version': int, 'id': str, 'lang': str, 'subset': str,
                    'duration': float, 'use_audio_in_video': bool}
_SFT_REQUIRED = {'input_ids': np.int32, 'labels': np.int32, 'segments': np.int8}
_PREFERENCE_REQUIRED = {'prompt_ids': np.int32, 'chosen_ids': np.int32,
                        'rejected_ids': np.int32, 'chosen_segments': np.int8,
                        'rejected_segments': np.int8}
_PREFERENCE_SCALARS = {'clip_id': str, 'chosen': str, 'rejected': str, 'chosen_score': float,
                       'rejected_score': float, 'margin': float, 'ref_chosen_logps': float,
                       'ref_rejected_logps': float}


def _fail(where, field, problem):
  raise RecordError(f'{where}: field {field!r}: {problem}')


def _check_scalar(record, where, field, kind):
  if field not in record:
    _fail(where, field, 'missing')
  value = record[field]
  ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
        else isinstance(value, int) and not isinstance(value, bool) if kind is int
        else isinstance(value, kind))
  if not ok:
    _fail(where, field, f'expected {kind.__name__}, got {type(value).__name__}')


def _check_array(record, where, field, dtype, ndim, required=True):
  if field not in record:
    if required:
      _fail(where, field, 'missing')
    return None
  value = record[field]
  if not isinstance(value, np.ndarray):
    _fail(where, field, f'expected a numpy array, got {type(value).__name__}')
  if value.dtype != np.dtype(dtype) or value.ndim != ndim:
    _fail(where, field, f'expected {np.dtype(dtype).name} with {ndim} dims, got '
                        f'{value.dtype.name}{list(value.shape)}')
  return value


def _check_media(record, where):
  features = _check_array(record, where, 'input_features', np.float32, 2, required=False)
  if features is not None and (features.shape[1] < 1 or not np.isfinite(features).all()):
    _fail(where, 'input_features',
          f'expected finite [mel bins, frames >= 1], got {list(features.shape)}')
  frames = _check_array(record, where, 'frames', np.uint8, 4, required=False)
  if frames is not None:
    if frames.shape[0] < 1 or frames.shape[-1] != 3:
      _fail(where, 'frames', f'expected [T >= 1, H, W, 3] RGB, got {list(frames.shape)}')
    _check_scalar(record, where, 'video_fps', float)
    if not record['video_fps'] > 0:
      _fail(where, 'video_fps', f'expected a positive rate, got {record["video_fps"]}')
  image = _check_array(record, where, 'image', np.uint8, 3, required=False)
  if image is not None and image.shape[-1] != 3:
    _fail(where, 'image', f'expected [H, W, 3] RGB, got {list(image.shape)}')
  if record['use_audio_in_video'] and (features is None or frames is None):
    _fail(where, 'use_audio_in_video', 'set, but the record lacks input_features or frames')


def _where(record, where):
  record_id = record.get('id') if isinstance(record, dict) else None
  label = f'record {record_id!r}' if isinstance(record_id, str) else 'record (id unreadable)'
  return f'{where}: {label}' if where else label


def validate_record(record: Mapping[str, Any], where: str | None = None) -> dict[str, Any]:
  """Checks a decoded record against the schema of its `kind`; returns it as a dict.

  Raises RecordError naming `where` (e.g. 'file:index'), the record id and the field.
  """
  record = dict(record)
  where = _where(record, where)
  for field, kind in _COMMON_REQUIRED.items():
    _check_scalar(record, where, field, kind)
  if record['schema_version'] != SCHEMA_VERSION:
    _fail(where, 'schema_version', f'expected {SCHEMA_VERSION}, got {record["schema_version"]} '
                                   '(re-run saber-preprocess with this version)')
  kind = record['kind']
  if kind == SFT:
    arrays = {f: _check_array(record, where, f, dtype, 1) for f, dtype in _SFT_REQUIRED.items()}
    length = len(arrays['input_ids'])
    for field in ('labels', 'segments'):
      if len(arrays[field]) != length:
        _fail(where, field, f'length {len(arrays[field])} differs from input_ids ({length})')
    if length == 0:
      _fail(where, 'input_ids', 'empty')
  elif kind == PREFERENCE:
    arrays = {f: _check_array(record, where, f, dtype, 1)
              for f, dtype in _PREFERENCE_REQUIRED.items()}
    for field, kind_ in _PREFERENCE_SCALARS.items():
      _check_scalar(record, where, field, kind_)
    for side in ('chosen', 'rejected'):
      if not len(arrays[f'{side}_ids']):
        _fail(where, f'{side}_ids', 'empty')
      if len(arrays[f'{side}_segments']) != len(arrays[f'{side}_ids']):
        _fail(where, f'{side}_segments', f'length differs from {side}_ids')
    if not len(arrays['prompt_ids']):
      _fail(where, 'prompt_ids', 'empty')
  else:
    _fail(where, 'kind', f'expected {SFT!r} or {PREFERENCE!r}, got {kind!r}')
  _check_media(record, where)
  return record


def decode_record(blob: bytes, where: str | None = None) -> dict[str, Any]:
  """The record dict of one blob (arrays are read-only views of `blob`).

  Raises RecordError naming `where`, the record id (when readable) and the bad field.
  """
  try:
    record = unpack(blob)
  except Exception as e:  # msgpack raises several unrelated types on garbage
    raise RecordError(f'{where or "record"}: not a saber_jax record blob '
                      f'({type(e).__name__}: {e})') from None
  return validate_record(record, where)


def _media_fields(input_features, frames, video_fps, image) -> dict[str, Any]:
  media = {}
  if input_features is not None:
    media['input_features'] = np.asarray(input_features, np.float32)
  if frames is not None:
    media['frames'] = np.asarray(frames)
    media['video_fps'] = float(video_fps) if video_fps is not None else None
  if image is not None:
    media['image'] = np.asarray(image)
  return media


def encode_sft_record(*, id: str, lang: str, input_ids, labels, segments, duration: float,
                      subset: str = '', input_features=None, frames=None,
                      video_fps: float | None = None, image=None,
                      use_audio_in_video: bool = False) -> bytes:
  """One SFT record blob (see the module docstring); validated before it is written."""
  record = dict(kind=SFT, schema_version=SCHEMA_VERSION, id=id, lang=lang, subset=subset,
                duration=float(duration), use_audio_in_video=bool(use_audio_in_video),
                input_ids=np.asarray(input_ids, np.int32), labels=np.asarray(labels, np.int32),
                segments=np.asarray(segments, np.int8),
                **_media_fields(input_features, frames, video_fps, image))
  return pack(validate_record(record, 'encode_sft_record'))


def encode_preference_record(*, id: str, lang: str, prompt_ids, chosen_ids, rejected_ids,
                             chosen_segments, rejected_segments, chosen: str, rejected: str,
                             duration: float, clip_id: str | None = None, subset: str = '',
                             chosen_score: float | None = None,
                             rejected_score: float | None = None, margin: float | None = None,
                             ref_chosen_logps: float | None = None,
                             ref_rejected_logps: float | None = None, input_features=None,
                             frames=None, video_fps: float | None = None, image=None,
                             use_audio_in_video: bool = False) -> bytes:
  """One preference record blob; None scores / log-probs are stored as NaN."""
  nan = lambda x: math.nan if x is None else float(x)
  record = dict(
      kind=PREFERENCE, schema_version=SCHEMA_VERSION, id=id,
      clip_id=id if clip_id is None else clip_id, lang=lang, subset=subset,
      duration=float(duration), use_audio_in_video=bool(use_audio_in_video),
      prompt_ids=np.asarray(prompt_ids, np.int32), chosen_ids=np.asarray(chosen_ids, np.int32),
      rejected_ids=np.asarray(rejected_ids, np.int32),
      chosen_segments=np.asarray(chosen_segments, np.int8),
      rejected_segments=np.asarray(rejected_segments, np.int8), chosen=chosen, rejected=rejected,
      chosen_score=nan(chosen_score), rejected_score=nan(rejected_score), margin=nan(margin),
      ref_chosen_logps=nan(ref_chosen_logps), ref_rejected_logps=nan(ref_rejected_logps),
      **_media_fields(input_features, frames, video_fps, image))
  return pack(validate_record(record, 'encode_preference_record'))


def degenerate_pair(chosen, rejected, chosen_score=None, rejected_score=None) -> str | None:
  """Why a preference pair teaches nothing or the wrong thing, or None: equal answers (text
  or token ids; its DPO loss is log 2 whatever the weights) or a chosen answer scored below
  the rejected one (NaN / None scores: unknown, not compared). One rule for the record
  builder, the reference pass and DPO."""
  same = (np.array_equal(np.asarray(chosen), np.asarray(rejected))
          if isinstance(chosen, np.ndarray) else chosen == rejected)
  if same:
    return 'chosen and rejected answers are equal'
  known = [x is not None and not math.isnan(float(x)) for x in (chosen_score, rejected_score)]
  if all(known) and float(chosen_score) < float(rejected_score):
    return f'chosen scored below rejected ({chosen_score} < {rejected_score})'
  return None


def pair_problem(record: Mapping[str, Any]) -> str | None:
  """`degenerate_pair` of a decoded preference record (its texts, token ids and scores)."""
  return (degenerate_pair(record['chosen'], record['rejected'], record.get('chosen_score'),
                          record.get('rejected_score'))
          or degenerate_pair(np.asarray(record['chosen_ids']), np.asarray(record['rejected_ids'])))


def prompt_length(sft_record: Mapping[str, Any]) -> int:
  """Tokens before the response of an SFT record: the leading run of labels == -100."""
  trained = np.flatnonzero(np.asarray(sft_record['labels']) != batch.IGNORE_INDEX)
  return int(trained[0]) if len(trained) else len(sft_record['labels'])


def preference_from_sft(sft_record: Mapping[str, Any], tokenizer, *, chosen: str, rejected: str,
                        pair_id: str | None = None, subset: str | None = None,
                        chosen_score: float | None = None, rejected_score: float | None = None,
                        margin: float | None = None) -> bytes:
  """A preference record over the prompt and media of a decoded SFT record.

  The responses are tokenized as SFT responses are (sed.tokenize_response with the
  '<|im_end|>\\n' suffix), with segments from the SED headers found in each text
  (sed.split_sed_response). Raises ValueError for a response that is empty or starts
  with whitespace (it would tokenize differently after 'assistant\\n') and for a
  degenerate pair (`degenerate_pair`: equal answers, chosen scored below rejected).
  """
  problem = degenerate_pair(chosen, rejected, chosen_score, rejected_score)
  if problem:
    raise ValueError(f'pair {pair_id or sft_record["id"]!r}: {problem}')
  lang = sft_record['lang']
  sides = {}
  for side, text in (('chosen', chosen), ('rejected', rejected)):
    try:
      sides[side] = sed.tokenize_response(tokenizer, sed.split_sed_response(text, lang))
    except ValueError as e:
      raise ValueError(f'pair {pair_id or sft_record["id"]!r}: {side}: {e}') from None
  media = {k: sft_record[k] for k in _MEDIA_FIELDS if k in sft_record}
  return encode_preference_record(
      id=pair_id or sft_record['id'], clip_id=sft_record['id'], lang=lang,
      subset=sft_record['subset'] if subset is None else subset,
      duration=sft_record['duration'], use_audio_in_video=sft_record['use_audio_in_video'],
      prompt_ids=np.asarray(sft_record['input_ids'])[:prompt_length(sft_record)],
      chosen_ids=sides['chosen'][0], chosen_segments=sides['chosen'][1],
      rejected_ids=sides['rejected'][0], rejected_segments=sides['rejected'][1],
      chosen=chosen, rejected=rejected, chosen_score=chosen_score,
      rejected_score=rejected_score, margin=margin, **media)


# --------------------------------------------------------------------------- ArrayRecord


def shard_name(prefix: str, index: int, count: int) -> str:
  """'{prefix}-{index:05d}-of-{count:05d}.array_record'."""
  if not 0 <= index < count:
    raise ValueError(f'shard index {index} is not in [0, {count})')
  return f'{prefix}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}'


def shard_paths(prefix: str) -> list[str]:
  """All shards of `prefix`, in index order; every one of the count must exist.

  Raises FileNotFoundError naming the missing shards (an unfinished preprocessing run)
  or ValueError when shards of different counts share the prefix.
  """
  pattern = re.compile(re.escape(os.path.basename(prefix)) + r'-(\d{5})-of-(\d{5})'
                       + re.escape(SHARD_SUFFIX) + '$')
  found = {}
  for path in glob.glob(glob.escape(prefix) + '-*-of-*' + SHARD_SUFFIX):
    match = pattern.match(os.path.basename(path))
    if match:
      found[int(match[1]), int(match[2])] = path
  if not found:
    raise FileNotFoundError(f'no shards {prefix}-?????-of-?????{SHARD_SUFFIX}')
  counts = {count for _, count in found}
  if len(counts) > 1:
    raise ValueError(f'{prefix}: shards of different counts {sorted(counts)} share this prefix')
  count = counts.pop()
  missing = [shard_name(prefix, i, count) for i in range(count) if (i, count) not in found]
  if missing:
    raise FileNotFoundError(f'{prefix}: {len(missing)} of {count} shards missing, '
                            f'e.g. {missing[0]}')
  return [found[i, count] for i in range(count)]


def _array_record():
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  return array_record_module


def write_records(path: str, blobs: Iterable[bytes], options: str = WRITER_OPTIONS) -> int:
  """Writes blobs to one ArrayRecord file and its size index; returns how many.

  The file is written as '{path}.tmp-{pid}' and renamed onto `path` only once closed, so
  `path` either does not exist or is complete; a failure removes the temporary file.
  """
  rows = []
  with files.atomic_path(path) as tmp:
    writer = _array_record().ArrayRecordWriter(tmp, options)
    try:
      for blob in blobs:
        writer.write(blob)
        rows.append(_index_row(unpack(blob), blob))
    finally:
      writer.close()
  _save_index(path, _index_of(rows))
  return len(rows)


def damaged(where: str, error: BaseException) -> 'RecordError':
  """The RecordError of a shard (or one record of it) Riegeli cannot read: its checksum
  failed, it was cut short; names 'path' or 'path:index'."""
  return RecordError(f'{where}: damaged record file ({type(error).__name__}: {error})')


_RIEGELI_ERRORS = (RuntimeError, OSError, ValueError)


def open_shard(path: str, random_access: bool = False) -> tuple[Any, int]:
  """(an ArrayRecordReader of `path`, its record count); a shard that cannot be opened (cut
  short: its postscript is gone) is a RecordError naming it. `random_access`: no
  readahead (Grain's ArrayRecordDataSource settings), for reads of one record at a time."""
  reader = None
  try:
    reader = (_array_record().ArrayRecordReader(path, options='readahead_buffer_size:0',
                                                file_reader_buffer_size=32768)
              if random_access else _array_record().ArrayRecordReader(path))
    count = reader.num_records()
    return reader, count
  except _RIEGELI_ERRORS as e:
    if reader is not None:
      with contextlib.suppress(*_RIEGELI_ERRORS):
        reader.close()
    raise damaged(path, e) from None


def _close(reader, path: str) -> None:
  try:
    reader.close()
  except _RIEGELI_ERRORS as e:
    raise damaged(path, e) from None


def count_records(paths: str | Sequence[str]) -> int:
  paths = [paths] if isinstance(paths, str) else list(paths)
  total = 0
  for path in paths:
    reader, count = open_shard(path)
    _close(reader, path)
    total += count
  return total


class ShardSource:
  """Global record index -> blob over shards, as Grain's ArrayRecordDataSource, but a
  record Riegeli cannot read is a RecordError naming 'path:index' (the one place every
  random-access reader goes through: the Grain loader, generate). Picklable: the readers
  open lazily in each process."""

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)
    self.starts = np.cumsum([0] + [count_records(p) for p in self.paths])
    self._readers: dict[int, Any] = {}

  def __len__(self):
    return int(self.starts[-1])

  def locate(self, index: int) -> tuple[int, int]:
    file = int(np.searchsorted(self.starts, index, side='right')) - 1
    return file, int(index - self.starts[file])

  def where(self, index: int) -> str:
    file, local = self.locate(index)
    return f'{self.paths[file]}:{local}'

  def __getitem__(self, index: int) -> bytes:
    if not 0 <= index < len(self):
      raise IndexError(f'record {index} of {len(self)}')
    file, local = self.locate(index)
    if file not in self._readers:
      self._readers[file] = open_shard(self.paths[file], random_access=True)[0]
    try:
      return self._readers[file].read([local])[0]
    except _RIEGELI_ERRORS as e:
      raise damaged(f'{self.paths[file]}:{local}', e) from None

  def __getstate__(self):
    return {**self.__dict__, '_readers': {}}


def _read_range(reader, path: str, start: int, stop: int, on_damaged):
  """(where, blob) of records [start, stop); a failed chunk is reread record by record so
  the error names the damaged record itself."""
  try:
    for offset, blob in enumerate(reader.read(start, stop)):
      yield f'{path}:{start + offset}', blob
    return
  except _RIEGELI_ERRORS:
    pass
  for index in range(start, stop):
    try:
      blob = reader.read([index])[0]
    except _RIEGELI_ERRORS as e:
      error = damaged(f'{path}:{index}', e)
      if on_damaged is None:
        raise error from None
      on_damaged(f'{path}:{index}', error)
      continue
    yield f'{path}:{index}', blob


def read_records(paths: str | Sequence[str], chunk: int = 64,
                 on_damaged=None) -> Iterator[tuple[str, bytes]]:
  """Streams ('path:index', blob) of every record of the files, in order.

  Reads `chunk` records at a time, so a shard is never held in memory whole. A shard or
  record Riegeli cannot read is a RecordError naming 'path' or 'path:index'; with
  `on_damaged(where, error)` it is reported there instead and the reading goes on.
  """
  paths = [paths] if isinstance(paths, str) else list(paths)
  for path in paths:
    try:
      reader, total = open_shard(path)
      _close(reader, path)
    except RecordError as e:
      if on_damaged is None:
        raise
      on_damaged(path, e)
      continue
    reader, total = open_shard(path)
    try:
      for start in range(0, total, chunk):
        yield from _read_range(reader, path, start, min(total, start + chunk), on_damaged)
    finally:
      with contextlib.suppress(*_RIEGELI_ERRORS):   # a damaged record was reported above
        reader.close()


def iter_records(paths: str | Sequence[str]) -> Iterator[dict[str, Any]]:
  """Decoded records of the files, in order (errors name 'path:index')."""
  for where, blob in read_records(paths):
    yield decode_record(blob, where)


def fill_reference_logps(paths: Sequence[str], logps: Mapping[Any, tuple[float, float]], *,
                         key: str = 'id', out_dir: str | None = None,
                         missing: str = 'error', drop: Sequence[int] = (),
                         skip_unreadable: bool = False,
                         degenerate: list | None = None) -> dict[str, int]:
  """Rewrites preference shards with `ref_chosen_logps` / `ref_rejected_logps` filled in.

  Args:
    paths: preference shards.
    logps: pair -> (reference chosen log-prob, reference rejected log-prob), summed
      over response tokens (what the reference pass computed).
    key: what identifies a pair in `logps`: 'id' (the record id) or 'index' (its
      position in `paths` taken in order, the pipeline's `pair_index`).
    out_dir: where the new shards go (same file names); None rewrites them in place.
    missing: a record whose id is not in `logps`: 'error' (RecordError naming it) or
      'keep' (its current values stay, e.g. NaN for a pair the pipeline drops as too long).
    drop: positions (in `paths` taken in order) of records left out of the output: those
      the reference pass found damaged.
    skip_unreadable: a record Riegeli cannot read is left out (counted as dropped)
      instead of a RecordError naming it.
    degenerate: a list: degenerate pairs (`pair_problem`) are left out of the output and
      appended to it as {'id', 'where', 'reason'} (counted as 'degenerate'); None: kept.
  Streams shard by shard: read, write a temporary file, rename (see `write_records`).
  Returns counts {'filled', 'kept'} (and 'dropped' with `drop` or `skip_unreadable`,
  'degenerate' with `degenerate`).
  """
  if missing not in ('error', 'keep'):
    raise ValueError(f"missing must be 'error' or 'keep', got {missing!r}")
  if key not in ('id', 'index'):
    raise ValueError(f"key must be 'id' or 'index', got {key!r}")
  counts = {'filled': 0, 'kept': 0, **({'dropped': 0} if drop or skip_unreadable else {}),
            **({'degenerate': 0} if degenerate is not None else {})}
  drop = set(drop)
  seen: set[str] = set()
  position = 0

  def unreadable(where, error):
    nonlocal position
    position += 1
    counts['dropped'] += 1

  def rewritten(path):
    nonlocal position
    for where, blob in read_records(path, on_damaged=unreadable if skip_unreadable else None):
      index, position = position, position + 1
      if index in drop:
        counts['dropped'] += 1
        continue
      record = decode_record(blob, where)
      if record['kind'] != PREFERENCE:
        raise RecordError(f'{where}: record {record["id"]!r}: field \'kind\': expected '
                          f'{PREFERENCE!r}, got {record["kind"]!r}')
      if record['id'] in seen:
        raise RecordError(f'{where}: record {record["id"]!r}: field \'id\': duplicate pair id')
      seen.add(record['id'])
      problem = pair_problem(record) if degenerate is not None else None
      if problem:
        degenerate.append({'id': record['id'], 'where': where, 'reason': problem})
        counts['degenerate'] += 1
        continue
      pair = record['id'] if key == 'id' else index
      if pair in logps:
        chosen, rejected = logps[pair]
        record['ref_chosen_logps'], record['ref_rejected_logps'] = float(chosen), float(rejected)
        counts['filled'] += 1
      elif missing == 'error':
        raise RecordError(f'{where}: record {record["id"]!r}: no reference log-probs given '
                          f'(looked up by {key} {pair!r})')
      else:
        counts['kept'] += 1
      yield pack(validate_record(record, where))

  for path in paths:
    target = path if out_dir is None else os.path.join(out_dir, os.path.basename(path))
    write_records(target, rewritten(path))
  return counts


# --------------------------------------------------------------------------- size index

# Text tokens (SFT: prompt, response; preference: prompt, chosen, rejected) and raw media
# sizes; the pipeline turns them into rows and tower sizes for a model config.
SIZE_FIELDS = ('prompt_tokens', 'response_tokens', 'rejected_tokens', 'mel_frames',
               'video_frames', 'video_height', 'video_width', 'image_height', 'image_width')
SIZES_SUFFIX = '.sizes.npz'


def record_sizes(record: Mapping[str, Any]) -> tuple[int, ...]:
  """The SIZE_FIELDS of one decoded record (0 for what it lacks)."""
  if record['kind'] == PREFERENCE:
    text = (len(record['prompt_ids']), len(record['chosen_ids']), len(record['rejected_ids']))
  else:
    prompt = prompt_length(record)
    text = (prompt, len(record['input_ids']) - prompt, 0)
  mel = record['input_features'].shape[1] if 'input_features' in record else 0
  video = record['frames'].shape[:3] if 'frames' in record else (0, 0, 0)
  image = record['image'].shape[:2] if 'image' in record else (0, 0)
  return (*text, mel, *video, *image)


def sizes_path(shard: str) -> str:
  return shard + SIZES_SUFFIX


_HASHED_BLOCK = 1 << 16


def _fingerprint(shard: str, num_records: int) -> np.ndarray:
  """(bytes, mtime, records, a hash of the first and last 64 KiB): a shard rewritten with
  its mtime kept (copied with `cp -p`, restored from an archive) differs in its head (the
  first chunk) or tail (the index and postscript) unless it is byte for byte the same."""
  stat = os.stat(shard)
  with open(shard, 'rb') as f:
    head = f.read(_HASHED_BLOCK)
    f.seek(max(0, stat.st_size - _HASHED_BLOCK))
    tail = f.read(_HASHED_BLOCK)
  digest = hashlib.blake2b(head + tail, digest_size=8).digest()
  return np.array([stat.st_size, stat.st_mtime_ns, num_records,
                   int.from_bytes(digest, 'little', signed=True)], np.int64)


class Index(NamedTuple):
  """What the size index holds of a shard's records, in order: SIZE_FIELDS [n, fields]
  int32, the ids [n] (str; '' for a damaged record) and an 8-byte hash of each blob [n]
  int64 (to tell a repeated record from another one of the same id)."""
  sizes: np.ndarray
  ids: np.ndarray
  digests: np.ndarray


def _digest(blob: bytes) -> int:
  return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), 'little', signed=True)


def _index_row(record: Mapping[str, Any], blob: bytes) -> tuple:
  return record_sizes(record), str(record['id']), _digest(blob)


def _index_of(rows: list[tuple]) -> Index:
  return Index(np.array([r[0] for r in rows], np.int32).reshape(-1, len(SIZE_FIELDS)),
               np.array([r[1] for r in rows], dtype=np.str_).reshape(-1),
               np.array([r[2] for r in rows], np.int64).reshape(-1))


def _save_index(shard: str, index: Index) -> None:
  with files.atomic_open(sizes_path(shard), 'wb') as f:   # a file object: no '.npz' added
    np.savez(f, sizes=index.sizes, ids=index.ids, digests=index.digests,
             fields=np.array(SIZE_FIELDS), fingerprint=_fingerprint(shard, len(index.sizes)))


def _cached_index(shard: str) -> tuple[Index | None, str]:
  """(index, '') from a valid index file, or (None, why not)."""
  path = sizes_path(shard)
  if not os.path.exists(path):
    return None, 'no size index'
  with np.load(path) as saved:
    if 'ids' not in saved or 'digests' not in saved:
      return None, 'size index without record ids (an older version)'
    index = Index(saved['sizes'], saved['ids'], saved['digests'])
    fields, fingerprint = tuple(saved['fields']), saved['fingerprint']
  if fields != SIZE_FIELDS:
    return None, f'size index of other fields {fields}'
  if not np.array_equal(fingerprint, _fingerprint(shard, len(index.sizes))):
    return None, 'stale size index (the shard was rewritten after it)'
  return index, ''


def _index_shard(shard: str, tolerate_damaged: bool) -> tuple[Index, bool]:
  """(the index of every record, whether all could be read); an unreadable record is
  sized 0 with id '' when `tolerate_damaged`, else its RecordError names it."""
  rows, damaged_any = [], False

  def zero(where, error):
    nonlocal damaged_any
    damaged_any = True
    print(f'{error}; sized 0', file=sys.stderr, flush=True)
    rows.append(((0,) * len(SIZE_FIELDS), '', 0))

  for where, blob in read_records(shard, on_damaged=zero if tolerate_damaged else None):
    try:
      rows.append(_index_row(decode_record(blob, where), blob))
    except RecordError as e:
      if not tolerate_damaged:
        raise
      zero(where, e)
  return _index_of(rows), not damaged_any


def load_index(paths: str | Sequence[str], rebuild: bool = True,
               tolerate_damaged: bool = False) -> list[Index]:
  """The Index of each shard, from its size index file.

  A missing or stale index is rebuilt from its shard and cached beside it (where writable)
  when `rebuild`; otherwise it raises RecordError naming the shard. A record that cannot
  be read or decoded is a RecordError naming 'path:index', or with `tolerate_damaged` a
  row of zeros (and the index is not cached).
  """
  paths = [paths] if isinstance(paths, str) else list(paths)
  out = []
  for shard in paths:
    index, problem = _cached_index(shard)
    if index is None:
      if not rebuild:
        raise RecordError(f'{shard}: {problem}; open it with rebuild=True to index it again')
      print(f'{shard}: {problem}; indexing it', file=sys.stderr, flush=True)
      index, whole = _index_shard(shard, tolerate_damaged)
      try:
        if whole:
          _save_index(shard, index)
      except OSError as e:   # a read-only record set: use the index without caching it
        print(f'{shard}: size index not cached ({e})', file=sys.stderr, flush=True)
    out.append(index)
  return out


def load_sizes(paths: str | Sequence[str], rebuild: bool = True,
               tolerate_damaged: bool = False) -> np.ndarray:
  """int32 [records, len(SIZE_FIELDS)] of the shards, in order (see `load_index`)."""
  return np.concatenate([i.sizes for i in load_index(paths, rebuild, tolerate_damaged)])


def repeated_records(paths: Sequence[str], tolerate_damaged: bool = False) -> list[int]:
  """Global positions (in `paths` taken in order) of records that repeat an earlier one
  byte for byte (the same shard given twice): the caller drops them. Two different
  records of one id are a RecordError naming the id and both places, raised before any
  work (ids come from the size indexes: no record is read when they are current)."""
  first: dict[str, tuple[str, int]] = {}
  repeats, position = [], 0
  for path, index in zip(paths, load_index(paths, tolerate_damaged=tolerate_damaged)):
    for local, (rid, digest) in enumerate(zip(index.ids.tolist(), index.digests.tolist())):
      where = f'{path}:{local}'
      if rid and rid in first:
        seen_where, seen_digest = first[rid]
        if seen_digest != digest:
          raise RecordError(f'duplicate id {rid!r}: {seen_where} and {where} hold different '
                            'records of one id (remove or rename one)')
        repeats.append(position)
      elif rid:
        first[rid] = (where, digest)
      position += 1
  return repeats
