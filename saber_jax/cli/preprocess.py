"""Turn clips + SABER annotations into SFT records (ArrayRecord shards) for training.

  saber-preprocess --manifest clips.jsonl --annotations ann.jsonl --out DIR \\
      [--exclude test/test_set.jsonl | --only test/test_set.jsonl] \\
      [--num-shards N [--shard-index I]] [--workers W] [--tokenizer PATH]

Inputs
  --manifest: one JSON object per line, {"id", "video"?, "audio"?, "lang", "subset"?};
    paths are absolute or relative to the manifest's folder; lang is 'en' or 'zh'.
    When there is no "audio" the video's own audio track is used.
  --annotations: one line per clip, {"id": ..., "annotation": {six SABER fields}}
    (or the annotator's raw JSON text), see saber_jax.data.annotation.
  --exclude / --only: a JSONL whose lines have an "id" (saber-build-test-set's
    test_set.jsonl) or a text file of ids, one a line. --exclude leaves those clips out
    (the held-out test clips, so SABER-Test is never measured on training clips);
    --only keeps just those (the test set's own records, for mode=generate). Clips left
    out are counted in stats.json ("left_out"), not rejected.

Per clip: annotation check -> probe -> filters -> audio -> log-mel -> video frames (fps 2,
at most 40 frames, at most 50176 pixels each) -> SED prompt (the video's audio interleaved
with it, as Qwen2.5-Omni's use_audio_in_video) -> SED target -> record. Filters, in order
(the first that applies is the clip's reject reason):
  no_annotation / bad_annotation   no annotation line for the id, or one that fails the schema
  missing_file / unreadable_media  a path that does not exist, a file PyAV cannot read, or a
                                   truncated video (fewer frames than its header claims)
  no_video / no_audio              SABER needs both tracks
  too_short / too_long             video or decoded audio < 0.5 s or > 30 s (the paper's range)
  av_mismatch                      decoded audio and video lengths differ by more than 1 s
  low_resolution                   short side < 112 px. Ours: four merge units of 28 px;
                                   below that a face spans a handful of 14-px patches
  error                            anything unexpected, with its message (never a crash)

Sharding: clip i goes to shard sha256(id) mod N, so the assignment does not depend on line
order and the manifest and annotation files need not be aligned. Lines without a readable
id are reported by shard 0. Without --shard-index every shard is run in turn; with it, only
that one, so shards can run on separate machines and write to the same DIR.

Outputs under DIR:
  sft-IIIII-of-NNNNN.array_record    SFT records of shard I (saber_jax.data.records)
  parts/rejects-IIIII-of-NNNNN.jsonl one line per rejected clip or annotation line:
                                     {"id", "reason", "message"}
  parts/stats-IIIII-of-NNNNN.json    the shard's counts; written last, it marks the shard done
  rejects.jsonl, stats.json          all finished shards merged (rewritten after each shard)
Every manifest line is either a record or a reject (stats: clips == sum of outcomes), and
every annotation line that matches no clip is a reject too. A re-run skips shards whose
stats part exists; a killed run redoes only unfinished shards, whose files are replaced
whole (records are written under a temporary name and renamed), so nothing is duplicated;
the temporary files and pool workers of a run killed even by SIGKILL do not outlive it
(workers die with the parent; the rerun removes the files).
OUT/fingerprint.json records the manifest and annotation files (path, size, mtime), the
tokenizer, the filters and the shard count: a rerun with any of them changed (clips
added to the manifest) is an error naming what differs, or starts fresh with --overwrite.
A run that finishes every shard with no record at all exits 1 naming the counts and the
most frequent reject reason.
"""

import argparse
import collections
import concurrent.futures
import ctypes
import dataclasses
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import traceback

import tqdm

from saber_jax import files, fingerprint
from saber_jax.cli import _common
from saber_jax.data import annotation as annotation_lib
from saber_jax.data import clips
from saber_jax.data import prompt as prompt_lib
from saber_jax.data import records
from saber_jax.data.clips import Reject, Settings

LANGS = ('en', 'zh')
RECORD_PREFIX = 'sft'
# Token-length histogram edges of the report (coarser than the default length buckets of
# data.examples.DataConfig, every 256 tokens).
LENGTH_EDGES = (256, 512, 1024, 2048, 4096)


def shard_of(clip_id: str, num_shards: int) -> int:
  """Stable shard of a clip id: sha256 of its UTF-8 bytes, mod num_shards."""
  digest = hashlib.sha256(str(clip_id).encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') % num_shards


def _reject(clip_id, reason, message):
  return {'id': clip_id, 'reason': reason, 'message': message}


# --------------------------------------------------------------------------- inputs


def _manifest_entry(line: bytes, base: str, where: str) -> dict:
  """A parsed manifest line (paths made absolute); Reject('bad_manifest') when unusable."""
  try:
    entry = json.loads(line.decode('utf-8'))
  except UnicodeDecodeError as e:
    raise Reject('bad_manifest', f'{where}: not UTF-8 text (byte {e.start} of the line)') from None
  except json.JSONDecodeError as e:
    raise Reject('bad_manifest', f'{where}: invalid JSON ({e.msg} at column {e.colno})') from None
  if not isinstance(entry, dict):
    raise Reject('bad_manifest', f'{where}: expected a JSON object')
  clip_id = entry.get('id')
  if isinstance(clip_id, bool) or not isinstance(clip_id, (str, int)) or clip_id == '':
    raise Reject('bad_manifest', f'{where}: field "id": expected a non-empty string')
  clip_id = str(clip_id)
  lang = entry.get('lang')
  if lang not in LANGS:
    raise Reject('bad_manifest', f'{where}: clip {clip_id!r}: field "lang": expected one of '
                                 f'{LANGS}, got {lang!r}')
  paths = {}
  for key in ('video', 'audio'):
    value = entry.get(key)
    if value is None:
      continue
    if not isinstance(value, str) or not value:
      raise Reject('bad_manifest', f'{where}: clip {clip_id!r}: field {key!r}: expected a path')
    paths[key] = value if os.path.isabs(value) else os.path.join(base, value)
  if not paths:
    raise Reject('bad_manifest', f'{where}: clip {clip_id!r}: needs "video" and/or "audio"')
  subset = entry.get('subset', '')
  if not isinstance(subset, str):
    raise Reject('bad_manifest', f'{where}: clip {clip_id!r}: field "subset": expected a string')
  return {'id': clip_id, 'lang': lang, 'subset': subset, 'where': where, **paths}


def read_ids(path: str) -> set[str]:
  """The ids a selection file names: a JSONL of records with an "id", or plain text, one
  id a line."""
  with open(path, encoding='utf-8') as f:
    first = next((line for line in f if line.strip()), '')
  if first.lstrip().startswith('{'):
    return {files.record_id(r, f'{path} record {n}')
            for n, r in enumerate(files.read_jsonl(path), 1)}
  with open(path, encoding='utf-8') as f:
    return {line.strip() for line in f if line.strip()}


def selection(exclude: str | None, only: str | None):
  """clip id -> whether this run takes the clip (--exclude / --only)."""
  excluded = read_ids(exclude) if exclude else set()
  kept = read_ids(only) if only else None
  return lambda clip_id: clip_id not in excluded and (kept is None or clip_id in kept)


def read_manifest(path: str, shard_index: int, num_shards: int, selected=lambda clip_id: True):
  """(entries, rejects, left out) of this shard, entries in line order; duplicates are
  rejects; clips `selected` refuses are only counted."""
  base = os.path.dirname(os.path.abspath(path))
  entries, rejects, seen, left_out = [], [], set(), 0
  for number, raw in files.raw_lines(path):   # one bad byte is one bad line
    where = f'{path}:{number}'
    try:
      entry = _manifest_entry(raw, base, where)
    except Reject as e:
      loose = _loose_id(raw)
      if loose is not None and not selected(str(loose)):
        left_out += shard_index == 0
      elif shard_index == 0:  # lines without a usable id are reported once, by shard 0
        rejects.append(_reject(loose, e.reason, e.message))
      continue
    if shard_of(entry['id'], num_shards) != shard_index:
      continue
    if not selected(entry['id']):
      left_out += 1
      continue
    if entry['id'] in seen:
      rejects.append(_reject(entry['id'], 'duplicate_clip', f'{where}: id already listed'))
      continue
    seen.add(entry['id'])
    entries.append(entry)
  return entries, rejects, left_out


def _loose_id(line):
  try:
    value = json.loads(line).get('id')
    return value if isinstance(value, (str, int)) and not isinstance(value, bool) else None
  except (ValueError, AttributeError):   # not JSON, not UTF-8, not an object
    return None


def read_shard_annotations(path: str, shard_index: int, num_shards: int,
                           selected=lambda clip_id: True):
  """{id: Annotation | AnnotationError} of this shard's `selected` clips, and rejects for
  duplicate lines and (shard 0 only) lines whose id cannot be read."""
  found, rejects = {}, []
  for clip_id, result in annotation_lib.read_annotations(
      path, allow_empty=annotation_lib.SILENT_CLIP_MAY_BE_EMPTY):
    if clip_id is None:
      if shard_index == 0:
        rejects.append(_reject(None, 'bad_annotation', str(result)))
      continue
    clip_id = str(clip_id)
    if shard_of(clip_id, num_shards) != shard_index or not selected(clip_id):
      continue
    if clip_id in found:
      source = getattr(result, 'source', None) or path
      rejects.append(_reject(clip_id, 'duplicate_annotation',
                             f'{source}: clip {clip_id!r}: a second annotation line '
                             '(the first is used)'))
      continue
    found[clip_id] = result
  return found, rejects


# --------------------------------------------------------------------------- one clip

_TOKENIZER = None


def _init_worker(tokenizer_path, parent_pid=None):
  global _TOKENIZER
  if parent_pid is not None:
    _die_with_parent(parent_pid)
  _TOKENIZER = prompt_lib.load_tokenizer(tokenizer_path)


def _die_with_parent(parent_pid: int) -> None:
  """A pool worker ends when the run does, even one killed by SIGKILL (which gives the
  pool no chance to stop its workers): the kernel sends SIGKILL on the parent's death."""
  if sys.platform.startswith('linux'):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
  if os.getppid() != parent_pid:   # the parent died before prctl took effect
    os._exit(1)


def process_clip(job):
  """Worker entry: ('ok', blob, info) or ('reject', reject dict, None); never raises."""
  entry, annotation, settings = job
  try:
    blob, info = clips.build_record(entry, annotation, settings, _TOKENIZER)
    return 'ok', blob, info
  except Reject as e:
    return 'reject', _reject(entry['id'], e.reason, e.message), None
  except Exception as e:  # a bug or an unforeseen input: report it, keep going
    last = traceback.format_exception_only(type(e), e)[-1].strip()
    message = f'{entry["where"]}: clip {entry["id"]!r}: {last}'
    return 'reject', _reject(entry['id'], 'error', message), None


# --------------------------------------------------------------------------- stats


def _summary():
  return {'count': 0, 'sum': 0, 'min': None, 'max': None}


def _add(summary, value):
  summary['count'] += 1
  summary['sum'] += value
  summary['min'] = value if summary['min'] is None else min(summary['min'], value)
  summary['max'] = value if summary['max'] is None else max(summary['max'], value)


def _merge_summary(into, other):
  into['count'] += other['count']
  into['sum'] += other['sum']
  for key, pick in (('min', min), ('max', max)):
    if other[key] is not None:
      into[key] = other[key] if into[key] is None else pick(into[key], other[key])


def _histogram_key(length):
  for edge in LENGTH_EDGES:
    if length <= edge:
      return f'<={edge}'
  return f'>{LENGTH_EDGES[-1]}'


def new_stats(shard_index, num_shards):
  return {'shard_index': shard_index, 'num_shards': num_shards, 'clips': 0, 'records': 0,
          'outcomes': {}, 'annotation_rejects': {}, 'rejects': 0, 'left_out': 0,
          'duration_seconds': _summary(),
          'tokens': {k: _summary() for k in ('prompt', 'response', 'total')},
          'total_tokens_histogram': {}}


def _count(table, key):
  table[key] = table.get(key, 0) + 1


# --------------------------------------------------------------------------- shards


def _part(out, kind, shard_index, num_shards, ext):
  return os.path.join(out, 'parts', f'{kind}-{shard_index:05d}-of-{num_shards:05d}.{ext}')


def _picklable(annotation):
  return str(annotation) if isinstance(annotation, annotation_lib.AnnotationError) else annotation


def _ordered_map(pool, fn, jobs, window):
  """fn over jobs in the pool, results in job order, at most `window` jobs in flight
  (finished records wait in memory for the writer; a shard's worth would not fit)."""
  pending = collections.deque()
  for job in jobs:
    pending.append(pool.submit(fn, job))
    if len(pending) >= window:
      yield pending.popleft().result()
  while pending:
    yield pending.popleft().result()


def run_shard(args, shard_index, settings, pool) -> dict:
  """Processes one shard; returns its stats (also written, last, as the done marker)."""
  n = args.num_shards
  selected = selection(args.exclude, args.only)
  entries, rejects, left_out = read_manifest(args.manifest, shard_index, n, selected)
  annotations, annotation_rejects = read_shard_annotations(args.annotations, shard_index, n,
                                                           selected)
  stats = new_stats(shard_index, n)
  stats['left_out'] = left_out
  stats['clips'] = len(entries) + sum(1 for r in rejects
                                      if r['reason'] in ('bad_manifest', 'duplicate_clip'))
  for r in rejects:
    _count(stats['outcomes'], r['reason'])
  listed = {e['id'] for e in entries}
  for clip_id in annotations:
    if clip_id not in listed:
      annotation_rejects.append(_reject(
          clip_id, 'annotation_without_clip',
          f'{args.annotations}: clip {clip_id!r} is not in the manifest'))
  for r in annotation_rejects:
    _count(stats['annotation_rejects'], r['reason'])
  rejects += annotation_rejects

  # Schema errors travel as their message: AnnotationError does not survive pickling intact.
  jobs = [(e, _picklable(annotations.get(e['id'])), settings) for e in entries]
  results = (_ordered_map(pool, process_clip, jobs, 4 * args.workers) if pool
             else map(process_clip, jobs))
  progress = tqdm.tqdm(total=len(jobs), desc=f'shard {shard_index}/{n}', unit='clip',
                       disable=args.quiet)

  def blobs():
    for status, payload, info in results:
      progress.update()
      if status == 'ok':
        _count(stats['outcomes'], 'ok')
        stats['records'] += 1
        _add(stats['duration_seconds'], info['duration'])
        for key in ('prompt', 'response', 'total'):
          _add(stats['tokens'][key], info[f'{key}_tokens'])
        _count(stats['total_tokens_histogram'], _histogram_key(info['total_tokens']))
        yield payload
      else:
        _count(stats['outcomes'], payload['reason'])
        rejects.append(payload)

  records.write_records(os.path.join(args.out, records.shard_name(RECORD_PREFIX, shard_index, n)),
                        blobs())
  progress.close()
  stats['rejects'] = len(rejects)
  files.write_jsonl(_part(args.out, 'rejects', shard_index, n, 'jsonl'), rejects)
  files.write_json(_part(args.out, 'stats', shard_index, n, 'json'), stats, indent=1)
  return stats


def _outputs(out) -> list[str]:
  return (glob.glob(os.path.join(glob.escape(out), f'{RECORD_PREFIX}-*-of-*.array_record*'))
          + [p for p in (os.path.join(out, n) for n in ('parts', 'rejects.jsonl', 'stats.json'))
             if os.path.exists(p)])


def claim_output(args, settings) -> None:
  """OUT's fingerprint: the manifest and annotation files, the tokenizer, the filters and
  the shard count. A rerun after the manifest changed (clips added) is an error naming
  what differs, or starts fresh with --overwrite, never 'complete' with clips ignored."""
  produced_by = {
      'manifest': fingerprint.tree_identity(args.manifest),
      'annotations': fingerprint.tree_identity(args.annotations),
      'tokenizer': fingerprint.tree_identity(args.tokenizer) if args.tokenizer else 'offline',
      'settings': dataclasses.asdict(settings), 'num_shards': args.num_shards,
      **{k: fingerprint.tree_identity(getattr(args, k)) for k in ('exclude', 'only')
         if getattr(args, k)}}

  def clear():
    for path in _outputs(args.out):
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

  # Shard runs of one output may start together: the check-and-write happens under the
  # fingerprint's lock, and a fingerprint another shard run wrote counts as output, so
  # a run with other settings is refused even before any shard has written a record.
  path = os.path.join(args.out, fingerprint.FILE)
  fingerprint.ensure(path, produced_by, hold=False, overwrite=args.overwrite, clear=clear,
                     has_output=lambda: bool(_outputs(args.out)) or os.path.exists(path))


def shard_lock(out: str, index: int, num_shards: int) -> str:
  """The lock a run holds while it writes shard `index`: shard runs of one output run
  side by side, two runs of one shard never."""
  return os.path.join(out, f'shard-{index:05d}-of-{num_shards:05d}{files.LOCK_SUFFIX}')


def remove_stale_tmp(out, shards, num_shards) -> None:
  """Temporary files a killed run left: those of the shards about to run, and merged
  files whose writer process is gone."""
  for i in shards:
    for pattern in (records.shard_name(RECORD_PREFIX, i, num_shards),
                    os.path.join('parts', f'*-{i:05d}-of-{num_shards:05d}.*')):
      for path in glob.glob(os.path.join(glob.escape(out), pattern + '.tmp-*')):
        os.remove(path)
  for name in ('rejects.jsonl', 'stats.json', fingerprint.FILE):
    for path in glob.glob(os.path.join(glob.escape(out), name + '.tmp-*')):
      pid = path.rsplit('.tmp-', 1)[1]
      if pid.isdigit() and not os.path.exists(f'/proc/{pid}'):
        os.remove(path)


def merge_shard_parts(out, num_shards) -> dict:
  """Rewrites OUT/stats.json and OUT/rejects.jsonl from the finished shards' parts."""
  total = new_stats(None, num_shards)
  del total['shard_index']
  total['shards_done'] = []
  rejects = []
  for i in range(num_shards):
    stats_path = _part(out, 'stats', i, num_shards, 'json')
    if not os.path.exists(stats_path):
      continue
    part = files.read_json(stats_path)
    total['shards_done'].append(i)
    for key in ('clips', 'records', 'rejects', 'left_out'):
      total[key] += part.get(key, 0)
    for key in ('outcomes', 'annotation_rejects', 'total_tokens_histogram'):
      for name, count in part[key].items():
        total[key][name] = total[key].get(name, 0) + count
    _merge_summary(total['duration_seconds'], part['duration_seconds'])
    for key in total['tokens']:
      _merge_summary(total['tokens'][key], part['tokens'][key])
    rejects += files.read_jsonl(_part(out, 'rejects', i, num_shards, 'jsonl'))
  total['complete'] = len(total['shards_done']) == num_shards
  for summary in [total['duration_seconds'], *total['tokens'].values()]:
    summary['mean'] = summary['sum'] / summary['count'] if summary['count'] else None
  files.write_jsonl(os.path.join(out, 'rejects.jsonl'), rejects)
  files.write_json(os.path.join(out, 'stats.json'), total, indent=1)
  return total


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--manifest', required=True)
  parser.add_argument('--annotations', required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--exclude', help='ids to leave out (a JSONL with "id"s, e.g. the '
                      "test set's test_set.jsonl, or one id a line)")
  parser.add_argument('--only', help='take just these ids (same formats as --exclude)')
  parser.add_argument('--num-shards', type=_common.at_least(1), default=1)
  parser.add_argument('--shard-index', type=_common.at_least(0), default=None,
                      help='run only this shard (default: every shard in turn)')
  parser.add_argument('--workers', type=_common.at_least(1), default=1,
                      help='processes for the per-clip work (>= 1)')
  parser.add_argument('--tokenizer', default=None,
                      help='Qwen2.5-Omni tokenizer directory (default: the offline one)')
  parser.add_argument('--min-seconds', type=_common.at_least(0.0, float),
                      default=Settings.min_seconds, help='>= 0')
  parser.add_argument('--max-seconds', type=_common.positive(float),
                      default=Settings.max_seconds, help='> --min-seconds')
  parser.add_argument('--min-side', type=_common.at_least(1), default=Settings.min_side,
                      help='pixels, >= 1')
  parser.add_argument('--force', action='store_true', help='redo shards already done')
  parser.add_argument('--overwrite', action='store_true',
                      help='delete an earlier output made from other inputs or settings')
  parser.add_argument('--quiet', action='store_true', help='no progress bar')
  args = parser.parse_args(_common.dashed(argv, parser))
  if args.max_seconds <= args.min_seconds:
    parser.error(f'argument --max-seconds: must be > --min-seconds ({args.min_seconds}), '
                 f'got {args.max_seconds}')
  if args.shard_index is not None and not 0 <= args.shard_index < args.num_shards:
    parser.error(f'--shard-index must be in [0, {args.num_shards})')
  for path in (args.manifest, args.annotations, args.exclude, args.only):
    if path is not None and not os.path.isfile(path):
      parser.error(f'{path}: no such file')
  settings = Settings(min_seconds=args.min_seconds, max_seconds=args.max_seconds,
                      min_side=args.min_side)
  shards = range(args.num_shards) if args.shard_index is None else [args.shard_index]
  os.makedirs(args.out, exist_ok=True)
  try:
    claim_output(args, settings)
    for i in shards:      # before any work: a second run of a shard exits at once
      files.acquire_lock(shard_lock(args.out, i, args.num_shards), f'{args.out} shard {i}')
  except (fingerprint.Mismatch, files.LockHeld) as e:
    parser.exit(1, f'error: {e}\n')
  todo = [i for i in shards if args.force or not os.path.exists(
      _part(args.out, 'stats', i, args.num_shards, 'json'))]
  remove_stale_tmp(args.out, todo, args.num_shards)
  if not args.quiet and len(todo) < len(shards):
    print(f'{len(shards) - len(todo)} shard(s) already done, skipped', file=sys.stderr)
  pool = None
  if todo and args.workers > 1:
    pool = concurrent.futures.ProcessPoolExecutor(
        args.workers, mp_context=multiprocessing.get_context('spawn'),
        initializer=_init_worker, initargs=(args.tokenizer, os.getpid()))
  elif todo:
    _init_worker(args.tokenizer)
  merge_lock = os.path.join(args.out, 'merge' + files.LOCK_SUFFIX)
  try:
    for i in todo:
      run_shard(args, i, settings, pool)
      with files.locked(merge_lock):
        merge_shard_parts(args.out, args.num_shards)
  finally:
    if pool:
      pool.shutdown()
  with files.locked(merge_lock):
    total = merge_shard_parts(args.out, args.num_shards)
  for i in shards:
    files.release_lock(shard_lock(args.out, i, args.num_shards))
  if not args.quiet:
    print(json.dumps({k: total[k] for k in ('clips', 'records', 'rejects', 'left_out', 'outcomes',
                                            'annotation_rejects', 'complete')}, ensure_ascii=False))
  if total['complete'] and not total['records']:
    reasons = {k: v for k, v in total['outcomes'].items() if k != 'ok'}
    top = max(reasons.items(), key=lambda kv: kv[1])[0] if reasons else 'no clips selected'
    parser.exit(1, f"error: saber-preprocess wrote no record: {total['clips']} clips, "
                   f"{total['rejects']} rejects, {total['left_out']} left out; most frequent "
                   f"reason: {top} (see {os.path.join(args.out, 'rejects.jsonl')})\n")
  return total


if __name__ == '__main__':
  os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
  main()
