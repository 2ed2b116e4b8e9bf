"""Resumable judged runs: many items through one function with bounded concurrency.

Results are appended to a JSONL file one fsync'ed line per item, finished ids are skipped
on the next run, failures go to errors.jsonl and are retried next time; a fingerprint
beside the results says what produced them, so a rerun never mixes two judges' scores.
"""

import collections
import concurrent.futures
import dataclasses
import os
import sys
import time
from typing import Callable, Iterable, Mapping

import tqdm

from saber_jax import fingerprint
from saber_jax.files import JsonlAppender, read_jsonl, record_id, repair_tail, write_jsonl


class ItemFailure(Exception):
  """An item that could not be done: a line in errors.jsonl (kind, message, the raw
  reply, attempts), retried by the next run, rather than the end of this one."""

  def __init__(self, kind: str, message: str, raw: str | None = None, attempts: int = 0):
    super().__init__(f'{kind}: {message}')
    self.kind, self.message, self.raw, self.attempts = kind, message, raw, attempts


class ItemError(ItemFailure):
  """Bad input for one item (missing file, undecodable media, no reference)."""


def compact_errors(errors_path: str, done: set[str]) -> int:
  """Rewrites errors.jsonl to the latest record per id still unfinished; returns how
  many ids remain failed."""
  if not os.path.exists(errors_path):
    return 0
  repair_tail(errors_path)
  latest = collections.OrderedDict()
  for r in read_jsonl(errors_path):
    rid = str(r.get('id'))
    if rid not in done:
      latest.pop(rid, None)
      latest[rid] = r
  write_jsonl(errors_path, latest.values())
  return len(latest)


def error_record(item_id: str, exc: ItemFailure) -> dict:
  return {'id': item_id, 'kind': exc.kind, 'message': exc.message, 'raw': exc.raw,
          'attempts': exc.attempts, 'time': time.strftime('%Y-%m-%dT%H:%M:%S')}


@dataclasses.dataclass
class RunSummary:
  done: int = 0      # finished in this run
  skipped: int = 0   # already in the output from an earlier run
  failed: int = 0    # failed in this run (in errors.jsonl, retried next run)
  errors_path: str = ''

  def line(self) -> str:
    text = f'done={self.done} skipped={self.skipped} failed={self.failed}'
    if self.failed:
      text += f' (see {self.errors_path}; rerun to retry)'
    return text


def finished_ids(out_path: str) -> set[str]:
  """Ids already in a results file (after dropping a truncated tail)."""
  if not os.path.exists(out_path):
    return set()
  repair_tail(out_path)
  return {record_id(r, out_path) for r in read_jsonl(out_path)}


def fingerprint_path(out_path: str) -> str:
  return os.path.splitext(out_path)[0] + '.' + fingerprint.FILE


def run_jobs(items: Iterable[Mapping], process: Callable[[Mapping], dict], *,
             out_path: str, errors_path: str, concurrency: int = 4,
             max_items: int | None = None, total: int | None = None,
             desc: str = 'judge', log: Callable[[str], None] | None = None,
             produced_by: Mapping | None = None, overwrite: bool = False) -> RunSummary:
  """Runs `process` on each item not yet in `out_path`, at most `concurrency` at once.

  items: records with an 'id' (streamed; at most 2 * concurrency held in flight); the
  tools check their input's ids are unique before calling (see cli/_common.run_judged).
  process(item) -> result dict, written with the item's id; an ItemFailure (a
  JudgeError, an ItemError) becomes a line in `errors_path`; any other exception stops
  the run (a bug, not data).
  max_items: stop after starting this many new items (smoke runs, tests).
  produced_by: what produces the results (inputs, judge, settings), kept beside
  `out_path`; resuming an output produced otherwise raises fingerprint.Mismatch naming
  what differs, unless `overwrite` deletes it (and its errors) first.
  """
  if concurrency < 1:
    raise ValueError(f'concurrency must be >= 1, got {concurrency}')
  log = log or (lambda s: print(s, file=sys.stderr))
  if produced_by is not None:
    def clear():
      for path in (out_path, errors_path):
        if os.path.exists(path):
          os.remove(path)
    fingerprint.ensure(fingerprint_path(out_path), produced_by, overwrite=overwrite, clear=clear,
                       has_output=any(os.path.exists(p) for p in (out_path, errors_path)))
  done_before = finished_ids(out_path)
  repair_tail(errors_path)
  previously_failed = compact_errors(errors_path, done_before)
  if done_before or previously_failed:
    log(f'{out_path}: {len(done_before)} already done, {previously_failed} failed before '
        '(retrying those)')
  summary = RunSummary(errors_path=errors_path)
  seen: set[str] = set()
  out, errors = JsonlAppender(out_path), JsonlAppender(errors_path)
  bar = tqdm.tqdm(total=total, desc=desc, mininterval=1.0, file=sys.stderr, dynamic_ncols=True)

  def finish(future, item_id):
    try:
      result = future.result()
    except ItemFailure as exc:
      errors.append(error_record(item_id, exc))
      summary.failed += 1
    else:
      out.append({'id': item_id, **{k: v for k, v in result.items() if k != 'id'}})
      summary.done += 1
    bar.update(1)

  started = 0
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency)
  pending: dict[concurrent.futures.Future, str] = {}
  try:
    for index, item in enumerate(items):
      item_id = record_id(item, f'item {index}')
      if item_id in seen:
        raise ValueError(f'duplicate id {item_id!r} in the input (item {index})')
      seen.add(item_id)
      if item_id in done_before:
        summary.skipped += 1
        bar.update(1)
        continue
      if max_items is not None and started >= max_items:
        continue  # keep reading only to count what is already done
      while len(pending) >= 2 * concurrency:
        finished, _ = concurrent.futures.wait(pending, return_when='FIRST_COMPLETED')
        for f in finished:
          finish(f, pending.pop(f))
      pending[pool.submit(process, item)] = item_id
      started += 1
    for f in concurrent.futures.as_completed(list(pending)):
      finish(f, pending.pop(f))
  finally:
    for f in pending:
      f.cancel()
    pool.shutdown(wait=True, cancel_futures=True)
    bar.close()
    out.close()
    errors.close()
    compact_errors(errors_path, finished_ids(out_path))
  print(summary.line(), flush=True)
  return summary
