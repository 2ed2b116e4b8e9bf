"""saber_jax.judge: reply models (pydantic) and their check, the client against a real
HTTP server through the real openai client (its own retries for transport errors, ours
for unusable replies), and the resumable, fingerprinted JSONL run (judge/runs.py)."""

import json
import os
import threading
import time
from typing import Literal

import pytest

from judge_server import Reply, judge_server, user_text  # noqa: F401 (fixture)
from saber_jax import files, fingerprint
from saber_jax.judge import client, replies, runs


class Score(replies.Reply):
  score: replies.int_in(0, 3)
  ok: bool


MESSAGES = [{'role': 'user', 'content': 'rate this'}]


def fast_judge(server, **overrides) -> client.Judge:
  config = dict(base_url=server.base_url, model='judge-test', timeout=0.5, max_retries=2)
  config.update(overrides)
  return client.Judge(client.JudgeConfig(**config))


# ----------------------------------------------------------------------------- replies

@pytest.mark.parametrize('text', [
    '{"score": 2, "ok": true}',
    '```json\n{"score": 2, "ok": true}\n```',
    '<think>hmm {"score": 0}</think>{"score": 2, "ok": true}',
    'Sure! Here it is: {"score": 2, "ok": true} Hope that helps.',
])
def test_parse_json_object_tolerates_wrapping(text):
  assert replies.parse_json_object(text) == {'score': 2, 'ok': True}


@pytest.mark.parametrize('text,match', [
    ('', 'empty'), (None, 'empty'), ('score: 2', 'not JSON'), ('{"score": 2', 'not JSON'),
    ('[1, 2]', 'object'),
])
def test_parse_json_object_rejects(text, match):
  with pytest.raises(replies.InvalidReply, match=match):
    replies.parse_json_object(text)


def test_validate_exact_keys_strict_types_and_ranges():
  assert replies.validate({'score': 3, 'ok': False}, Score) == {'score': 3, 'ok': False}
  bad = [({'score': 4, 'ok': True},
          r'^\$.score: Input should be less than or equal to 3 \(got 4\)$'),
         ({'score': -1, 'ok': True}, 'greater than or equal to 0'),
         ({'score': 1.5, 'ok': True}, r'\$.score: Input should be a valid integer'),
         # not a number
         ({'score': True, 'ok': True}, r'\$.score: Input should be a valid integer'),
         ({'score': '2', 'ok': True}, r'\$.score: Input should be a valid integer'),
         ({'score': 1, 'ok': 'yes'}, r'\$.ok: Input should be a valid boolean'),
         ({'score': 1}, r'^\$.ok: Field required$'),
         ({'score': 1, 'ok': True, 'why': 'x'}, r'\$.why: Extra inputs are not permitted')]
  for value, match in bad:
    with pytest.raises(replies.InvalidReply, match=match):
      replies.validate(value, Score)

  class Inner(replies.Reply):
    b: replies.NonEmpty

  class Nested(replies.Reply):
    a: Inner
    e: Literal['x', 'y']
    tags: list[str]
    f: replies.number_in(0, 1)
  good = {'a': {'b': 'z'}, 'e': 'x', 'tags': [], 'f': 0.5}
  assert replies.validate(good, Nested) == good
  for change, match in [({'a': {'b': ' '}}, r'\$.a.b: String should match'),
                        ({'e': 'z'}, r"\$.e: Input should be 'x' or 'y'"),
                        ({'tags': [1]}, r'\$.tags.0: Input should be a valid string'),
                        ({'f': float('nan')}, r'\$.f: Input should be a finite number')]:
    with pytest.raises(replies.InvalidReply, match=match):
      replies.validate({**good, **change}, Nested)


def test_json_schema_is_strict_and_complete():
  assert replies.response_format('s', Score) == {
      'type': 'json_schema',
      'json_schema': {'name': 's', 'strict': True, 'schema': {
          'title': 'Score', 'type': 'object', 'additionalProperties': False,
          'required': ['score', 'ok'],
          'properties': {'score': {'title': 'Score', 'type': 'integer', 'minimum': 0, 'maximum': 3},
                         'ok': {'title': 'Ok', 'type': 'boolean'}}}}}


# ----------------------------------------------------------------------------- client

def test_ask_sends_strict_schema_at_temperature_zero(judge_server):
  server = judge_server(lambda body: '{"score": 2, "ok": true}')
  reply = fast_judge(server).ask(MESSAGES, Score, name='score')
  assert reply.value == {'score': 2, 'ok': True} and reply.attempts == 1
  body = server.requests[0]
  assert body['temperature'] == 0.0 and body['model'] == 'judge-test'
  assert body['response_format'] == replies.response_format('score', Score)
  assert body['messages'] == MESSAGES


def test_response_format_can_be_relaxed_for_servers_without_json_schema(judge_server):
  server = judge_server(lambda body: '{"score": 2, "ok": true}')
  fast_judge(server, response_format='json_object').ask(MESSAGES, Score)
  fast_judge(server, response_format='none').ask(MESSAGES, Score)
  assert server.requests[0]['response_format'] == {'type': 'json_object'}
  assert 'response_format' not in server.requests[1]


def test_malformed_reply_is_reasked_with_the_reason(judge_server):
  def script(body):
    if 'could not be used' in user_text(body):
      return '{"score": 1, "ok": false}'
    return '{"score": 1, "ok": fal'
  server = judge_server(script)
  reply = fast_judge(server).ask(MESSAGES, Score)
  assert reply.value == {'score': 1, 'ok': False} and reply.attempts == 2
  second = server.requests[1]['messages']
  assert second[0] == MESSAGES[0]
  assert second[1] == {'role': 'assistant', 'content': '{"score": 1, "ok": fal'}
  assert 'not JSON' in second[2]['content']


def test_out_of_range_every_time_becomes_an_error_with_the_raw_reply(judge_server):
  server = judge_server(lambda body: '{"score": 7, "ok": true}')
  with pytest.raises(client.JudgeError) as info:
    fast_judge(server, max_retries=2).ask(MESSAGES, Score)
  err = info.value
  assert err.kind == 'invalid_reply' and 'less than or equal to 3' in err.message
  assert err.raw == '{"score": 7, "ok": true}' and err.attempts == 3
  assert len(server.requests) == 3


def test_a_huge_reply_is_stored_capped_and_still_parsed_whole(judge_server):
  padding = ' ' * 2_000_000    # 2 MB of whitespace inside a valid JSON object
  server = judge_server(lambda body: '{"score": 2,' + padding + '"ok": true}')
  reply = fast_judge(server).ask(MESSAGES, Score)
  assert reply.value == {'score': 2, 'ok': True}
  assert len(reply.raw) < client.MAX_RAW_CHARS + 100
  assert reply.raw.endswith(f'... [{2_000_000 + 23 - client.MAX_RAW_CHARS} more characters '
                            'not stored]')
  bad = judge_server(lambda body: '{"score": 9,' + padding + '"ok": true}')
  with pytest.raises(client.JudgeError) as info:
    fast_judge(bad, max_retries=1).ask(MESSAGES, Score)
  assert len(info.value.raw) < client.MAX_RAW_CHARS + 100
  resent = bad.requests[1]['messages'][1]['content']     # the re-ask carries the cut reply
  assert len(resent) < client.MAX_RAW_CHARS + 100


def test_rate_limit_is_retried_by_the_sdk_honouring_retry_after(judge_server):
  def script(body):
    if len(server.requests) == 1:
      return Reply(status=429, headers={'retry-after': '0.3'}, error='slow down')
    return '{"score": 3, "ok": true}'
  server = judge_server(script)
  start = time.monotonic()
  reply = fast_judge(server).ask(MESSAGES, Score)
  assert reply.value['score'] == 3 and len(server.requests) == 2
  assert time.monotonic() - start >= 0.3      # waited what the server asked


def test_server_errors_then_success(judge_server):
  server = judge_server(lambda body: Reply(status=500) if len(server.requests) < 3
                        else '{"score": 0, "ok": true}')
  assert fast_judge(server).ask(MESSAGES, Score).attempts == 1
  assert len(server.requests) == 3


def test_timeout_then_success_and_timeout_every_time(judge_server):
  server = judge_server(lambda body: Reply('{"score": 1, "ok": true}',
                                           delay=1.5 if len(server.requests) == 1 else 0.0))
  assert fast_judge(server, timeout=0.3).ask(MESSAGES, Score).value['score'] == 1
  assert len(server.requests) == 2

  slow = judge_server(lambda body: Reply('{"score": 1, "ok": true}', delay=1.5))
  with pytest.raises(client.JudgeError) as info:
    fast_judge(slow, timeout=0.3, max_retries=1).ask(MESSAGES, Score)
  assert info.value.kind == 'timeout' and len(slow.requests) == 2


def test_client_errors_are_not_retried(judge_server):
  server = judge_server(lambda body: Reply(status=400, error='bad request'))
  with pytest.raises(client.JudgeError) as info:
    fast_judge(server).ask(MESSAGES, Score)
  assert info.value.kind == 'http_error' and len(server.requests) == 1


def test_connection_refused_is_retried_then_reported_with_the_url():
  judge = client.Judge(client.JudgeConfig('http://127.0.0.1:9/v1', 'm', timeout=0.5,
                                          max_retries=1))
  with pytest.raises(client.JudgeError) as info:
    judge.ask(MESSAGES, Score)
  assert info.value.kind == 'connection'
  assert info.value.message.endswith('(calling http://127.0.0.1:9/v1)')


def test_api_key_is_redacted_from_errors(judge_server):
  key = 'sk-abcdefghijklmnop'
  server = judge_server(lambda body: Reply(status=401, error=f'bad key {key}; Bearer {key}'))
  with pytest.raises(client.JudgeError) as info:
    fast_judge(server, api_key=key).ask(MESSAGES, Score)
  assert key not in info.value.message and 'bad key <redacted>' in info.value.message


# ----------------------------------------------------------------------------- runs

def _items(n):
  return [{'id': f'item{i:02d}', 'text': f'text {i}'} for i in range(n)]


def test_run_jobs_resumes_retries_failures_and_bounds_concurrency(judge_server, tmp_path):
  bad = {'item03', 'item07'}
  fixed = threading.Event()

  def script(body):
    text = user_text(body)
    if any(b in text for b in bad) and not fixed.is_set():
      return '{"score": 9, "ok": true}'  # out of range until "fixed"
    return Reply('{"score": 1, "ok": true}', delay=0.02)
  server = judge_server(script)
  judge = fast_judge(server, max_retries=1)

  def process(item):
    reply = judge.ask([{'role': 'user', 'content': item['id']}], Score)
    return {'score': reply.value['score']}

  out, errors = str(tmp_path / 'out.jsonl'), str(tmp_path / 'errors.jsonl')
  # First run stops after 6 new items (simulating an interruption).
  s1 = runs.run_jobs(_items(12), process, out_path=out, errors_path=errors, concurrency=3,
                     max_items=6)
  assert (s1.done, s1.skipped, s1.failed) == (5, 0, 1)  # item03 failed
  assert 2 <= server.max_in_flight <= 3  # concurrent, but bounded
  # A crash mid-append leaves half a line; the next run drops it and redoes that item.
  with open(out, 'a') as f:
    f.write('{"id": "item00", "sco')
  s2 = runs.run_jobs(_items(12), process, out_path=out, errors_path=errors, concurrency=3)
  assert (s2.done, s2.skipped, s2.failed) == (5, 5, 2)  # item03 again, item07
  assert sorted(r['id'] for r in files.read_jsonl(errors)) == ['item03', 'item07']
  err = next(files.read_jsonl(errors))
  assert err['kind'] == 'invalid_reply' and err['attempts'] == 2
  assert err['raw'] == '{"score": 9, "ok": true}'
  fixed.set()
  s3 = runs.run_jobs(_items(12), process, out_path=out, errors_path=errors, concurrency=3)
  assert (s3.done, s3.skipped, s3.failed) == (2, 10, 0)
  ids = [r['id'] for r in files.read_jsonl(out)]
  assert sorted(ids) == [f'item{i:02d}' for i in range(12)]  # none lost, none twice
  assert os.path.getsize(errors) == 0  # finished ids leave errors.jsonl
  assert 'done=0 skipped=12 failed=0' == runs.run_jobs(
      _items(12), process, out_path=out, errors_path=errors).line()


def test_run_jobs_rejects_duplicate_ids_and_propagates_bugs(tmp_path):
  out, errors = str(tmp_path / 'o.jsonl'), str(tmp_path / 'e.jsonl')
  with pytest.raises(ValueError, match="duplicate id 'a'"):
    runs.run_jobs([{'id': 'a'}, {'id': 'a'}], lambda item: {}, out_path=out, errors_path=errors)

  def buggy(item):
    raise KeyError('bug')
  with pytest.raises(KeyError):
    runs.run_jobs([{'id': 'b'}], buggy, out_path=out, errors_path=errors)
  with pytest.raises(ValueError, match="item 0: record has no 'id'"):
    runs.run_jobs([{'x': 1}], lambda item: {}, out_path=out, errors_path=errors)


def test_item_errors_are_recorded_not_raised(tmp_path):
  out, errors = str(tmp_path / 'o.jsonl'), str(tmp_path / 'e.jsonl')

  def process(item):
    if item['id'] == 'broken':
      raise runs.ItemError('bad_input', 'clip broken: cannot decode media')
    return {'v': 1}
  s = runs.run_jobs([{'id': 'ok'}, {'id': 'broken'}], process, out_path=out, errors_path=errors)
  assert (s.done, s.failed) == (1, 1)
  (err,) = list(files.read_jsonl(errors))
  assert err['id'] == 'broken' and err['kind'] == 'bad_input' and 'decode' in err['message']
  assert json.loads(open(out).read()) == {'id': 'ok', 'v': 1}


def test_rerun_with_another_producer_is_refused_unless_overwritten(tmp_path):
  out, errors = str(tmp_path / 'o.jsonl'), str(tmp_path / 'e.jsonl')
  run = lambda judge, **kw: runs.run_jobs(
      [{'id': 'a'}, {'id': 'b'}], lambda item: {'judge': judge}, out_path=out,
      errors_path=errors, produced_by={'judge': judge}, **kw)
  assert run('j1').done == 2 and run('j1').skipped == 2
  with pytest.raises(fingerprint.Mismatch, match='judge: "j1" -> "j2"'):
    run('j2')
  assert run('j2', overwrite=True).done == 2
  assert [r['judge'] for r in files.read_jsonl(out)] == ['j2', 'j2']
