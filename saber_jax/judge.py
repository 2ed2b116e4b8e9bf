"""OpenAI-compatible judge client: structured JSON replies, retries, resumable runs.

Every judge / annotator call in saber_jax.cli goes through `Judge.ask`: a chat-completions
request (works with OpenAI, vLLM, Ollama, ...) that sends a strict `json_schema`
response format *and* validates the reply itself, since a local server may ignore the
schema. One field spec (`Field`) gives both the schema sent and the check applied.

Failures are retried with exponential backoff and jitter: timeouts, connection errors,
408/409/429 and 5xx (the SDK's own retries are switched off so one policy holds), and
unusable replies (not JSON, wrong keys, out of range), which are re-asked with the
reason appended. What still fails becomes a `JudgeError` with the raw reply.

`run_jobs` drives many items with bounded concurrency and makes the run resumable:
results are appended to a JSONL file one fsync'ed line per item, finished ids are
skipped on the next run, failures go to errors.jsonl and are retried next time.
"""

import collections
import concurrent.futures
import dataclasses
import json
import math
import os
import random
import re
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import openai
import tqdm

# ----------------------------------------------------------------------------- field specs


class InvalidReply(ValueError):
  """A reply that parsed badly or broke the field spec; the message says how."""


@dataclasses.dataclass(frozen=True)
class Field:
  """One JSON value: kind in {'string', 'integer', 'number', 'boolean', 'enum',
  'string_list', 'object'}, with an inclusive range, choices or nested fields."""
  kind: str
  minimum: float | None = None
  maximum: float | None = None
  choices: tuple[str, ...] = ()
  fields: Mapping[str, 'Field'] | None = None
  non_empty: bool = False


def string(non_empty: bool = False) -> Field:
  return Field('string', non_empty=non_empty)


def integer(minimum: int, maximum: int) -> Field:
  return Field('integer', minimum=minimum, maximum=maximum)


def number(minimum: float, maximum: float) -> Field:
  return Field('number', minimum=minimum, maximum=maximum)


def boolean() -> Field:
  return Field('boolean')


def enum(*choices: str) -> Field:
  return Field('enum', choices=tuple(choices))


def string_list() -> Field:
  return Field('string_list')


def obj(**fields: Field) -> Field:
  return Field('object', fields=fields)


def json_schema(spec: Field) -> dict:
  """The JSON Schema for `spec`, in the subset strict structured outputs accept
  (every key required, no additional properties)."""
  if spec.kind == 'object':
    return {'type': 'object',
            'properties': {k: json_schema(f) for k, f in spec.fields.items()},
            'required': list(spec.fields),
            'additionalProperties': False}
  if spec.kind in ('integer', 'number'):
    return {'type': spec.kind, 'minimum': spec.minimum, 'maximum': spec.maximum}
  if spec.kind == 'enum':
    return {'type': 'string', 'enum': list(spec.choices)}
  if spec.kind == 'string_list':
    return {'type': 'array', 'items': {'type': 'string'}}
  return {'type': spec.kind}


def response_format(name: str, spec: Field) -> dict:
  return {'type': 'json_schema',
          'json_schema': {'name': name, 'schema': json_schema(spec), 'strict': True}}


def validate(value: Any, spec: Field, path: str = '$') -> Any:
  """`value` checked against `spec` (exact keys, types, ranges); integral floats are
  accepted for integers (2.0 -> 2). Raises InvalidReply naming the JSON path."""
  kind = spec.kind
  if kind == 'object':
    if not isinstance(value, dict):
      raise InvalidReply(f'{path}: expected an object, got {type(value).__name__}')
    missing = [k for k in spec.fields if k not in value]
    extra = [k for k in value if k not in spec.fields]
    if missing or extra:
      raise InvalidReply(f'{path}: expected exactly the keys {list(spec.fields)}'
                         f' (missing {missing}, unexpected {extra})')
    return {k: validate(value[k], f, f'{path}.{k}') for k, f in spec.fields.items()}
  if kind in ('integer', 'number'):
    # bool is an int in Python but not a number in JSON.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      raise InvalidReply(f"{path}: expected {'an integer' if kind == 'integer' else 'a number'}, got {value!r}")
    if kind == 'integer':
      if isinstance(value, float) and not value.is_integer():
        raise InvalidReply(f'{path}: expected an integer, got {value!r}')
      value = int(value)
    if not spec.minimum <= value <= spec.maximum:
      raise InvalidReply(f'{path}: {value!r} is outside [{spec.minimum}, {spec.maximum}]')
    return value
  if kind == 'boolean':
    if not isinstance(value, bool):
      raise InvalidReply(f'{path}: expected true or false, got {value!r}')
    return value
  if kind == 'enum':
    if value not in spec.choices:
      raise InvalidReply(f'{path}: expected one of {list(spec.choices)}, got {value!r}')
    return value
  if kind == 'string':
    if not isinstance(value, str):
      raise InvalidReply(f'{path}: expected a string, got {type(value).__name__}')
    if spec.non_empty and not value.strip():
      raise InvalidReply(f'{path}: must not be empty')
    return value
  if kind == 'string_list':
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
      raise InvalidReply(f'{path}: expected a list of strings, got {value!r}')
    return value
  raise ValueError(f'unknown field kind {kind!r}')


_THINK = re.compile(r'<think>.*?</think>', re.S)
_FENCE = re.compile(r'^```(?:json)?\s*(.*?)\s*```$', re.S)


def parse_json_object(text: str | None) -> dict:
  """The JSON object in a model reply: tolerates <think> blocks, ``` fences and prose
  around one {...}; raises InvalidReply otherwise."""
  if text is None or not text.strip():
    raise InvalidReply('empty reply')
  text = _THINK.sub('', text).strip()
  fenced = _FENCE.match(text)
  if fenced:
    text = fenced.group(1)
  try:
    value = json.loads(text)
  except json.JSONDecodeError as first_error:
    start, end = text.find('{'), text.rfind('}')
    if start < 0 or end <= start:
      raise InvalidReply(f'reply is not JSON ({first_error})') from None
    try:
      value = json.loads(text[start:end + 1])
    except json.JSONDecodeError as e:
      raise InvalidReply(f'reply is not JSON ({e})') from None
  if not isinstance(value, dict):
    raise InvalidReply(f'expected a JSON object, got {type(value).__name__}')
  return value


# ----------------------------------------------------------------------------- the client


class JudgeError(Exception):
  """An item the judge could not complete. kind: 'timeout', 'connection',
  'rate_limit', 'server_error' (retried until attempts ran out), 'http_error' (not
  retryable, e.g. 400/401/404) or 'invalid_reply'; raw: the last reply text."""

  def __init__(self, kind: str, message: str, raw: str | None = None, attempts: int = 0):
    super().__init__(f'{kind}: {message}')
    self.kind, self.message, self.raw, self.attempts = kind, message, raw, attempts


class ItemError(Exception):
  """Bad input for one item (missing file, undecodable media, no reference): recorded
  in errors.jsonl like a judge failure rather than stopping the run."""

  def __init__(self, kind: str, message: str):
    super().__init__(f'{kind}: {message}')
    self.kind, self.message, self.raw, self.attempts = kind, message, None, 0


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
  base_url: str
  model: str
  api_key: str | None = None     # None: $OPENAI_API_KEY, else 'EMPTY' (local servers)
  temperature: float = 0.0       # judges are run greedy
  max_tokens: int | None = None
  timeout: float = 60.0          # seconds per request
  max_retries: int = 3           # retries after the first attempt
  backoff: float = 1.0           # first backoff window, seconds; doubles per retry
  backoff_max: float = 30.0
  response_format: str = 'json_schema'  # or 'json_object' / 'none' for servers without it


@dataclasses.dataclass(frozen=True)
class JudgeReply:
  value: Any        # the validated JSON value
  raw: str          # the reply text it came from
  attempts: int


def backoff_delay(retry: int, base: float, cap: float, rng: random.Random) -> float:
  """Exponential backoff with equal jitter: window = min(cap, base * 2**retry), sleep in
  [window / 2, window], so concurrent workers spread out but always wait a little."""
  window = min(cap, base * 2.0 ** retry)
  return window / 2 + rng.uniform(0.0, window / 2)


def retryable_kind(exc: Exception) -> str | None:
  """The error kind when `exc` is worth retrying, else None (mirrors the SDK's own
  _should_retry: connection errors, timeouts, 408, 409, 429, >= 500)."""
  if isinstance(exc, openai.APITimeoutError):  # a subclass of APIConnectionError
    return 'timeout'
  if isinstance(exc, openai.APIConnectionError):
    return 'connection'
  if isinstance(exc, openai.APIStatusError):
    code = exc.status_code
    if code == 429:
      return 'rate_limit'
    if code >= 500 or code in (408, 409):
      return 'server_error'
  return None


def _retry_after(exc: Exception) -> float | None:
  response = getattr(exc, 'response', None)
  try:
    return float(response.headers.get('retry-after'))
  except (AttributeError, TypeError, ValueError):
    return None


def correction_message(reason: str) -> str:
  return (f'Your previous reply could not be used: {reason}. Reply again with only the '
          'JSON object, exactly the keys asked for and values in the allowed ranges.')


class Judge:
  """Thread-safe: one instance serves all worker threads of a run."""

  def __init__(self, config: JudgeConfig, *, client: openai.OpenAI | None = None,
               sleep: Callable[[float], None] = time.sleep, seed: int | None = None):
    self.config = config
    api_key = config.api_key or os.environ.get('OPENAI_API_KEY') or 'EMPTY'
    # max_retries=0: retries (and their backoff) are ours, so invalid replies and
    # transport errors share one budget.
    self.client = client or openai.OpenAI(base_url=config.base_url, api_key=api_key,
                                          timeout=config.timeout, max_retries=0)
    self._sleep = sleep
    self._rng = random.Random(seed)
    self._rng_lock = threading.Lock()

  def _request(self, messages: list[dict], name: str, spec: Field,
               temperature: float | None) -> dict:
    request = {'model': self.config.model, 'messages': messages,
               'temperature': self.config.temperature if temperature is None else temperature}
    if self.config.max_tokens:
      request['max_tokens'] = self.config.max_tokens
    if self.config.response_format == 'json_schema':
      request['response_format'] = response_format(name, spec)
    elif self.config.response_format == 'json_object':
      request['response_format'] = {'type': 'json_object'}
    return request

  def _backoff(self, retry: int, exc: Exception | None = None) -> None:
    with self._rng_lock:
      delay = backoff_delay(retry, self.config.backoff, self.config.backoff_max, self._rng)
    after = _retry_after(exc) if exc is not None else None
    if after is not None:
      delay = min(max(delay, after), self.config.backoff_max)
    self._sleep(delay)

  def ask(self, messages: list[dict], spec: Field, *, name: str = 'reply',
          check: Callable[[Any], Any] | None = None,
          temperature: float | None = None) -> JudgeReply:
    """Sends `messages`, returns the reply validated against `spec` (and by `check`,
    which may raise InvalidReply or return a transformed value).

    Raises JudgeError after 1 + max_retries attempts, or at once for a
    non-retryable HTTP status.
    """
    attempts = self.config.max_retries + 1
    conversation = list(messages)
    last: JudgeError | None = None
    for attempt in range(attempts):
      try:
        completion = self.client.chat.completions.create(
            **self._request(conversation, name, spec, temperature))
      except openai.APIError as exc:
        kind = retryable_kind(exc)
        if kind is None:
          raise JudgeError('http_error', f'{type(exc).__name__}: {exc}',
                           attempts=attempt + 1) from exc
        last = JudgeError(kind, f'{type(exc).__name__}: {exc}', attempts=attempt + 1)
        if attempt + 1 < attempts:
          self._backoff(attempt, exc)
        continue
      choices = getattr(completion, 'choices', None) or []
      raw = choices[0].message.content if choices and choices[0].message else None
      try:
        value = validate(parse_json_object(raw), spec)
        if check is not None:
          checked = check(value)
          value = value if checked is None else checked
        return JudgeReply(value, raw, attempt + 1)
      except InvalidReply as exc:
        last = JudgeError('invalid_reply', str(exc), raw=raw, attempts=attempt + 1)
        # Re-ask with the reason: at temperature 0 the same prompt would give the same
        # reply again. Only the latest bad reply is kept, so the context stays short.
        conversation = list(messages) + [
            {'role': 'assistant', 'content': raw or ''},
            {'role': 'user', 'content': correction_message(str(exc))}]
    raise last


# ----------------------------------------------------------------------------- JSONL files


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
  write_jsonl_atomic(errors_path, latest.values())
  return len(latest)


def error_record(item_id: str, exc: JudgeError | ItemError) -> dict:
  return {'id': item_id, 'kind': exc.kind, 'message': exc.message, 'raw': exc.raw,
          'attempts': exc.attempts, 'time': time.strftime('%Y-%m-%dT%H:%M:%S')}


# ----------------------------------------------------------------------------- runs


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


def run_jobs(items: Iterable[Mapping], process: Callable[[Mapping], dict], *,
             out_path: str, errors_path: str, concurrency: int = 4,
             max_items: int | None = None, total: int | None = None,
             desc: str = 'judge', log: Callable[[str], None] | None = None) -> RunSummary:
  """Runs `process` on each item not yet in `out_path`, at most `concurrency` at once.

  items: records with an 'id' (streamed; at most 2 * concurrency held in flight).
  process(item) -> result dict, written with the item's id; JudgeError / ItemError
  become lines in `errors_path`; any other exception stops the run (a bug, not data).
  max_items: stop after starting this many new items (smoke runs, tests).
  """
  if concurrency < 1:
    raise ValueError(f'concurrency must be >= 1, got {concurrency}')
  log = log or (lambda s: print(s, file=sys.stderr))
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
    except (JudgeError, ItemError) as exc:
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
