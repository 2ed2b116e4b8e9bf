"""saber_jax.judge: reply parsing and validation, retries against a real HTTP server
through the real openai client, and the resumable JSONL run."""

import json
import os
import random
import threading

import pytest

from judge_server import Reply, judge_server, user_text  # noqa: F401 (fixture)
from saber_jax import judge as J

SCORE = J.obj(score=J.integer(0, 3), ok=J.boolean())
MESSAGES = [{'role': 'user', 'content': 'rate this'}]


def fast_judge(server, **overrides) -> J.Judge:
  config = dict(base_url=server.base_url, model='judge-test', timeout=0.5, max_retries=2,
                backoff=0.01, backoff_max=0.05)
  config.update(overrides)
  return J.Judge(J.JudgeConfig(**config), seed=0)


# ----------------------------------------------------------------------------- parsing

@pytest.mark.parametrize('text', [
    '{"score": 2, "ok": true}',
    '```json\n{"score": 2, "ok": true}\n```',
    '<think>hmm {"score": 0}</think>{"score": 2, "ok": true}',
    'Sure! Here it is: {"score": 2, "ok": true} Hope that helps.',
])
def test_parse_json_object_tolerates_wrapping(text):
  assert J.parse_json_object(text) == {'score': 2, 'ok': True}


@pytest.mark.parametrize('text,match', [
    ('', 'empty'), (None, 'empty'), ('score: 2', 'not JSON'), ('{"score": 2', 'not JSON'),
    ('[1, 2]', 'object'),
])
def test_parse_json_object_rejects(text, match):
  with pytest.raises(J.InvalidReply, match=match):
    J.parse_json_object(text)


def test_validate_exact_keys_types_and_ranges():
  assert J.validate({'score': 3, 'ok': False}, SCORE) == {'score': 3, 'ok': False}
  assert J.validate({'score': 2.0, 'ok': True}, SCORE) == {'score': 2, 'ok': True}
  bad = [({'score': 4, 'ok': True}, r'\$.score: 4 is outside \[0, 3\]'),
         ({'score': -1, 'ok': True}, 'outside'),
         ({'score': 1.5, 'ok': True}, 'expected an integer'),
         ({'score': True, 'ok': True}, 'expected an integer'),  # bool is not a number
         ({'score': '2', 'ok': True}, 'expected an integer'),
         ({'score': 1, 'ok': 'yes'}, 'true or false'),
         ({'score': 1}, r"missing \['ok'\]"),
         ({'score': 1, 'ok': True, 'why': 'x'}, r"unexpected \['why'\]")]
  for value, match in bad:
    with pytest.raises(J.InvalidReply, match=match):
      J.validate(value, SCORE)
  nested = J.obj(a=J.obj(b=J.string(non_empty=True)), e=J.enum('x', 'y'), l=J.string_list())
  with pytest.raises(J.InvalidReply, match=r'\$.a.b: must not be empty'):
    J.validate({'a': {'b': ' '}, 'e': 'x', 'l': []}, nested)
  with pytest.raises(J.InvalidReply, match=r"\$.e: expected one of \['x', 'y'\]"):
    J.validate({'a': {'b': 'z'}, 'e': 'z', 'l': []}, nested)
  with pytest.raises(J.InvalidReply, match='list of strings'):
    J.validate({'a': {'b': 'z'}, 'e': 'x', 'l': [1]}, nested)
  with pytest.raises(J.InvalidReply, match='expected a number'):
    J.validate(float('nan'), J.number(0, 1))


def test_json_schema_is_strict_and_complete():
  assert J.response_format('s', SCORE) == {
      'type': 'json_schema',
      'json_schema': {'name': 's', 'strict': True, 'schema': {
          'type': 'object', 'additionalProperties': False, 'required': ['score', 'ok'],
          'properties': {'score': {'type': 'integer', 'minimum': 0, 'maximum': 3},
                         'ok': {'type': 'boolean'}}}}}


def test_backoff_grows_exponentially_within_jitter_bounds():
  rng = random.Random(0)
  for retry in range(6):
    window = min(8.0, 0.5 * 2 ** retry)
    for _ in range(50):
      d = J.backoff_delay(retry, 0.5, 8.0, rng)
      assert window / 2 <= d <= window


# ----------------------------------------------------------------------------- client

def test_ask_sends_strict_schema_at_temperature_zero(judge_server):
  server = judge_server(lambda body: '{"score": 2, "ok": true}')
  reply = fast_judge(server).ask(MESSAGES, SCORE, name='score')
  assert reply.value == {'score': 2, 'ok': True} and reply.attempts == 1
  body = server.requests[0]
  assert body['temperature'] == 0.0 and body['model'] == 'judge-test'
  assert body['response_format'] == J.response_format('score', SCORE)
  assert body['messages'] == MESSAGES


def test_response_format_can_be_relaxed_for_servers_without_json_schema(judge_server):
  server = judge_server(lambda body: '{"score": 2, "ok": true}')
  fast_judge(server, response_format='json_object').ask(MESSAGES, SCORE)
  fast_judge(server, response_format='none').ask(MESSAGES, SCORE)
  assert server.requests[0]['response_format'] == {'type': 'json_object'}
  assert 'response_format' not in server.requests[1]


def test_malformed_reply_is_reasked_with_the_reason(judge_server):
  def script(body):
    if 'could not be used' in user_text(body):
      return '{"score": 1, "ok": false}'
    return '{"score": 1, "ok": fal'
  server = judge_server(script)
  reply = fast_judge(server).ask(MESSAGES, SCORE)
  assert reply.value == {'score': 1, 'ok': False} and reply.attempts == 2
  second = server.requests[1]['messages']
  assert second[0] == MESSAGES[0]
  assert second[1] == {'role': 'assistant', 'content': '{"score": 1, "ok": fal'}
  assert 'not JSON' in second[2]['content']


def test_out_of_range_every_time_becomes_an_error_with_the_raw_reply(judge_server):
  server = judge_server(lambda body: '{"score": 7, "ok": true}')
  with pytest.raises(J.JudgeError) as info:
    fast_judge(server, max_retries=2).ask(MESSAGES, SCORE)
  err = info.value
  assert err.kind == 'invalid_reply' and 'outside [0, 3]' in err.message
  assert err.raw == '{"score": 7, "ok": true}' and err.attempts == 3
  assert len(server.requests) == 3


def test_rate_limit_then_success_honours_retry_after(judge_server):
  calls = []

  def script(body):
    calls.append(1)
    if len(calls) == 1:
      return Reply(status=429, headers={'retry-after': '0.03'}, error='slow down')
    return '{"score": 3, "ok": true}'
  server = judge_server(script)
  slept = []
  judge = J.Judge(J.JudgeConfig(server.base_url, 'm', timeout=0.5, backoff=0.001, backoff_max=1.0),
                  sleep=lambda s: slept.append(s), seed=0)
  reply = judge.ask(MESSAGES, SCORE)
  assert reply.attempts == 2 and reply.value['score'] == 3
  assert slept and slept[0] >= 0.03  # waited at least what the server asked


def test_server_error_then_success(judge_server):
  calls = []

  def script(body):
    calls.append(1)
    return Reply(status=500) if len(calls) < 3 else '{"score": 0, "ok": true}'
  server = judge_server(script)
  assert fast_judge(server).ask(MESSAGES, SCORE).attempts == 3


def test_timeout_then_success_and_timeout_every_time(judge_server):
  calls = []

  def script(body):
    calls.append(1)
    return Reply('{"score": 1, "ok": true}', delay=1.5 if len(calls) == 1 else 0.0)
  server = judge_server(script)
  assert fast_judge(server, timeout=0.3).ask(MESSAGES, SCORE).attempts == 2

  slow = judge_server(lambda body: Reply('{"score": 1, "ok": true}', delay=1.5))
  with pytest.raises(J.JudgeError) as info:
    fast_judge(slow, timeout=0.3, max_retries=1).ask(MESSAGES, SCORE)
  assert info.value.kind == 'timeout' and info.value.attempts == 2


def test_client_errors_are_not_retried(judge_server):
  server = judge_server(lambda body: Reply(status=400, error='bad request'))
  with pytest.raises(J.JudgeError) as info:
    fast_judge(server).ask(MESSAGES, SCORE)
  assert info.value.kind == 'http_error' and len(server.requests) == 1


def test_connection_refused_is_retried_then_reported():
  judge = J.Judge(J.JudgeConfig('http://127.0.0.1:9/v1', 'm', timeout=0.5, max_retries=1,
                                backoff=0.01), seed=0)
  with pytest.raises(J.JudgeError) as info:
    judge.ask(MESSAGES, SCORE)
  assert info.value.kind == 'connection' and info.value.attempts == 2


# ----------------------------------------------------------------------------- files

def test_repair_tail_drops_only_an_unterminated_line(tmp_path):
  path = str(tmp_path / 'out.jsonl')
  with open(path, 'w') as f:
    f.write('{"id": "a"}\n{"id": "b"}\n{"id": "c", "x": ')
  assert J.repair_tail(path) == len('{"id": "c", "x": ')
  assert [r['id'] for r in J.read_jsonl(path)] == ['a', 'b']
  assert J.repair_tail(path) == 0
  with open(path, 'w') as f:
    f.write('{"id": "only", "half')
  J.repair_tail(path)
  assert os.path.getsize(path) == 0


def test_read_jsonl_names_file_and_line(tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"id": 1}\n\nnot json\n')
  with pytest.raises(ValueError, match=r'bad.jsonl:3: not valid JSON'):
    list(J.read_jsonl(str(path)))
  path.write_text('[1]\n')
  with pytest.raises(ValueError, match=r'bad.jsonl:1: expected a JSON object'):
    list(J.read_jsonl(str(path)))


def test_appender_writes_whole_lines_from_many_threads(tmp_path):
  path = str(tmp_path / 'out.jsonl')
  with J.JsonlAppender(path) as out:
    threads = [threading.Thread(target=lambda t=t: [out.append({'id': f'{t}-{i}', 'pad': 'x' * 500})
                                                      for i in range(20)]) for t in range(4)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  ids = [r['id'] for r in J.read_jsonl(path)]
  assert len(ids) == 80 and len(set(ids)) == 80


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
    reply = judge.ask([{'role': 'user', 'content': item['id']}], SCORE)
    return {'score': reply.value['score']}

  out, errors = str(tmp_path / 'out.jsonl'), str(tmp_path / 'errors.jsonl')
  # First run stops after 6 new items (simulating an interruption).
  s1 = J.run_jobs(_items(12), process, out_path=out, errors_path=errors, concurrency=3, max_items=6)
  assert (s1.done, s1.skipped, s1.failed) == (5, 0, 1)  # item03 failed
  assert 2 <= server.max_in_flight <= 3  # concurrent, but bounded
  # A crash mid-append leaves half a line; the next run drops it and redoes that item.
  with open(out, 'a') as f:
    f.write('{"id": "item00", "sco')
  s2 = J.run_jobs(_items(12), process, out_path=out, errors_path=errors, concurrency=3)
  assert (s2.done, s2.skipped, s2.failed) == (5, 5, 2)  # item03 again, item07
  assert sorted(r['id'] for r in J.read_jsonl(errors)) == ['item03', 'item07']
  err = next(J.read_jsonl(errors))
  assert err['kind'] == 'invalid_reply' and err['raw'] == '{"score": 9, "ok": true}' and err['attempts'] == 2
  fixed.set()
  s3 = J.run_jobs(_items(12), process, out_path=out, errors_path=errors, concurrency=3)
  assert (s3.done, s3.skipped, s3.failed) == (2, 10, 0)
  ids = [r['id'] for r in J.read_jsonl(out)]
  assert sorted(ids) == [f'item{i:02d}' for i in range(12)]  # none lost, none twice
  assert os.path.getsize(errors) == 0  # finished ids leave errors.jsonl
  assert 'done=0 skipped=12 failed=0' == J.run_jobs(
      _items(12), process, out_path=out, errors_path=errors).line()


def test_run_jobs_rejects_duplicate_ids_and_propagates_bugs(tmp_path):
  out, errors = str(tmp_path / 'o.jsonl'), str(tmp_path / 'e.jsonl')
  with pytest.raises(ValueError, match="duplicate id 'a'"):
    J.run_jobs([{'id': 'a'}, {'id': 'a'}], lambda item: {}, out_path=out, errors_path=errors)

  def buggy(item):
    raise KeyError('bug')
  with pytest.raises(KeyError):
    J.run_jobs([{'id': 'b'}], buggy, out_path=out, errors_path=errors)
  with pytest.raises(ValueError, match="item 0: record has no 'id'"):
    J.run_jobs([{'x': 1}], lambda item: {}, out_path=out, errors_path=errors)


def test_item_errors_are_recorded_not_raised(tmp_path):
  out, errors = str(tmp_path / 'o.jsonl'), str(tmp_path / 'e.jsonl')

  def process(item):
    if item['id'] == 'broken':
      raise J.ItemError('bad_input', 'clip broken: cannot decode media')
    return {'v': 1}
  s = J.run_jobs([{'id': 'ok'}, {'id': 'broken'}], process, out_path=out, errors_path=errors)
  assert (s.done, s.failed) == (1, 1)
  (err,) = list(J.read_jsonl(errors))
  assert err['id'] == 'broken' and err['kind'] == 'bad_input' and 'decode' in err['message']
  assert json.loads(open(out).read()) == {'id': 'ok', 'v': 1}
