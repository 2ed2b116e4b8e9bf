"""What produced a resumable output, so a rerun never mixes old and new results.

Every resumable output (a judged run's JSONL, a training stage's workdir, a preprocessing
output folder) keeps a `fingerprint.json` beside it: the identity of its inputs (path,
size and modification time of each file), the model or judge and the settings that change
its results. A rerun computes the fingerprint again; when it differs the run stops with
an error naming every field that differs, or, when the user asked to overwrite, clears
the old output and starts fresh.
"""

import json
import os
from typing import Any, Callable, Iterable

from saber_jax import files
from saber_jax.errors import UserError

FILE = 'fingerprint.json'


class Mismatch(UserError):
  """A rerun whose inputs or settings differ from those of the output it would resume."""


def tree_identity(path: str) -> dict | list:
  """Path, size and modification time of a file, or of every file under a directory
  (sorted; local or a URL): changes whenever one is rewritten, without reading it."""
  return files.tree_identity(path)


def files_identity(paths: Iterable[str]) -> list:
  return [tree_identity(p) for p in paths]


def normalize(value: Any) -> Any:
  """`value` as plain JSON (tuples -> lists, ConfigDicts -> dicts), to compare what is
  computed now with what was read back."""
  return json.loads(json.dumps(value, default=_plain, sort_keys=True))


def _plain(value):
  if hasattr(value, 'to_dict'):
    return value.to_dict()
  raise TypeError(f'{type(value).__name__} is not JSON serializable')


def differences(old: Any, new: Any, where: str = '') -> list[str]:
  """Human-readable `field: old -> new` lines, one per differing leaf."""
  if isinstance(old, dict) and isinstance(new, dict):
    return [line for key in sorted(set(old) | set(new), key=str)
            for line in differences(old.get(key, '<absent>'), new.get(key, '<absent>'),
                                    f'{where}.{key}' if where else str(key))]
  if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
    return [line for i, (o, n) in enumerate(zip(old, new))
            for line in differences(o, n, f'{where}[{i}]')]
  if old == new:
    return []
  return [f'{where or "fingerprint"}: {_short(old)} -> {_short(new)}']


def _short(value: Any, limit: int = 120) -> str:
  text = json.dumps(value, sort_keys=True)
  return text if len(text) <= limit else text[:limit] + '...'


def read(path: str) -> Any:
  return files.read_json(path)


def write(path: str, fingerprint: Any) -> None:
  """Atomic, so a kill leaves the old fingerprint or the new one, never half of one."""
  files.write_json(path, fingerprint, indent=1, sort_keys=True)


def ensure(path: str, fingerprint: Any, *, has_output: bool, overwrite: bool,
           clear: Callable[[], None], overwrite_hint: str = '--overwrite',
           writer: bool = True, hold: bool = True) -> str:
  """Checks the output `path` (its fingerprint file) belongs to `fingerprint`.

  has_output: whether any of the output already exists (to resume, or to be replaced);
    a function is asked once the lock is held.
  Returns 'fresh' (nothing there, or cleared by `overwrite`) or 'resume'. Raises
  Mismatch naming every differing field when the output belongs to something else and
  `overwrite` is not set. Only a `writer` (process 0 of a multi-process run) clears and
  writes; the others check the same way.

  Every program claims its output here, so here it becomes the output's one writer: the
  `writer` takes the lock `{path}.lock` (files.acquire_lock; files.LockHeld names a live
  holder) and keeps it until it exits, or, with `hold=False` (runs that share an output
  and lock their own parts, as preprocess shards), only while checking and writing the
  fingerprint, so two runs started at once cannot both find no fingerprint.
  """
  lock = path + files.LOCK_SUFFIX
  if not writer:
    return _ensure(path, fingerprint, has_output=has_output, overwrite=overwrite, clear=clear,
                   overwrite_hint=overwrite_hint, writer=False)
  files.acquire_lock(lock, os.path.dirname(os.path.abspath(path)), wait=0 if hold else 60)
  kept = False
  try:
    state = _ensure(path, fingerprint, has_output=has_output, overwrite=overwrite, clear=clear,
                    overwrite_hint=overwrite_hint, writer=True)
    kept = hold
    return state
  finally:
    if not kept:
      files.release_lock(lock)


def _ensure(path, fingerprint, *, has_output, overwrite, clear, overwrite_hint, writer):
  """`ensure` under the lock; `has_output` may be a function, asked under the lock."""
  fingerprint = normalize(fingerprint)
  has_output = has_output() if callable(has_output) else has_output
  old = None
  if files.exists(path):
    try:
      old = read(path)
    except (OSError, ValueError) as e:
      old = {'<unreadable fingerprint>': str(e)}
  if has_output and old == fingerprint:
    return 'resume'
  if has_output and not overwrite:
    if old is None:
      reason = 'it has no fingerprint file (made by an older version, or by hand)'
    else:
      reason = 'it was produced from other inputs or settings:\n  ' + '\n  '.join(
          differences(old, fingerprint))
    raise Mismatch(f'{os.path.dirname(files.absolute(path))} holds an earlier output that '
                   f'this run would resume, but {reason}\nUse a new output location, or '
                   f'{overwrite_hint} to delete the old output and start fresh.')
  if writer:
    if has_output:
      clear()
    write(path, fingerprint)
  return 'fresh'
