"""OpenAI-compatible judge client: structured JSON replies, checked, re-asked when unusable.

Every judge / annotator call in the tools goes through `Judge.ask`: a chat-completions
request (works with OpenAI, vLLM, Ollama, ...) that sends the reply model's JSON schema
as a strict `response_format` *and* validates the reply itself (`replies.validate`).

Two kinds of failure, two mechanisms: transport errors (timeouts, refused connections,
408/409/429, 5xx) are retried by the openai SDK itself (`max_retries`, its exponential
backoff with jitter, Retry-After honoured); unusable replies (not JSON, wrong keys, out
of range) are re-asked here with the reason appended, up to `max_retries` times. What
still fails becomes a `JudgeError` with the (redacted) raw reply.

A reply's raw text is kept (in results, errors and a re-ask's context) cut to its first
`MAX_RAW_CHARS` characters with a note of how many were left out (`cap_raw`): a runaway
5 MB reply must not become 5 MB on every line of a results file. The value is parsed
from the whole reply.
"""

import dataclasses
import os
import re
from typing import Any, Callable

import openai

from saber_jax.judge import replies
from saber_jax.judge.runs import ItemFailure


MAX_RAW_CHARS = 4000    # a judge's JSON reply is a few hundred characters


def cap_raw(raw: str | None, limit: int = MAX_RAW_CHARS) -> str | None:
  """`raw` cut to `limit` characters, with a note of how many were left out."""
  if raw is None or len(raw) <= limit:
    return raw
  return raw[:limit] + f'... [{len(raw) - limit} more characters not stored]'


class JudgeError(ItemFailure):
  """An item the judge could not complete. kind: 'timeout', 'connection', 'rate_limit',
  'server_error' (after the SDK's retries), 'http_error' (not retryable, e.g.
  400/401/404) or 'invalid_reply' (after the re-asks); raw: the last reply text."""


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
  base_url: str
  model: str
  api_key: str | None = None     # None: $OPENAI_API_KEY, else 'EMPTY' (local servers)
  temperature: float = 0.0       # judges are run greedy
  max_tokens: int | None = None
  timeout: float = 60.0          # seconds per request
  max_retries: int = 3           # SDK retries of a transport error; re-asks of a bad reply
  response_format: str = 'json_schema'  # or 'json_object' / 'none' for servers without it


@dataclasses.dataclass(frozen=True)
class JudgeReply:
  value: Any        # the validated JSON value
  raw: str          # the reply text it came from
  attempts: int     # requests that produced a reply (1 + re-asks)


def error_kind(exc: openai.APIError) -> str:
  if isinstance(exc, openai.APITimeoutError):  # a subclass of APIConnectionError
    return 'timeout'
  if isinstance(exc, openai.APIConnectionError):
    return 'connection'
  code = getattr(exc, 'status_code', None)
  if code == 429:
    return 'rate_limit'
  if code is not None and (code >= 500 or code in (408, 409)):
    return 'server_error'
  return 'http_error'


_BEARER = re.compile(r'Bearer\s+[^\s"\'\\]+')


class Judge:
  """Thread-safe: one instance serves all worker threads of a run."""

  def __init__(self, config: JudgeConfig, *, client: openai.OpenAI | None = None):
    self.config = config
    api_key = config.api_key or os.environ.get('OPENAI_API_KEY') or 'EMPTY'
    self.client = client or openai.OpenAI(base_url=config.base_url, api_key=api_key,
                                          timeout=config.timeout,
                                          max_retries=config.max_retries)
    self._secrets = [api_key] if api_key != 'EMPTY' and len(api_key) >= 4 else []

  def redact(self, text: str | None) -> str | None:
    """`text` without the API key (a server may echo the request's headers in an error)."""
    if text is None:
      return None
    for secret in self._secrets:
      text = text.replace(secret, '<redacted>')
    return _BEARER.sub('Bearer <redacted>', text)

  def _describe(self, exc: Exception) -> str:
    refused = isinstance(exc, openai.APIConnectionError)
    where = f' (calling {self.config.base_url})' if refused else ''
    return self.redact(f'{type(exc).__name__}: {exc}{where}')

  def _request(self, messages: list[dict], name: str, model: type[replies.Reply],
               temperature: float | None) -> dict:
    request = {'model': self.config.model, 'messages': messages,
               'temperature': self.config.temperature if temperature is None else temperature}
    if self.config.max_tokens:
      request['max_tokens'] = self.config.max_tokens
    if self.config.response_format == 'json_schema':
      request['response_format'] = replies.response_format(name, model)
    elif self.config.response_format == 'json_object':
      request['response_format'] = {'type': 'json_object'}
    return request

  def ask(self, messages: list[dict], model: type[replies.Reply], *, name: str = 'reply',
          check: Callable[[Any], Any] | None = None,
          temperature: float | None = None) -> JudgeReply:
    """Sends `messages`, returns the reply validated against `model` as a dict (and by
    `check`, which may raise InvalidReply or return a transformed value).

    Raises JudgeError once the SDK gave up on a transport error, or after
    1 + max_retries unusable replies.
    """
    conversation = list(messages)
    for attempt in range(1, self.config.max_retries + 2):
      try:
        completion = self.client.chat.completions.create(
            **self._request(conversation, name, model, temperature))
      except openai.APIError as exc:
        raise JudgeError(error_kind(exc), self._describe(exc), attempts=attempt) from None
      choices = getattr(completion, 'choices', None) or []
      raw = choices[0].message.content if choices and choices[0].message else None
      try:
        value = replies.validate(replies.parse_json_object(raw), model)
        if check is not None:
          checked = check(value)
          value = value if checked is None else checked
        return JudgeReply(value, cap_raw(raw), attempt)
      except replies.InvalidReply as exc:
        reason = str(exc)
        # Re-ask with the reason: at temperature 0 the same prompt would give the same
        # reply again. Only the latest bad reply is kept, so the context stays short.
        conversation = list(messages) + [
            {'role': 'assistant', 'content': cap_raw(raw) or ''},
            {'role': 'user', 'content': replies.correction_message(reason)}]
    raise JudgeError('invalid_reply', self.redact(reason), raw=self.redact(cap_raw(raw)),
                     attempts=attempt)
