"""Every file the package writes or reads record by record, in one place.

Two kinds of operation, kept apart on purpose:
- whole files (atomic writes of text, JSON, JSONL, bytes, a directory swap; reads of
  JSONL that name file and line): a reader never sees half a file, a kill leaves the old
  one or the new one. These take a local path or a URL (`gs://bucket/...`, any scheme
  `etils.epath` opens): a local file is written under a temporary name and renamed; an
  object is written directly, since an object write is atomic by itself. `exists`,
  `listdir`, `with_prefix`, `remove`, `rmtree`, `upload`, `download` and `tree_identity`
  work on both kinds.
- local append-only files (durable appends, torn-tail reads and repair): they need
  O_APPEND, fsync and truncate of a POSIX file, which an object store has none of.
Plus the record vocabulary the JSONL tools share: `record_id`, `load_by_id`, duplicate-id
checks and sharding by line; and the output lock (`acquire_lock`): one writer per output.
"""

import atexit
import contextlib
import glob
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

from saber_jax.errors import UserError
from etils import epath

Path = str | os.PathLike


# ------------------------------------------------------------------------- local or URL

def is_url(path: Path) -> bool:
  """Whether `path` names an object store location (`gs://...`) rather than a local file."""
  return '://' in os.fspath(path)


def absolute(path: Path) -> str:
  """A local path made absolute; a URL as it is (os.path.abspath would make `gs://b/x`
  a local folder `gs:`)."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(path)


def exists(path: Path) -> bool:
  return epath.Path(path).exists() if is_url(path) else os.path.exists(path)


def is_dir(path: Path) -> bool:
  return epath.Path(path).is_dir() if is_url(path) else os.path.isdir(path)


def listdir(path: Path) -> list[str]:
  """The names in a directory (a URL prefix); none when it does not exist."""
  if is_url(path):
    path = epath.Path(path)
    return sorted(p.name for p in path.iterdir()) if path.exists() else []
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def with_prefix(prefix: Path) -> list[str]:
  """Every file (object) whose path starts with `prefix`, in the folder `prefix` names,
  sorted. A URL's is listed afresh (not from the listing cache), so it counts objects
  other processes or hosts wrote since this one last looked."""
  prefix = os.fspath(prefix)
  if is_url(prefix):
    folder, name = prefix.rsplit('/', 1)
    return sorted(os.fspath(p) for p in epath.Path(folder).glob(glob.escape(name) + '*'))
  return sorted(glob.glob(glob.escape(prefix) + '*'))


def remove(path: Path) -> None:
  """Removes a file (an object); nothing when it does not exist."""
  if is_url(path):
    epath.Path(path).unlink(missing_ok=True)
  else:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


def rmtree(path: Path) -> None:
  """Removes a directory tree or a file; nothing when it does not exist."""
  if is_url(path):
    path = epath.Path(path)
    if path.is_dir():
      path.rmtree()
    elif path.exists():
      path.unlink()
  elif os.path.isdir(path):
    shutil.rmtree(path)
  elif os.path.exists(path):
    os.remove(path)


def walk_files(path: Path) -> list[str]:
  """Every file under a directory (local or URL), sorted."""
  if is_url(path):
    scheme = os.fspath(path).split('://')[0] + '://'      # fsspec walks without it
    with_scheme = lambda root: os.fspath(root) if is_url(root) else scheme + os.fspath(root)
    return sorted(f'{with_scheme(root)}/{name}' for root, _, names in epath.Path(path).walk()
                  for name in names)
  return sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names)


def tree_identity(path: Path) -> dict | list:
  """A file's path, size and modification time (or every file's under a directory):
  changes whenever a file is rewritten, without reading it (inputs can be gigabytes)."""
  path = os.fspath(path)
  if is_dir(path):
    return [tree_identity(file) for file in walk_files(path)]
  if is_url(path):
    stat = epath.Path(path).stat()
    return {'path': path, 'size': stat.length, 'mtime_ns': int(stat.mtime) * 10**9}
  stat = os.stat(path)
  return {'path': os.path.abspath(path), 'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns}


def upload(local: str, url: Path) -> None:
  """Copies a local file, or a directory tree file by file, to `url` (overwriting)."""
  if os.path.isdir(local):
    for root, _, names in os.walk(local):
      for name in names:
        source = os.path.join(root, name)
        upload(source, f'{os.fspath(url)}/{os.path.relpath(source, local)}')
    return
  with open(local, 'rb') as f:
    epath.Path(url).write_bytes(f.read())     # one object write: whole or not at all


def download(url: Path, local: str) -> bool:
  """Copies the file or directory tree at `url` to `local` (atomically per file); False
  when there is nothing at `url`."""
  source = epath.Path(url)
  if not source.exists():
    return False
  if not source.is_dir():
    write_bytes(local, source.read_bytes())
    return True
  for file in walk_files(url):
    download(file, os.path.join(local, os.path.relpath(file, os.fspath(url))))
  return True


@contextlib.contextmanager
def local_copy(path: Path) -> Iterator[str]:
  """`path` itself when it is local; a URL's file or tree downloaded into a temporary
  directory (removed afterwards), for readers that need local files (memory-mapped
  safetensors)."""
  if not is_url(path):
    yield os.fspath(path)
    return
  with tempfile.TemporaryDirectory(prefix='saber-copy-') as local:
    target = os.path.join(local, 'copy')
    if not download(path, target):
      raise FileNotFoundError(f'{path}: nothing there')
    yield target


# ---------------------------------------------------------------------------- whole files

def temp_path(path: Path) -> str:
  """The temporary name a write to `path` uses: with the pid, so concurrent writers (and a
  cleanup that checks whether the writer still lives) can tell theirs apart."""
  return f'{os.fspath(path)}.tmp-{os.getpid()}'


def _makedirs_for(path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def _fsync_file(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[str]:
  """A temporary name for a writer that opens files by name (ArrayRecord); once the block
  ends the file is fsynced and renamed onto `path` (uploaded, for a URL). On an error it
  is removed instead."""
  path = os.fspath(path)
  if is_url(path):
    with tempfile.TemporaryDirectory() as local:
      tmp = os.path.join(local, os.path.basename(path))
      yield tmp
      upload(tmp, path)
    return
  _makedirs_for(path)
  tmp = temp_path(path)
  try:
    yield tmp
    _fsync_file(tmp)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = 'w'):
  """A file object to write `path` whole (mode 'w' text UTF-8, or 'wb'); see atomic_path."""
  with atomic_path(path) as tmp:
    with open(tmp, mode, **({} if 'b' in mode else {'encoding': 'utf-8'})) as f:
      yield f


def write_text(path: Path, text: str) -> None:
  with atomic_open(path) as f:
    f.write(text)


def write_bytes(path: Path, data: bytes) -> None:
  if is_url(path):
    epath.Path(path).write_bytes(data)
    return
  with atomic_open(path, 'wb') as f:
    f.write(data)


def write_json(path: Path, value: Any, *, indent: int = 2, sort_keys: bool = False) -> None:
  with atomic_open(path) as f:
    json.dump(value, f, ensure_ascii=False, indent=indent, sort_keys=sort_keys)
    f.write('\n')


def jsonl_line(record: Mapping) -> str:
  return json.dumps(record, ensure_ascii=False) + '\n'


class AtomicJsonlWriter:
  """Streams records into `path` whole (see atomic_path); holds nothing in memory."""

  def __init__(self, path: Path):
    self._context = atomic_open(path)
    self.count = 0

  def write(self, record: Mapping) -> None:
    self._file.write(jsonl_line(record))
    self.count += 1

  def __enter__(self):
    self._file = self._context.__enter__()
    return self

  def __exit__(self, *exc):
    return self._context.__exit__(*exc)


def write_jsonl(path: Path, records: Iterable[Mapping]) -> int:
  """All records to `path` at once, atomically; returns the count."""
  with AtomicJsonlWriter(path) as writer:
    for r in records:
      writer.write(r)
  return writer.count


def replace_dir(path: Path, fill: Callable[[str], None],
                carry_over: Callable[[str], bool] = lambda name: False) -> None:
  """Replaces directory `path` whole by what `fill(tmp)` writes into a sibling temporary
  directory; entries of the old directory for which `carry_over(name)` holds are copied
  into the new one first. A killed swap leaves the old directory (the temporaries of a
  dead swap are removed by the next). A URL has no rename: the directory is filled
  locally, then the old objects are removed and the new ones uploaded."""
  if is_url(path):
    with tempfile.TemporaryDirectory() as tmp:
      fill(tmp)
      for name in listdir(path):
        if carry_over(name) and not os.path.exists(os.path.join(tmp, name)):
          download(f'{os.fspath(path)}/{name}', os.path.join(tmp, name))
      rmtree(path)
      upload(tmp, path)
    return
  path = os.path.abspath(os.fspath(path))
  for stale in glob.glob(glob.escape(path) + '.tmp-*') + glob.glob(glob.escape(path) + '.old-*'):
    shutil.rmtree(stale, ignore_errors=True)
  tmp, old = temp_path(path), f'{path}.old-{os.getpid()}'
  os.makedirs(tmp)
  try:
    fill(tmp)
    if not os.path.isdir(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      os.replace(tmp, path)
      return
    for name in os.listdir(path):
      if carry_over(name) and not os.path.exists(os.path.join(tmp, name)):
        source = os.path.join(path, name)
        copy = shutil.copytree if os.path.isdir(source) else shutil.copy2
        copy(source, os.path.join(tmp, name))
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def open_read(path: Path, mode: str = 'r'):
  """A local file or a URL's object opened to read (text UTF-8, or 'rb')."""
  if is_url(path):
    return epath.Path(path).open(mode, **({} if 'b' in mode else {'encoding': 'utf-8'}))
  return open(path, mode, **({} if 'b' in mode else {'encoding': 'utf-8'}))


def read_text(path: Path) -> str:
  with open_read(path) as f:
    return f.read()


def read_json(path: Path) -> Any:
  with open_read(path) as f:
    return json.load(f)


def read_jsonl(path: Path) -> Iterator[dict]:
  """Records of a JSONL file, streaming; blank lines skipped. A line that is not a JSON
  object raises ValueError naming the file and line."""
  with open_read(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{os.fspath(path)}:{lineno}: not valid JSON ({e})') from None
      if not isinstance(record, dict):
        raise ValueError(f'{os.fspath(path)}:{lineno}: expected a JSON object, got '
                         f'{type(record).__name__}')
      yield record


def raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
  """(1-based line number, bytes) of each non-blank line, for readers that decode line by
  line so one bad byte is one bad line (and report it instead of stopping)."""
  with open_read(path, 'rb') as f:
    for number, raw in enumerate(f, 1):
      if raw.strip():
        yield number, raw


def count_lines(path: Path) -> int:
  return sum(1 for _ in raw_lines(path))


# ----------------------------------------------------------------- local append-only files

def _write_all(fd: int, data: bytes) -> None:
  view = memoryview(data)
  while view:  # os.write may be partial for very large writes
    view = view[os.write(fd, view):]


def append_jsonl(path: str, records: Iterable[Mapping]) -> None:
  """Appends the records as one write and fsyncs: after a crash they are all there, or a
  torn tail that `repair_tail` drops and `read_whole_lines` skips."""
  data = ''.join(jsonl_line(r) for r in records).encode('utf-8')
  if not data:
    return
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    _write_all(fd, data)
    os.fsync(fd)
  finally:
    os.close(fd)


class JsonlAppender:
  """Appends one record per os.write (a whole line, O_APPEND) followed by fsync, so a
  killed run leaves only whole lines and a crash at most a tail `repair_tail` drops.
  Thread-safe (the judged tools append from worker threads)."""

  def __init__(self, path: str):
    _makedirs_for(path)
    self.path = path
    self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    self._lock = threading.Lock()

  def append(self, record: Mapping) -> None:
    data = jsonl_line(record).encode('utf-8')
    with self._lock:
      _write_all(self._fd, data)
      os.fsync(self._fd)

  def close(self) -> None:
    with self._lock:
      if self._fd >= 0:
        os.close(self._fd)
        self._fd = -1

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def repair_tail(path: str) -> int:
  """Drops an unterminated last line (a run killed mid-write, or a crash before the
  page cache reached disk) so appending resumes on a line boundary. Returns the
  number of bytes dropped."""
  if not os.path.exists(path):
    return 0
  with open(path, 'rb+') as f:
    size = f.seek(0, os.SEEK_END)
    if size == 0:
      return 0
    f.seek(size - 1)
    if f.read(1) == b'\n':
      return 0
    pos, block, keep = size, 1 << 16, 0
    while pos > 0:      # walk back in blocks to the last newline
      start = max(0, pos - block)
      f.seek(start)
      idx = f.read(pos - start).rfind(b'\n')
      if idx >= 0:
        keep = start + idx + 1
        break
      pos = start
    f.truncate(keep)
    f.flush()
    os.fsync(f.fileno())
    return size - keep


def read_whole_lines(path: str) -> Iterator[dict]:
  """The records of a JSONL file that a writer may be appending to, or that a killed one
  left torn: whole lines only (an unterminated or unparseable tail is no record yet). A
  missing file has none."""
  if not os.path.exists(path):
    return
  with open(path, encoding='utf-8') as f:
    for line in f:
      if not line.endswith('\n'):
        return
      if line.strip():
        try:
          yield json.loads(line)
        except json.JSONDecodeError:
          return


# ------------------------------------------------------------------------------ locks

LOCK_SUFFIX = '.lock'
_held: dict[str, int] = {}          # lock path -> how many claims of this process hold it
_held_guard = threading.Lock()


class LockHeld(UserError):
  """Another live process owns the output; names it (pid, host, since, command)."""


def _holder(path: str) -> dict | None:
  """The lock file's JSON ({pid, host, since, argv}), None when gone; an unreadable one
  (not written by `acquire_lock`) is {} and counts as held."""
  try:
    with open(path, encoding='utf-8') as f:
      value = json.load(f)
    return value if isinstance(value, dict) else {}
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:     # another user's live process
    return True
  return True


def _ancestors() -> set[int]:
  """This process's parent chain: a child a holder started works for it (a pipeline
  running a tool as a subprocess, a test calling a program)."""
  out, pid = set(), os.getppid()
  while pid > 1 and pid not in out:
    out.add(pid)
    try:
      with open(f'/proc/{pid}/stat', encoding='utf-8') as f:
        pid = int(f.read().rsplit(')', 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
      break
  return out


def _describe(holder: dict) -> str:
  if not holder:
    return ('an unknown process (the lock file is not readable; remove it if no run writes '
            'this output)')
  argv = ' '.join(holder.get('argv') or [])[:160]
  return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
          + (f' ({argv})' if argv else ''))


def _create_lock(path: str) -> bool:
  """Writes this process's lock file at `path` whole (a hard link of a finished temporary
  file: atomic, and fails when `path` exists). False when another one is there."""
  tmp = temp_path(path)
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump({'path': path, 'pid': os.getpid(), 'host': socket.gethostname(),
               'since': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'argv': sys.argv}, f)
  try:
    os.link(tmp, path)
    return True
  except FileExistsError:
    return False
  finally:
    os.remove(tmp)


def acquire_lock(path: Path, what: str = '', wait: float = 0.0) -> None:
  """Makes this process the one writer of an output: creates the lock file `path` (pid,
  host, start time, command line) or raises LockHeld naming the live process that holds
  it. A lock of a dead process of this host is stale: named on stderr and taken over. A
  lock held by this process or one of its ancestors is shared (counted; see
  `release_lock`). Held until `release_lock` or the process exits. `wait`: seconds to
  wait for a live holder (short critical sections) before LockHeld. An output on an object
  store (a URL) takes no lock: it has no exclusive create here (README, "Remote storage")."""
  if is_url(path):
    return
  path = os.path.abspath(os.fspath(path))
  _makedirs_for(path)
  with _held_guard:
    if path in _held:
      _held[path] += 1
      return
    deadline, changes = time.monotonic() + wait, 0
    while changes < 3 or time.monotonic() < deadline:
      if _create_lock(path):
        _held[path] = 1
        return
      holder = _holder(path)
      if holder is None:
        changes += 1
        continue                                   # released meanwhile: try again
      pid, host = holder.get('pid'), holder.get('host')
      if holder.get('path', path) != path:         # copied along with an output folder
        print(f'{path}: replacing a lock copied from {holder["path"]}', file=sys.stderr,
              flush=True)
        _remove_if_same(path, holder)
        changes += 1
        continue
      local = host == socket.gethostname() and isinstance(pid, int)
      if local and (pid == os.getpid() or pid in _ancestors()):
        return                                     # our own, or our parent's, output
      if local and not _alive(pid):
        print(f'{path}: taking over the stale lock of {_describe(holder)}, which is no '
              'longer running', file=sys.stderr, flush=True)
        _remove_if_same(path, holder)
        changes += 1
        continue
      if time.monotonic() < deadline:
        time.sleep(0.05)
        continue
      raise LockHeld(f'{what or os.path.dirname(path)} is being written by {_describe(holder)} '
                     f'(lock {path}); wait for it to finish or stop it. A second writer '
                     'would mix its results with the first one\'s')
    raise LockHeld(f'{path}: could not take the lock (it changed hands three times)')


def _remove_if_same(path: str, holder: dict) -> None:
  """Removes the lock file if it still holds `holder` (another taker may have replaced
  it since it was read)."""
  if _holder(path) == holder:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


def release_lock(path: Path) -> None:
  """Drops one claim of `acquire_lock`; the last removes the lock file."""
  if is_url(path):
    return
  path = os.path.abspath(os.fspath(path))
  with _held_guard:
    if path not in _held:
      return
    _held[path] -= 1
    if _held[path]:
      return
    del _held[path]
    holder = _holder(path)
    if holder and holder.get('pid') == os.getpid():
      _remove_if_same(path, holder)


@contextlib.contextmanager
def locked(path: Path, what: str = '', wait: float = 60.0) -> Iterator[None]:
  """`acquire_lock` for the block only (a critical section: waits up to `wait` s)."""
  acquire_lock(path, what, wait)
  try:
    yield
  finally:
    release_lock(path)


@atexit.register
def _release_all() -> None:
  for path in list(_held):
    _held[path] = 1
    release_lock(path)


# ------------------------------------------------------------------------------ records

def record_id(record: Mapping, where: str) -> str:
  """The record's 'id' as a string (ints allowed in inputs); ValueError names `where`."""
  if 'id' not in record:
    raise ValueError(f"{where}: record has no 'id' field")
  rid = record['id']
  if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == '':
    raise ValueError(f"{where}: 'id' must be a non-empty string or integer, got {rid!r}")
  return str(rid)


class DuplicateId(ValueError):
  pass


def _canonical(record: Mapping) -> str:
  return json.dumps(record, sort_keys=True, ensure_ascii=False)


def repeated_lines(path: Path, unique: bool = True) -> set[int]:
  """Record numbers (1-based, blank lines not counted) of the records of a JSONL file
  that repeat an earlier record exactly (the same lines given twice): callers drop them.
  With `unique`, two different records of one id are a DuplicateId naming the file, the
  id and both record numbers; read whole before the caller does any work."""
  first: dict[str, int] = {}
  seen: set[tuple[str, str]] = set()
  repeats = set()
  for n, r in enumerate(read_jsonl(path), 1):
    rid = record_id(r, f'{os.fspath(path)} record {n}')
    text = _canonical(r)
    if (rid, text) in seen:
      repeats.add(n)
      continue
    seen.add((rid, text))
    if unique and rid in first:
      raise DuplicateId(f'{os.fspath(path)}: duplicate id {rid!r} (records {first[rid]} '
                        f'and {n} differ)')
    first.setdefault(rid, n)
  return repeats


def records_with_ids(path: Path, unique: bool = True) -> Iterator[tuple[str, dict]]:
  """(id, record) of each record of a JSONL file; a record without a usable id is a
  ValueError naming the file and the record's number. The file is checked first
  (`repeated_lines`): two different records of one id are a DuplicateId (unless not
  `unique`: several records per id, e.g. pairs of one clip); a record repeated exactly is
  skipped, with a count on stderr."""
  repeats = repeated_lines(path, unique)
  if repeats:
    print(f'{os.fspath(path)}: {len(repeats)} records repeat earlier ones exactly; each is '
          'used once', file=sys.stderr, flush=True)
  for n, r in enumerate(read_jsonl(path), 1):
    if n not in repeats:
      yield record_id(r, f'{os.fspath(path)} record {n}'), r


def check_unique_ids(path: Path) -> None:
  """DuplicateId naming the file, the id and both records' numbers when an id repeats
  (for inputs whose every line becomes work, such as a judged run's: even an exact
  repeat would be judged twice)."""
  first: dict[str, int] = {}
  for n, r in enumerate(read_jsonl(path), 1):
    rid = record_id(r, f'{os.fspath(path)} record {n}')
    if rid in first:
      raise DuplicateId(f'{os.fspath(path)}: duplicate id {rid!r} (records {first[rid]} '
                        f'and {n})')
    first[rid] = n


def load_by_id(path: Path, required: tuple[str, ...] = (),
               ids: set[str] | None = None) -> dict[str, dict]:
  """id -> record for a JSONL file (only `ids` when given); each kept record must have
  the `required` fields. Two different records of one id are an error naming the file,
  the id and both records; an exact repeat is dropped (`records_with_ids`)."""
  out = {}
  for rid, r in records_with_ids(path):
    if ids is not None and rid not in ids:
      continue
    for field in required:
      if field not in r:
        raise ValueError(f'{os.fspath(path)}: record {rid!r} has no {field!r} field')
    if rid in out:
      raise DuplicateId(f'{os.fspath(path)}: duplicate id {rid!r}')
    out[rid] = r
  return out


def sharded(items: Iterable, shard_index: int, num_shards: int) -> Iterator:
  """Items i with i % num_shards == shard_index (a process's share of an input file)."""
  if not 0 <= shard_index < num_shards:
    raise ValueError(f'shard index must be in [0, {num_shards}), got {shard_index}')
  for i, item in enumerate(items):
    if i % num_shards == shard_index:
      yield item


def shard_size(total: int, shard_index: int, num_shards: int) -> int:
  return len(range(shard_index, total, num_shards))
