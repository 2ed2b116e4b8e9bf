"""Every file the package writes or reads record by record, in one place.

Two kinds of operation, kept apart on purpose:
- whole files (atomic writes of text, JSON, JSONL, bytes, a directory swap; reads of
  JSONL that name file and line): a reader never sees half a file, a kill leaves the old
  one or the new one. These take a local path or a URL (`gs://bucket/...`, any scheme
  `etils.epath` opens): a local file is written under a temporary name and renamed; an
  object is written directly, since an object write is atomic by itself. `exists`,
  `listdir`, `rmtree`, `upload`, `download` and `tree_identity` work on both kinds.
- local append-only files (durable appends, torn-tail reads and repair): they need
  O_APPEND, fsync and truncate of a POSIX file, which an object store has none of.
Plus the record vocabulary the JSONL tools share: `record_id`, `load_by_id`, duplicate-id
checks and sharding by line.
"""

import contextlib
import glob
import json
import os
import shutil
import tempfile
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping

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


# ------------------------------------------------------------------------------ records

def record_id(record: Mapping, where: str) -> str:
  """The record's 'id' as a string (ints allowed in inputs); ValueError names `where`."""
  if 'id' not in record:
    raise ValueError(f"{where}: record has no 'id' field")
  rid = record['id']
  if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == '':
    raise ValueError(f"{where}: 'id' must be a non-empty string or integer, got {rid!r}")
  return str(rid)


def records_with_ids(path: Path) -> Iterator[tuple[str, dict]]:
  """(id, record) of each record of a JSONL file; a record without a usable id is a
  ValueError naming the file and the record's number."""
  for n, r in enumerate(read_jsonl(path), 1):
    yield record_id(r, f'{os.fspath(path)} record {n}'), r


class DuplicateId(ValueError):
  pass


def check_unique_ids(path: Path) -> None:
  """DuplicateId naming the file, the id and both records' numbers when an id repeats."""
  first: dict[str, int] = {}
  for n, (rid, _) in enumerate(records_with_ids(path), 1):
    if rid in first:
      raise DuplicateId(f'{os.fspath(path)}: duplicate id {rid!r} (records {first[rid]} '
                        f'and {n})')
    first[rid] = n


def load_by_id(path: Path, required: tuple[str, ...] = (),
               ids: set[str] | None = None) -> dict[str, dict]:
  """id -> record for a JSONL file (only `ids` when given); each kept record must have
  the `required` fields. Duplicate ids are an error naming the file."""
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
