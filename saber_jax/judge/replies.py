"""What a judge must reply: pydantic models give both the JSON schema sent as the
`response_format` and the check applied to the reply (a local server may ignore the
schema), so the two never disagree.

`Reply` is the base of every reply model: exact keys (no extra, none missing), no NaN or
infinity, and strict types (pydantic's strict mode: "2" is not a number, 1 not a
boolean, 2.0 not an integer); a reply that breaks them is re-asked with the reason.
"""

import json
import re
from typing import Annotated, Any

import pydantic

NonEmpty = Annotated[str, pydantic.StringConstraints(pattern=r'\S')]   # not blank


def int_in(low: int, high: int):
  return Annotated[int, pydantic.Field(ge=low, le=high)]


def number_in(low: float, high: float):
  return Annotated[float, pydantic.Field(ge=low, le=high)]


class Reply(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra='forbid', allow_inf_nan=False, frozen=True)


class InvalidReply(ValueError):
  """A reply that parsed badly or broke its model; the message says how."""


def response_format(name: str, model: type[Reply]) -> dict:
  return {'type': 'json_schema',
          'json_schema': {'name': name, 'schema': model.model_json_schema(), 'strict': True}}


def validate(value: Any, model: type[Reply]) -> dict:
  """`value` checked against `model` (exact keys, types, ranges) as a plain dict; raises
  InvalidReply naming each bad field by its JSON path."""
  try:
    return model.model_validate(value, strict=True).model_dump()
  except pydantic.ValidationError as e:
    problems = [f"${''.join(f'.{key}' for key in err['loc'])}: {err['msg']}"
                + ('' if err['type'] == 'missing' else f" (got {err['input']!r})")
                for err in e.errors()]
    raise InvalidReply('; '.join(problems)) from None


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


def correction_message(reason: str) -> str:
  return (f'Your previous reply could not be used: {reason}. Reply again with only the '
          'JSON object, exactly the keys asked for and values in the allowed ranges.')
