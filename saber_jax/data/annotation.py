"""The SABER six-dimension annotation schema: validation, parsing and JSONL reading.

One annotation per clip, the same keys for English and Chinese clips:

  {"video_desc": str,
   "audio_desc": {"speech_content": str, "acoustic_feat": str},
   "facial_exp_desc": str, "body_lang_desc": str, "sentiment_analysis": str}

Every text must be a non-empty string (`allow_empty` relaxes this per field, e.g.
'audio_desc.speech_content' for silent clips); extra keys are ignored. Errors are
`AnnotationError`s whose message names the source (file:line, when known), the clip
id, the field (dotted path) and what was expected, so a pipeline over 600K clips can
log and skip a bad record instead of stopping.
"""

import dataclasses
import json
import os
import re
from typing import Any, Collection, Iterator, Mapping

from saber_jax import files

# Attribute of `Annotation` -> path of keys in the JSON object.
FIELD_PATHS = {
    'video_desc': ('video_desc',),
    'speech_content': ('audio_desc', 'speech_content'),
    'acoustic_feat': ('audio_desc', 'acoustic_feat'),
    'facial_exp_desc': ('facial_exp_desc',),
    'body_lang_desc': ('body_lang_desc',),
    'sentiment_analysis': ('sentiment_analysis',),
}


# A clip with neither speech nor a sound event has an empty transcript; every other
# field must say something.
SILENT_CLIP_MAY_BE_EMPTY = ('audio_desc.speech_content',)


class AnnotationError(ValueError):
  """A record that does not follow the schema.

  Attributes: `clip_id` (None when the record's id itself is unreadable), `field`
  (dotted path such as 'audio_desc.speech_content', or None for the whole record) and
  `source` ('path:line' when read from a file, else None).
  """

  def __init__(self, problem: str, *, clip_id=None, field=None, source=None):
    self.problem, self.clip_id, self.field, self.source = problem, clip_id, field, source
    where = []
    if source is not None:
      where.append(source)
    where.append(f'clip {clip_id!r}' if clip_id is not None else 'clip id unknown')
    if field is not None:
      where.append(f'field {field!r}')
    super().__init__(': '.join(where) + ': ' + problem)

  def __reduce__(self):
    # Rebuilt from its parts, so it crosses process pools (preprocess --workers) intact.
    return (_rebuild_annotation_error, (self.problem, self.clip_id, self.field, self.source))

  def with_source(self, source: str) -> 'AnnotationError':
    return AnnotationError(self.problem, clip_id=self.clip_id, field=self.field, source=source)


def _rebuild_annotation_error(problem, clip_id, field, source) -> AnnotationError:
  return AnnotationError(problem, clip_id=clip_id, field=field, source=source)


@dataclasses.dataclass(frozen=True)
class Annotation:
  """One clip's six texts, stripped of surrounding whitespace ('' only where allowed)."""
  video_desc: str
  speech_content: str
  acoustic_feat: str
  facial_exp_desc: str
  body_lang_desc: str
  sentiment_analysis: str

  def to_dict(self) -> dict:
    """The nested JSON form of the schema (inverse of `validate_annotation`)."""
    out: dict = {}
    for name, path in FIELD_PATHS.items():
      node = out
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = getattr(self, name)
    return out


def _type_name(value) -> str:
  return 'null' if value is None else type(value).__name__


def validate_annotation(obj: Any, clip_id, *, allow_empty: Collection[str] = ()) -> Annotation:
  """Checks a decoded JSON object against the schema and returns its `Annotation`.

  Raises `AnnotationError` naming `clip_id` and the first offending field: missing,
  not a string (or, for 'audio_desc', not an object), or empty / whitespace only
  unless its dotted name is in `allow_empty`.
  """
  unknown = set(allow_empty) - {'.'.join(path) for path in FIELD_PATHS.values()}
  if unknown:
    raise ValueError(f'allow_empty names unknown fields {sorted(unknown)}')
  if not isinstance(obj, Mapping):
    raise AnnotationError('expected a JSON object with the six SABER fields, got '
                          f'{_type_name(obj)}', clip_id=clip_id)
  texts = {}
  for name, path in FIELD_PATHS.items():
    node = obj
    for depth, key in enumerate(path):
      dotted = '.'.join(path[:depth + 1])
      if key not in node:
        raise AnnotationError('missing', clip_id=clip_id, field=dotted)
      node = node[key]
      if depth < len(path) - 1 and not isinstance(node, Mapping):
        raise AnnotationError(
            f'expected an object with {path[depth + 1]!r}, got {_type_name(node)}',
            clip_id=clip_id, field=dotted)
    dotted = '.'.join(path)
    if not isinstance(node, str):
      raise AnnotationError(f'expected a string, got {_type_name(node)}',
                            clip_id=clip_id, field=dotted)
    if not node.strip() and dotted not in allow_empty:
      raise AnnotationError('expected non-empty text, got an empty or whitespace-only string',
                            clip_id=clip_id, field=dotted)
    texts[name] = node.strip()
  return Annotation(**texts)


# Annotator LLMs often wrap their JSON answer in a markdown code fence.
_CODE_FENCE = re.compile(r'^\s*```[A-Za-z]*[ \t]*\n(.*)\n[ \t]*```\s*$', re.DOTALL)


def parse_annotation(text: str, clip_id, *, allow_empty: Collection[str] = ()) -> Annotation:
  """Parses raw JSON text (optionally inside one ``` code fence) into an `Annotation`."""
  if not isinstance(text, str):
    raise AnnotationError(f'expected JSON text, got {_type_name(text)}', clip_id=clip_id)
  fenced = _CODE_FENCE.match(text)
  body = fenced.group(1) if fenced else text
  try:
    obj = json.loads(body)
  except json.JSONDecodeError as e:
    raise AnnotationError(
        f'invalid JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}',
        clip_id=clip_id) from None
  return validate_annotation(obj, clip_id, allow_empty=allow_empty)


def checked_annotation(obj: Any, clip_id=None, source: str | None = None) -> dict:
  """The tools' one schema check: `validate_annotation` with silent clips allowed, returned
  as the nested dict with stripped texts. AnnotationError names source, clip and field."""
  try:
    return validate_annotation(obj, clip_id, allow_empty=SILENT_CLIP_MAY_BE_EMPTY).to_dict()
  except AnnotationError as e:
    raise (e.with_source(source) if source else e) from None


def annotation_of(record: Mapping, source: str, clip_id) -> dict:
  """The checked 'annotation' field of an input record; AnnotationError names the file
  and the clip."""
  if 'annotation' not in record:
    raise AnnotationError("no 'annotation' field", clip_id=clip_id, source=source)
  return checked_annotation(record['annotation'], clip_id, source)


def read_annotations(path: str | os.PathLike, *, shard_index: int = 0, num_shards: int = 1,
                     allow_empty: Collection[str] = ()
                     ) -> Iterator[tuple[Any, Annotation | AnnotationError]]:
  """Streams a JSONL file of `{"id": ..., "annotation": {...}}` lines.

  Yields `(clip_id, Annotation)` for good lines and `(clip_id, AnnotationError)` for bad
  ones (clip_id None when the line has no readable id), so callers can reject and go
  on; every error names 'path:line'. Blank lines are skipped. `annotation` may also be
  a string holding the annotator's raw JSON answer. With `num_shards > 1` only the
  lines whose 0-based index is `shard_index` mod `num_shards` are read.
  """
  if not 0 <= shard_index < num_shards:
    raise ValueError(f'shard_index must be in [0, {num_shards}), got {shard_index}')
  path = os.fspath(path)
  for number, raw in files.raw_lines(path):   # one bad byte is one bad line
    if (number - 1) % num_shards != shard_index:
      continue
    source = f'{path}:{number}'
    clip_id = None
    try:
      try:
        record = json.loads(raw.decode('utf-8'))
      except UnicodeDecodeError as e:
        raise AnnotationError(f'not UTF-8 text (byte {e.start} of the line)') from None
      except json.JSONDecodeError as e:
        raise AnnotationError(f'invalid JSON at column {e.colno}: {e.msg}') from None
      if not isinstance(record, Mapping):
        raise AnnotationError('expected a JSON object with "id" and "annotation", got '
                              f'{_type_name(record)}')
      clip_id = record.get('id')
      if isinstance(clip_id, bool) or not isinstance(clip_id, (str, int)):
        bad_id, clip_id = clip_id, None
        raise AnnotationError('missing' if bad_id is None
                              else f'expected a string, got {_type_name(bad_id)}', field='id')
      if 'annotation' not in record:
        raise AnnotationError('missing', clip_id=clip_id, field='annotation')
      value = record['annotation']
      result = (parse_annotation(value, clip_id, allow_empty=allow_empty) if isinstance(value, str)
                else validate_annotation(value, clip_id, allow_empty=allow_empty))
    except AnnotationError as e:
      result = e.with_source(source)
    yield clip_id, result
