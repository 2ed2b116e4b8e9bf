"""saber-sample (saber_jax/cli/sample.py) against a real chat-completions server on 127.0.0.1:
records made by saber-preprocess from demo clips; each request carries the clip and messages
that the Qwen2.5-Omni chat template + processor turn into exactly the record's prompt tokens;
n samples per id in mode=generate's schema; resumable; saber-make-pairs takes the output."""

import base64
import json
import os
import re

import numpy as np
import pytest

import tokenizer_helpers as th
from judge_server import Reply, judge_server, user_text  # noqa: F401 (fixture)
from saber_jax.cli import make_demo_data, make_pairs, preprocess, sample
from saber_jax.data import media, prompt, records

N = 3


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  """Four demo clips (the fourth a silent video with a separate wav) as SFT records."""
  root = tmp_path_factory.mktemp('clips')
  manifest, labels = make_demo_data.make_demo_data(str(root), n=4, seed=1)
  preprocess.main(['--manifest', manifest, '--annotations', labels, '--out', str(root / 'rec'),
                   '--num_shards', '1'])
  return manifest, labels, str(root / 'rec' / 'sft')


def _completion(body, count):
  """n choices whose texts name their index (so a judge can rank them) with logprobs;
  the last one is cut at max_tokens."""
  n = body['n']
  choices = [{'index': i, 'finish_reason': 'length' if i == n - 1 else 'stop',
              'message': {'role': 'assistant', 'content': f'sample-{i} of request {count}'},
              'logprobs': {'content': [{'token': 'a', 'logprob': -0.5, 'bytes': None,
                                        'top_logprobs': []}] * (i + 1)}}
             for i in reversed(range(n))]                 # out of order: sorted by index
  return {'id': f'c{count}', 'object': 'chat.completion', 'created': 0, 'model': body['model'],
          'choices': choices, 'usage': {'prompt_tokens': 1, 'completion_tokens': n,
                                        'total_tokens': n + 1}}


def _sample_args(server, out, dataset, *extra):
  manifest, _, prefix = dataset
  return ['--base-url', server.base_url, '--model', 'saber', '--records', prefix,
          '--manifest', manifest, '--num-samples', str(N), '--temperature', '0.8',
          '--max-tokens', '7', '--out', str(out), '--concurrency', '2', *extra]


def _lines(path):
  return [json.loads(line) for line in open(path)]


def _errors(out):
  return _lines(out / 'errors.jsonl') if (out / 'errors.jsonl').exists() else []


def test_requests_carry_the_clip_and_render_to_the_records_prompt(dataset, tmp_path,
                                                                  judge_server):
  manifest, labels, prefix = dataset
  counter = iter(range(1000))
  server = judge_server(lambda body: Reply(body=_completion(body, next(counter))))
  sample.main(_sample_args(server, tmp_path, dataset))

  clips = {c['id']: c for c in map(json.loads, open(manifest))}
  base = os.path.dirname(manifest)
  by_video = {open(os.path.join(base, c['video']), 'rb').read(): c['id'] for c in clips.values()}
  recs = {r['id']: r for r in records.iter_records(records.shard_paths(prefix))}
  separate, = [i for i, c in clips.items() if 'audio' in c]
  assert len(recs) == 4 and len(server.requests) == 4
  proc = th.hf_processor()
  for body in server.requests:
    assert (body['model'], body['n'], body['temperature'], body['max_tokens']) == (
        'saber', N, 0.8, 7)
    assert body['logprobs'] is True
    assert body['mm_processor_kwargs'] == {'use_audio_in_video': True}
    video, = [p for m in body['messages'] if isinstance(m['content'], list)
              for p in m['content'] if p['type'] == 'video_url']
    head, data = video['video_url']['url'].split(',', 1)
    sent = tmp_path / 'sent'
    sent.write_bytes(base64.b64decode(data))
    if head == 'data:video/x-matroska;base64':   # the silent video with its wav muxed in
      rid = separate
      np.testing.assert_array_equal(media.load_video(str(sent))[0], media.load_video(
          os.path.join(base, clips[rid]['video']))[0])
    else:
      assert head == 'data:video/mp4;base64'
      rid = by_video[sent.read_bytes()]
    record = recs[rid]
    # The server's view: the messages through the Omni chat template and processor, with
    # the audio track of the video it got: exactly the record's prompt tokens.
    rendered = proc.apply_chat_template(sample.template_messages(body['messages']),
                                        tokenize=False, add_generation_prompt=True)
    waveform = media.load_audio(str(sent))
    out = proc(text=rendered, videos=[record['frames']], audio=[waveform],
               audio_from_video_indices=[0], load_audio_from_video=True,
               videos_kwargs={'fps': record['video_fps']})
    np.testing.assert_array_equal(np.asarray(out['input_ids'][0]), sample.prompt_tokens(record))
    if rid == separate:   # the muxed track is the wav, to the sample (16-bit PCM)
      np.testing.assert_allclose(waveform, media.load_audio(
          os.path.join(base, clips[rid]['audio'])), atol=1 / 32767)

  lines = _lines(tmp_path / 'predictions.jsonl')
  assert sorted(line['id'] for line in lines) == sorted(recs)
  tok = prompt.load_tokenizer()
  for line in lines:
    assert list(line) == ['id', 'response', 'responses', 'finished', 'num_tokens', 'logprob']
    assert [r.split(' of ')[0] for r in line['responses']] == [f'sample-{i}' for i in range(N)]
    assert line['response'] == line['responses'][0]
    assert line['finished'] == [True] * (N - 1) + [False]
    assert line['logprob'] == [-0.5 * (i + 1) for i in range(N)]
    assert line['num_tokens'] == [len(tok.encode(r, add_special_tokens=False))
                                  for r in line['responses']]
  assert not _errors(tmp_path)

  # Resumable: a rerun asks only for what is missing.
  kept = lines[1:]
  with open(tmp_path / 'predictions.jsonl', 'w') as f:
    f.writelines(json.dumps(line) + '\n' for line in kept)
    f.write('{"id": "torn')                                 # a kill mid-write
  sample.main(_sample_args(server, tmp_path, dataset))
  assert len(server.requests) == 5
  again = _lines(tmp_path / 'predictions.jsonl')
  assert sorted(line['id'] for line in again) == sorted(line['id'] for line in lines)
  # Other sampling settings on the same output: refused, naming what differs.
  with pytest.raises(SystemExit, match='temperature'):
    sample.main(_sample_args(server, tmp_path, dataset)[:-2] + ['--temperature', '1.0'])

  # saber-make-pairs takes the output as it takes mode=generate's.
  def judge(body):
    index = int(re.search(r'sample-(\d)', user_text(body)).group(1))
    return json.dumps({'logical_consistency': 9 - 3 * index, 'evidence_alignment': 9 - 3 * index})
  scorer = judge_server(judge)
  make_pairs.main(['--samples', str(tmp_path / 'predictions.jsonl'), '--annotations', labels,
                   '--out', str(tmp_path / 'pairs'), '--base-url', scorer.base_url,
                   '--model', 'judge', '--pairing', 'zipped'])
  pairs = _lines(tmp_path / 'pairs' / 'pairs.jsonl')
  assert all(p['chosen'].startswith('sample-0') for p in pairs)
  assert len({p['chosen'] for p in pairs}) == len(again)    # a pair for every sampled record


def test_server_failures_go_to_errors_and_are_retried(dataset, tmp_path, judge_server):
  failing = judge_server(lambda body: Reply(status=400, error='model not loaded'))
  with pytest.raises(SystemExit, match='every record failed'):
    sample.main(_sample_args(failing, tmp_path, dataset, '--max-retries', '0'))
  errors = _lines(tmp_path / 'errors.jsonl')
  assert len(errors) == 4 and {e['kind'] for e in errors} == {'http_error'}
  assert 'model not loaded' in errors[0]['message']
  counter = iter(range(1000))
  working = judge_server(lambda body: Reply(body=_completion(body, next(counter))))
  sample.main(_sample_args(working, tmp_path, dataset, '--max-retries', '0'))
  assert len(_lines(tmp_path / 'predictions.jsonl')) == 4
  assert not _errors(tmp_path)


def test_prompt_without_generation_prompt_or_system_turn_is_refused():
  tok = prompt.load_tokenizer()
  full = prompt.build_prompt(tok, text='How does she feel?')
  turns = sample.parse_prompt(full, tok)
  assert [t['role'] for t in turns] == ['system', 'user']
  assert turns[1]['content'] == [{'type': 'text', 'text': 'How does she feel?'}]
  with pytest.raises(ValueError, match='generation prompt'):
    sample.parse_prompt(full[:-2], tok)
  with pytest.raises(ValueError, match='no system turn'):
    sample.parse_prompt(prompt.build_prompt(tok, text='hi', system=None), tok)
