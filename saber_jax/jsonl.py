"""JSONL files: one streaming reader that names file and line, crash-safe appends, atomic
rewrites. The judged tools keep their results here; anything else reading or writing
JSONL uses the same functions."""

import json
import os
import threading
from typing import Iterable, Iterator, Mapping


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
    # Walk back in blocks to the last newline.
    pos, block = size, 1 << 16
    keep = 0
    while pos > 0:
      start = max(0, pos - block)
      f.seek(start)
      chunk = f.read(pos - start)
      idx = chunk.rfind(b'\n')
      if idx >= 0:
        keep = start + idx + 1
        break
      pos = start
    f.truncate(keep)
    f.flush()
    os.fsync(f.fileno())
    return size - keep


def read_jsonl(path: str) -> Iterator[dict]:
  """Records of a JSONL file, streaming; blank lines skipped. A line that is not a JSON
  object raises ValueError naming the file and line."""
  with open(path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{lineno}: not valid JSON ({e})') from None
      if not isinstance(record, dict):
        raise ValueError(f'{path}:{lineno}: expected a JSON object, got {type(record).__name__}')
      yield record


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


def record_id(record: Mapping, where: str) -> str:
  """The record's 'id' as a string (ints allowed in inputs); ValueError names `where`."""
  if 'id' not in record:
    raise ValueError(f"{where}: record has no 'id' field")
  rid = record['id']
  if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == '':
    raise ValueError(f"{where}: 'id' must be a non-empty string or integer, got {rid!r}")
  return str(rid)


def _encode_line(record: Mapping) -> bytes:
  return (json.dumps(record, ensure_ascii=False) + '\n').encode('utf-8')


class JsonlAppender:
  """Appends one record per os.write (a whole line, O_APPEND) followed by fsync, so a
  killed run leaves only whole lines and a crash at most a tail `repair_tail` drops."""

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self.path = path
    self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    self._lock = threading.Lock()

  def append(self, record: Mapping) -> None:
    data = _encode_line(record)
    with self._lock:
      view = memoryview(data)
      while view:  # os.write may be partial for very large lines
        view = view[os.write(self._fd, view):]
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


class AtomicJsonlWriter:
  """Writes records to `path`.tmp and renames it over `path` on a clean exit, so a
  reader (or a killed run) never sees a half-written file; streams, holds nothing."""

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self.path, self.tmp, self.count = path, path + '.tmp', 0
    self._file = open(self.tmp, 'wb')

  def write(self, record: Mapping) -> None:
    self._file.write(_encode_line(record))
    self.count += 1

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *exc):
    if exc_type is not None:
      self._file.close()
      os.remove(self.tmp)
      return
    self._file.flush()
    os.fsync(self._file.fileno())
    self._file.close()
    os.replace(self.tmp, self.path)


def write_jsonl_atomic(path: str, records: Iterable[Mapping]) -> int:
  """All records to `path` at once (see AtomicJsonlWriter); returns the count."""
  with AtomicJsonlWriter(path) as writer:
    for r in records:
      writer.write(r)
  return writer.count
