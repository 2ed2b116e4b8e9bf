"""The tools (saber_jax.cli) end to end: each tool's main() against a real chat-completions
server on 127.0.0.1 through the real openai client -- normal answers, malformed JSON,
out-of-range values, timeouts, 429/500 then success, and interrupted runs resumed."""

import base64
import collections
import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
import wave

import pytest

from judge_server import Reply, judge_server, user_text  # noqa: F401 (fixture)
from saber_jax import files
from saber_jax.judge import replies
from saber_jax.cli import annotate, build_test_set, evaluate, make_pairs, quality

ROOT = pathlib.Path(__file__).resolve().parents[1]


def judge_args(server, *, timeout=0.5, retries=2, concurrency=2):
  return ['--base-url', server.base_url, '--model', 'test-judge', '--timeout', str(timeout),
          '--max-retries', str(retries), '--concurrency', str(concurrency)]


def write_jsonl(path, records):
  with open(path, 'w', encoding='utf-8') as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + '\n')
  return str(path)


def read(path):
  return list(files.read_jsonl(str(path)))


def marker_of(text):
  """The first [[tag]] in a prompt: how scripts tell items apart."""
  m = re.search(r'\[\[([^\]]+)\]\]', text)
  return m.group(1) if m else None


class Plan:
  """Per-marker sequences of behaviours for successive requests (the last repeats):
  'ok' (the answer), 'bad_json', '429', '500', 'slow' (the answer after 1.2 s), or a
  literal reply string."""

  def __init__(self, answer, plan):
    self.answer, self.plan = answer, plan
    self.seen = collections.Counter()
    self._lock = threading.Lock()

  def __call__(self, body):
    tag = marker_of(user_text(body))
    with self._lock:
      k = self.seen[tag]
      self.seen[tag] += 1
    steps = self.plan.get(tag, ['ok'])
    step = steps[min(k, len(steps) - 1)]
    if step == 'ok':
      return self.answer(body, tag)
    if step == 'bad_json':
      return '{"this is": not json'
    if step in ('429', '500'):
      return Reply(status=int(step), headers={'retry-after': '0'})
    if step == 'slow':
      return Reply(self.answer(body, tag), delay=1.2)
    return step


def annotation(tag, speech='Why do all your coffee mugs have numbers on the bottom?',
               sentiment='The overall sentiment is positive: the tone aligns with the smile.'):
  return {
      'video_desc': f'[[{tag}]] A man and a woman stand in a colorful kitchen holding mugs.',
      'audio_desc': {'speech_content': speech,
                     'acoustic_feat': 'A male voice with moderate pitch, inquisitive tone.'},
      'facial_exp_desc': 'His eyebrows are slightly furrowed; she looks at him neutrally.',
      'body_lang_desc': 'He tilts the mug to look at its bottom; she leans on the counter.',
      'sentiment_analysis': sentiment,
  }


ZH_ANNOTATION = {
    'video_desc': '一位男士和一位女士站在厨房里，手里拿着杯子。',
    'audio_desc': {'speech_content': '你的杯子底下为什么都有数字？',
                   'acoustic_feat': '男声，音调适中，语气好奇。'},
    'facial_exp_desc': '他微微皱眉，她表情平静。',
    'body_lang_desc': '他倾斜杯子查看杯底，她靠在柜台上。',
    'sentiment_analysis': '整体情绪中性偏好奇，语气与表情一致。',
}


# ----------------------------------------------------------------------------- annotate


def make_clip(path, color, seconds=1.0, fps=10, size=(64, 48), sr=16000, audio=True):
  """A real mp4 (mpeg4 video of one solid color + an AAC sine tone) written by PyAV."""
  import av
  import numpy as np
  with av.open(str(path), 'w') as c:
    v = c.add_stream('mpeg4', rate=fps)
    v.width, v.height, v.pix_fmt = size[0], size[1], 'yuv420p'
    a = c.add_stream('aac', rate=sr) if audio else None
    if a is not None:
      a.layout = 'mono'
    img = np.zeros((size[1], size[0], 3), np.uint8)
    img[:] = color
    for _ in range(int(seconds * fps)):
      for p in v.encode(av.VideoFrame.from_ndarray(img, format='rgb24')):
        c.mux(p)
    for p in v.encode():
      c.mux(p)
    if a is not None:
      t = np.arange(int(seconds * sr)) / sr
      x = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
      for s in range(0, len(x), 1024):
        f = av.AudioFrame.from_ndarray(x[None, s:s + 1024], format='fltp', layout='mono')
        f.sample_rate, f.pts = sr, s
        for p in a.encode(f):
          c.mux(p)
      for p in a.encode():
        c.mux(p)
  return str(path)


def test_sample_indices_and_pure_message_building():
  assert annotate.sample_indices(10, 4) == [1, 3, 6, 8]  # centres of 2.5-frame slices
  assert annotate.sample_indices(3, 8) == [0, 1, 2]
  messages = annotate.build_annotation_messages('PROMPT', [b'\xff\xd8a', b'\xff\xd8b'], b'RIFFwav')
  assert messages == [{'role': 'user', 'content': [
      {'type': 'text', 'text': 'PROMPT'},
      {'type': 'image_url',
       'image_url': {'url': 'data:image/jpeg;base64,' + base64.b64encode(b'\xff\xd8a').decode()}},
      {'type': 'image_url',
       'image_url': {'url': 'data:image/jpeg;base64,' + base64.b64encode(b'\xff\xd8b').decode()}},
      {'type': 'input_audio', 'input_audio': {'data': base64.b64encode(b'RIFFwav').decode(),
                                              'format': 'wav'}}]}]
  frames_only = annotate.build_annotation_messages('P', [b'x'], None)
  assert [p['type'] for p in frames_only[0]['content']] == ['text', 'image_url']
  assert '16 frames' in annotate.annotation_prompt('en', 16, True)
  assert '16帧' in annotate.annotation_prompt('zh', 16, False)


def test_language_check():
  annotate.check_language(ZH_ANNOTATION, 'zh')
  annotate.check_language(annotation('x'), 'en')
  with pytest.raises(replies.InvalidReply, match='Chinese'):
    annotate.check_language(annotation('x'), 'zh')
  with pytest.raises(replies.InvalidReply, match='English'):
    annotate.check_language(ZH_ANNOTATION, 'en')


def _first_image_color(body):
  from PIL import Image
  for part in body['messages'][0]['content']:
    if part['type'] == 'image_url':
      data = base64.b64decode(part['image_url']['url'].split(',', 1)[1])
      r, g, b = Image.open(io.BytesIO(data)).convert('RGB').resize((1, 1)).getpixel((0, 0))
      return {0: 'red', 1: 'green', 2: 'blue'}[max(range(3), key=lambda i: (r, g, b)[i])]
  return None


def test_annotate_end_to_end(judge_server, tmp_path):
  manifest = write_jsonl(tmp_path / 'clips.jsonl', [
      {'id': 'red', 'video': make_clip(tmp_path / 'red.mp4', (250, 0, 0)), 'lang': 'en',
       'transcript': 't'},
      {'id': 'green', 'video': 'green.mp4', 'lang': 'zh'},          # relative to the manifest
      {'id': 'blue', 'video': make_clip(tmp_path / 'blue.mp4', (0, 0, 250)), 'lang': 'en'},
      {'id': 'gone', 'video': 'missing.mp4', 'lang': 'en'},
  ])
  make_clip(tmp_path / 'green.mp4', (0, 250, 0))
  blue_fixed = threading.Event()
  red_calls = []

  def script(body):
    color = _first_image_color(body)
    if color == 'red':
      red_calls.append(1)
      if len(red_calls) == 1:
        return Reply(status=429, error='rate limited')
      return json.dumps(annotation('red'))
    if color == 'green':  # answers in English until told to use Chinese
      return json.dumps(ZH_ANNOTATION if '中文' in user_text(body) else annotation('green'),
                        ensure_ascii=False)
    if blue_fixed.is_set():
      return json.dumps(annotation('blue'))
    return 'I cannot produce JSON for this.'
  server = judge_server(script)
  out = tmp_path / 'ann'
  args = ['--manifest', manifest, '--out', str(out), '--num-frames', '4', '--frame-size', '32',
          *judge_args(server, timeout=5.0)]
  s = annotate.main(args)
  assert (s.done, s.skipped, s.failed) == (2, 0, 2)
  assert len(red_calls) == 2  # 429, then the retry succeeded
  records = {r['id']: r for r in read(out / 'annotations.jsonl')}
  assert records['red']['annotation'] == annotation('red')
  assert records['red']['transcript'] == 't' and records['red']['annotator'] == 'test-judge'
  assert records['green']['annotation'] == ZH_ANNOTATION
  errors = {r['id']: r for r in read(out / 'errors.jsonl')}
  assert errors['blue']['kind'] == 'invalid_reply'
  assert errors['blue']['raw'] == 'I cannot produce JSON for this.'
  assert errors['gone']['kind'] == 'bad_input' and 'missing.mp4' in errors['gone']['message']

  # What went over the wire: 4 JPEG frames of at most 32 px, then 1 s of 16 kHz mono WAV.
  from PIL import Image
  body = next(b for b in server.requests if _first_image_color(b) == 'red')
  parts = body['messages'][0]['content']
  assert [p['type'] for p in parts] == ['text'] + ['image_url'] * 4 + ['input_audio']
  image = Image.open(io.BytesIO(base64.b64decode(parts[1]['image_url']['url'].split(',', 1)[1])))
  assert image.format == 'JPEG' and max(image.size) == 32
  with wave.open(io.BytesIO(base64.b64decode(parts[-1]['input_audio']['data']))) as w:
    assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
    assert 0.95 <= w.getnframes() / 16000 <= 1.1
  assert body['response_format']['json_schema']['schema']['required'] == [
      'video_desc', 'audio_desc', 'facial_exp_desc', 'body_lang_desc', 'sentiment_analysis']

  # Rerun: finished clips are skipped, the fixed one completes, the missing file fails again.
  blue_fixed.set()
  s = annotate.main(args)
  assert (s.done, s.skipped, s.failed) == (1, 2, 1)
  assert sorted(r['id'] for r in read(out / 'annotations.jsonl')) == ['blue', 'green', 'red']
  assert [r['id'] for r in read(out / 'errors.jsonl')] == ['gone']

  # --no-audio sends frames only.
  n_before = len(server.requests)
  annotate.main(['--manifest', manifest, '--out', str(tmp_path / 'ann2'), '--no-audio',
                 '--num-frames', '2',
                 '--max-items', '1', *judge_args(server, timeout=5.0)])
  parts = server.requests[n_before]['messages'][0]['content']
  assert [p['type'] for p in parts] == ['text', 'image_url', 'image_url']
  assert 'No audio is provided' in parts[0]['text']


def test_annotate_does_not_send_a_clip_longer_than_the_preprocessing_limit(judge_server,
                                                                            tmp_path):
  server = judge_server(lambda body: json.dumps(annotation('red')))
  manifest = write_jsonl(tmp_path / 'clips.jsonl', [
      {'id': 'long', 'video': make_clip(tmp_path / 'long.mp4', (250, 0, 0)), 'lang': 'en'}])
  out = tmp_path / 'ann'
  with pytest.raises(SystemExit, match='every item failed'):
    annotate.main(['--manifest', manifest, '--out', str(out), '--max-seconds', '0.5',
                   *judge_args(server)])
  assert server.requests == []
  [error] = read(out / 'errors.jsonl')
  assert error['kind'] == 'too_long'
  assert re.search(r"clip 'long': .*long.mp4: 1.\d s > --max-seconds 0.5 s; not sent",
                   error['message'])
  assert annotate.parse_args(['--manifest', manifest, '--out', str(out),
                              '--model', 'm']).max_seconds == 30.0


# ----------------------------------------------------------------------------- quality


def test_quality_end_to_end(judge_server, tmp_path):
  speech = 'Why do all your coffee mugs have numbers on the bottom?'
  zh = {**ZH_ANNOTATION, 'audio_desc': {'speech_content': '今天天气很好<笑声>',
                                        'acoustic_feat': '男声，语气愉快。'},
        'video_desc': '[[z1]] 一位男士站在窗边。'}
  annotations = write_jsonl(tmp_path / 'ann.jsonl', [
      {'id': 'e1', 'lang': 'en', 'annotation': annotation('e1', speech),
       'transcript': 'why do all your coffee mugs have numbers on the bottom'},
      # e2's transcript comes from --transcripts
      {'id': 'e2', 'lang': 'en', 'annotation': annotation('e2', speech)},
      {'id': 'z1', 'lang': 'zh', 'annotation': zh},
      {'id': 'e3', 'lang': 'en', 'annotation': annotation('e3', speech)},   # no transcript at all
      {'id': 'e4', 'lang': 'en', 'annotation': annotation('e4', '<laughter> Why do all your coffee '
                                                                'mugs have numbers on the bottom')},
  ])
  transcripts = write_jsonl(tmp_path / 'asr.jsonl', [
      {'id': 'e2', 'transcript': 'I never said she stole my money'},   # a different sentence
      {'id': 'z1', 'transcript': '今天天气很好。'},
      {'id': 'e4', 'transcript': 'Why do all your coffee mugs have numbers on the bottom?'},
  ])
  descriptions = write_jsonl(tmp_path / 'desc.jsonl', [
      {'id': k, 'description': f'[[{k}]] an independent caption'}
      for k in ('e1', 'e2', 'z1', 'e3', 'e4')])

  def answer(body, tag):
    if tag == 'z1':
      return '{"consistent": false, "reason": "the caption shows a different room"}'
    return '{"consistent": true, "reason": "same scene"}'
  plan = Plan(answer, {'e1': ['429', 'ok'], 'e4': ['bad_json'], 'z1': ['slow', 'ok']})
  server = judge_server(plan)
  out = tmp_path / 'qc'
  args = ['--annotations', annotations, '--transcripts', transcripts,
          '--descriptions', descriptions,
          '--out', str(out), *judge_args(server)]
  counts = quality.main(args)
  assert (counts['kept'], counts['dropped'], counts['pending']) == (1, 3, 1)
  assert counts['reasons'] == {'wer': 1, 'no_transcript': 1, 'inconsistent': 1}
  assert plan.seen['e2'] == 0 and plan.seen['e3'] == 0  # failed (a): never judged
  # 429 and timeout retried once each; bad JSON asked 1 + 2 times.
  assert (plan.seen['e1'], plan.seen['z1'], plan.seen['e4']) == (2, 2, 3)
  (kept,) = read(out / 'kept.jsonl')
  assert kept['id'] == 'e1' and kept['qc']['wer'] == 0.0 and kept['qc']['consistent'] is True
  dropped = {r['id']: r for r in read(out / 'dropped.jsonl')}
  # e2: ref 7 words, hyp 11 words, no word in common -> 7 substitutions + 4 insertions.
  assert dropped['e2']['qc']['wer'] == pytest.approx(11 / 7)
  assert dropped['e2']['drop_reasons'] == ['WER 1.571 > 0.3']
  assert dropped['z1']['qc']['wer'] == 0.0 and dropped['z1']['qc']['wer_unit'] == 'char'
  assert 'different room' in dropped['z1']['drop_reasons'][0]
  assert dropped['e3']['drop_reasons'] == ['no ASR transcript']
  assert [r['id'] for r in read(out / 'errors.jsonl')] == ['e4']

  plan.plan['e4'] = ['ok']
  counts = quality.main(args)
  assert (counts['kept'], counts['dropped'], counts['pending']) == (2, 3, 0)
  assert counts['judge'] == {'done': 1, 'skipped': 2, 'failed': 0}
  assert sorted(r['id'] for r in read(out / 'kept.jsonl')) == ['e1', 'e4']

  # Without --descriptions only (a) runs; threshold 0 keeps exactly the zero-edit clips
  # (e4's <laughter> tag is stripped before scoring).
  counts = quality.main(['--annotations', annotations, '--transcripts', transcripts,
                         '--out', str(tmp_path / 'qc_wer_only'), '--wer-threshold', '0'])
  assert (counts['kept'], counts['dropped']) == (3, 2)  # e1, z1, e4 kept without the LLM check


# ----------------------------------------------------------------------------- build_test_set


def test_build_test_set_end_to_end(judge_server, tmp_path):
  judged = {'c1': ('consistent', 8), 'c2': ('consistent', 8), 'c3': ('consistent', 3),
            'i1': ('inconsistent', 9), 'i2': ('inconsistent', 5)}
  annotations = write_jsonl(tmp_path / 'kept.jsonl', [
      {'id': k, 'lang': 'en', 'annotation': annotation(k)} for k in ('c3', 'c2', 'i1', 'c1', 'i2')])

  def answer(body, tag):
    relation, intensity = judged[tag]
    return json.dumps({'relation': relation, 'intensity': intensity})
  # i2 keeps answering an intensity of 11 (out of range); c3 times out once.
  plan = Plan(answer, {'i2': ['{"relation": "inconsistent", "intensity": 11}'],
                       'c3': ['slow', 'ok']})
  server = judge_server(plan)
  out = tmp_path / 'test_set'
  summary = build_test_set.main(['--annotations', annotations, '--out', str(out), '--per-class',
                                 '2',
                                 *judge_args(server)])
  assert summary['judge'] == {'done': 4, 'skipped': 0, 'failed': 1}
  assert summary['available'] == {'consistent': 3, 'inconsistent': 1}
  assert summary['shortfall'] == {'consistent': 0, 'inconsistent': 1}
  assert summary['selected'] == {'consistent': 1, 'inconsistent': 1}   # balanced
  rows = read(out / 'test_set.jsonl')
  assert ([(r['id'], r['subset'], r['intensity']) for r in rows]
          == [('c1', 'consistent', 8), ('i1', 'inconsistent', 9)])
  assert rows[0]['annotation'] == annotation('c1')
  (err,) = read(out / 'errors.jsonl')
  assert err['id'] == 'i2'
  assert err['message'] == '$.intensity: Input should be less than or equal to 10 (got 11)'

  plan.plan['i2'] = ['ok']
  n_requests = len(server.requests)
  summary = build_test_set.main(['--annotations', annotations, '--out', str(out), '--per-class',
                                 '2',
                                 *judge_args(server)])
  assert len(server.requests) == n_requests + 1  # only i2 is asked again
  assert summary['selected'] == {'consistent': 2, 'inconsistent': 2}
  # c1 and c2 tie at 8: the id breaks the tie.
  assert [r['id'] for r in read(out / 'test_set.jsonl')] == ['c1', 'c2', 'i1', 'i2']
  summary = build_test_set.main(['--annotations', annotations, '--out', str(out), '--per-class',
                                 '5',
                                 '--no-balance', *judge_args(server)])
  assert summary['selected'] == {'consistent': 3, 'inconsistent': 2}


# ----------------------------------------------------------------------------- make_pairs


def test_make_pairs_judge_end_to_end(judge_server, tmp_path):
  # p1: r0 (8+6)/2=7, r1 9, r2 (2+4)/2=3, r3 5 -> rank r1 r0 r3 r2; p2: all 5 (a tie).
  given = {'p1#0': (8, 6), 'p1#1': (9, 9), 'p1#2': (2, 4), 'p1#3': (5, 5),
           'p2#0': (5, 5), 'p2#1': (4, 6), 'p2#2': (6, 4), 'p2#3': (5, 5)}
  samples = write_jsonl(tmp_path / 'samples.jsonl', [
      {'id': p, 'prompt': 'Analyse the clip.', 'subset': 'inconsistent',
       'responses': [f'[[{p}#{i}]] answer {i}' for i in range(4)]} for p in ('p1', 'p2')])
  annotations = write_jsonl(tmp_path / 'ann.jsonl', [
      {'id': p, 'lang': 'en', 'annotation': annotation(f'gold-{p}')}
      for p in ('p1', 'p2', 'unused')])

  def answer(body, tag):
    lc, ea = given[tag]
    return json.dumps({'logical_consistency': lc, 'evidence_alignment': ea})
  # The grader sees the reference before the response, so key on the response's marker.
  plan = Plan(answer, {'p1#1': ['500', 'ok'], 'p1#2': ['{"logical_consistency": 3}', 'ok'],
                       'p2#3': ['slow', 'ok']})

  def script(body):
    text = user_text(body)
    body = {**body, 'messages': [{'role': 'user', 'content': text.split('Response to grade:')[1]}]}
    return plan(body)
  server = judge_server(script)
  out = tmp_path / 'pairs'
  counts = make_pairs.main(['--samples', samples, '--annotations', annotations, '--out', str(out),
                            *judge_args(server)])
  assert counts['judge'] == {'done': 8, 'skipped': 0, 'failed': 0}
  assert (counts['prompts'], counts['no_pairs'], counts['pairs']) == (2, 1, 4)
  pairs = read(out / 'pairs.jsonl')
  assert [(p['chosen_index'], p['rejected_index'], p['margin']) for p in pairs] == [
      (1, 2, 6.0), (1, 3, 4.0), (0, 2, 4.0), (0, 3, 2.0)]
  first = pairs[0]
  assert first['chosen'] == '[[p1#1]] answer 1' and first['rejected'] == '[[p1#2]] answer 2'
  assert (first['chosen_score'], first['rejected_score']) == (9.0, 3.0)
  assert first['id'] == 'p1' and first['subset'] == 'inconsistent'
  assert first['prompt'] == 'Analyse the clip.'
  # graded against the gold evidence
  assert 'gold-p1' in server.requests[0]['messages'][0]['content']

  n_requests = len(server.requests)
  counts = make_pairs.main(['--samples', samples, '--annotations', annotations, '--out', str(out),
                            '--pairing', 'zipped', *judge_args(server)])
  assert len(server.requests) == n_requests and counts['judge']['skipped'] == 8  # scores reused
  indices = [(p['chosen_index'], p['rejected_index']) for p in read(out / 'pairs.jsonl')]
  assert indices == [(1, 2), (0, 3)]
  counts = make_pairs.main(['--samples', samples, '--annotations', annotations, '--out', str(out),
                            '--min-margin', '3', *judge_args(server)])
  indices = [(p['chosen_index'], p['rejected_index']) for p in read(out / 'pairs.jsonl')]
  assert indices == [(1, 2), (1, 3), (0, 2)]


def test_make_pairs_from_one_sample_per_prompt_refuses_before_any_request(judge_server,
                                                                           tmp_path):
  """k = 1 (or k identical answers): no pair can ever come out; say so, pay nothing."""
  server = judge_server(lambda body: Reply(status=500, error='must not be called'))
  samples = write_jsonl(tmp_path / 'samples.jsonl', [
      {'id': 'p1', 'responses': ['only one']},
      {'id': 'p2', 'responses': ['same', ' same', '']}])
  annotations = write_jsonl(tmp_path / 'ann.jsonl', [
      {'id': p, 'lang': 'en', 'annotation': annotation(p)} for p in ('p1', 'p2')])
  with pytest.raises(SystemExit, match=r'error: saber-make-pairs cannot make any pair from '
                     r'.*samples.jsonl: none of its 2 prompts has two different non-empty '
                     r'responses \(at most 3 per prompt\)'):
    make_pairs.main(['--samples', samples, '--annotations', annotations,
                     '--out', str(tmp_path / 'pairs'), *judge_args(server)])
  assert server.requests == []


def test_make_pairs_incomplete_prompt_waits_for_its_scores(judge_server, tmp_path):
  samples = write_jsonl(tmp_path / 's.jsonl', [{'id': 'p',
                                                'responses': [f'[[p#{i}]] r' for i in range(4)]}])
  annotations = write_jsonl(tmp_path / 'a.jsonl', [{'id': 'p', 'annotation': annotation('p')}])
  plan = Plan(lambda body, tag: json.dumps({'logical_consistency': int(tag[-1]) * 3,
                                            'evidence_alignment': 1}), {'p#2': ['bad_json']})
  server = judge_server(lambda body: plan({**body, 'messages': [
      {'role': 'user', 'content': user_text(body).split('Response to grade:')[1]}]}))
  out = str(tmp_path / 'out')
  # No pair at all: exit 1 naming the counts and why.
  with pytest.raises(SystemExit, match='made no pair .*most frequent reason: prompts waiting '
                                       'for a failed judge call'):
    make_pairs.main(['--samples', samples, '--annotations', annotations, '--out', out,
                     *judge_args(server, retries=0)])
  counts = json.loads(open(os.path.join(out, 'summary.json')).read())
  assert (counts['incomplete'], counts['pairs']) == (1, 0)
  plan.plan['p#2'] = ['ok']
  counts = make_pairs.main(['--samples', samples, '--annotations', annotations, '--out', out,
                            *judge_args(server, retries=0)])
  assert (counts['incomplete'], counts['pairs']) == (0, 4)


def test_make_pairs_never_chooses_a_truncated_response(judge_server, tmp_path):
  # Scores r0 1, r1 2, r2 3, r3 4: r3 is best but was cut at max_new_tokens.
  samples = write_jsonl(tmp_path / 's.jsonl', [{'id': 'p',
                                                'responses': [f'[[p#{i}]] r' for i in range(4)],
                                                'finished': [True, True, True, False]}])
  annotations = write_jsonl(tmp_path / 'a.jsonl', [{'id': 'p', 'annotation': annotation('p')}])
  plan = Plan(lambda body, tag: json.dumps({'logical_consistency': (int(tag[-1]) + 1) * 2,
                                            'evidence_alignment': 0}), {})
  server = judge_server(lambda body: plan({**body, 'messages': [
      {'role': 'user', 'content': user_text(body).split('Response to grade:')[1]}]}))
  out = tmp_path / 'out'
  counts = make_pairs.main(['--samples', samples, '--annotations', annotations, '--out', str(out),
                            *judge_args(server)])
  assert (counts['pairs'], counts['truncated_chosen']) == (2, 2)
  indices = [(p['chosen_index'], p['rejected_index']) for p in read(out / 'pairs.jsonl')]
  assert indices == [(2, 0), (2, 1)]
  bad = write_jsonl(tmp_path / 'bad.jsonl', [{'id': 'p', 'responses': ['a', 'b'],
                                              'finished': [True]}])
  with pytest.raises(ValueError, match="record 1: 'finished' must be a list of booleans"):
    make_pairs.main(['--samples', bad, '--annotations', annotations, '--out', str(out),
                     *judge_args(server)])


def test_make_pairs_trims_leading_space_and_skips_empty_responses_before_judging(judge_server,
                                                                                 tmp_path):
  # r1 is empty (never judged), r0 and r3 start with whitespace (judged and paired trimmed).
  samples = write_jsonl(tmp_path / 's.jsonl', [{'id': 'p', 'responses': [
      ' [[p#0]] r', ' \n', '[[p#2]] r', '\t[[p#3]] r']}])
  annotations = write_jsonl(tmp_path / 'a.jsonl', [{'id': 'p', 'annotation': annotation('p')}])
  plan = Plan(lambda body, tag: json.dumps({'logical_consistency': int(tag[-1]) * 3,
                                            'evidence_alignment': 0}), {})
  server = judge_server(lambda body: plan({**body, 'messages': [
      {'role': 'user', 'content': user_text(body).split('Response to grade:')[1]}]}))
  out = tmp_path / 'out'
  counts = make_pairs.main(['--samples', samples, '--annotations', annotations, '--out', str(out),
                            '--pairing', 'zipped', *judge_args(server)])
  assert (counts['trimmed'], counts['empty'], counts['judge']['done']) == (2, 1, 3)
  assert all(user_text(r).split('Response to grade:\n')[1].startswith('[[')
             for r in server.requests)
  (pair,) = read(out / 'pairs.jsonl')   # r3 (9) over r0 (0); r2 is both second and second-worst
  assert (pair['chosen'], pair['rejected']) == ('[[p#3]] r', '[[p#0]] r')
  assert (pair['chosen_index'], pair['rejected_index']) == (3, 0)


def _fields(a):
  return {'video_desc': a['video_desc'], 'facial_exp_desc': a['facial_exp_desc'],
          'body_lang_desc': a['body_lang_desc'],
          'speech_content': a['audio_desc']['speech_content'],
          'acoustic_feat': a['audio_desc']['acoustic_feat'],
          'sentiment_analysis': a['sentiment_analysis']}


def _with(annotation, **changes):
  out = json.loads(json.dumps(annotation))
  for field, value in changes.items():
    if field in ('speech_content', 'acoustic_feat'):
      out['audio_desc'][field] = value
    else:
      out[field] = value
  return out


def test_make_pairs_perturb(tmp_path):
  records = [{'id': f'e{i}', 'lang': 'en', 'subset': 'consistent',
              'annotation': annotation(f'e{i}', speech=f'line number {i}')} for i in range(3)]
  records.append({'id': 'z', 'lang': 'zh', 'annotation': ZH_ANNOTATION})
  records[2]['annotation']['sentiment_analysis'] = 'Matter-of-fact throughout.'  # no polarity word
  path = write_jsonl(tmp_path / 'ann.jsonl', records)
  gold = {r['id']: r['annotation'] for r in records}
  lang = {r['id']: r['lang'] for r in records}
  out1, out2, out3 = (str(tmp_path / d) for d in ('a', 'b', 'c'))
  counts = make_pairs.main(['--strategy', 'perturb', '--annotations', path, '--out', out1,
                            '--seed', '3'])
  assert counts['records'] == 4 and counts['pairs'] == 12
  make_pairs.main(['--strategy', 'perturb', '--annotations', path, '--out', out2, '--seed', '3'])
  make_pairs.main(['--strategy', 'perturb', '--annotations', path, '--out', out3, '--seed', '4'])
  text1 = open(os.path.join(out1, 'pairs.jsonl')).read()
  assert text1 == open(os.path.join(out2, 'pairs.jsonl')).read()       # same seed, same pairs
  assert text1 != open(os.path.join(out3, 'pairs.jsonl')).read()

  pairs = read(os.path.join(out1, 'pairs.jsonl'))
  # The chosen text is the SED target, written out here by hand for e0.
  e0 = gold['e0']
  assert pairs[0]['chosen'] == (
      'Visual evidence:\n'
      f"- Scene: {e0['video_desc']}\n- Facial expression: {e0['facial_exp_desc']}\n"
      f"- Body language: {e0['body_lang_desc']}\n\n"
      'Acoustic evidence:\n'
      "- Speech content: line number 0\n- Acoustic features: "
      f"{e0['audio_desc']['acoustic_feat']}\n\n"
      f"Holistic reasoning:\n{e0['sentiment_analysis']}")
  kinds = collections.Counter(p['perturbation'].split(':')[0] for p in pairs)
  assert kinds == {'swap': 4, 'drop': 4, 'contradict': 4}
  for p in pairs:
    g, rid, kind = gold[p['id']], p['id'], p['perturbation']
    assert p['chosen'] == make_pairs.render_answer(g, lang[rid])
    assert p['chosen_score'] is None and p['margin'] is None and p['rejected'] != p['chosen']
    if kind.startswith('swap:'):
      field = kind.split('.')[-1].split(':')[-1]
      donor = gold[p['donor_id']]
      assert p['donor_id'] != rid
      if rid != 'z':  # the only Chinese record has no same-language donor
        assert p['donor_id'].startswith('e')
      assert p['rejected'] == make_pairs.render_answer(_with(g, **{field: _fields(donor)[field]}),
                                                       lang[rid])
    elif kind.startswith('drop:'):
      fields = {'visual': ('video_desc', 'facial_exp_desc', 'body_lang_desc'),
                'acoustic': ('speech_content', 'acoustic_feat')}[kind[5:]]
      assert p['rejected'] == make_pairs.render_answer(_with(g, **{f: '' for f in fields}),
                                                       lang[rid])
      if kind == 'drop:acoustic' and rid == 'e0':  # the section keeps only its header
        assert 'Acoustic evidence:\n\nHolistic reasoning:' in p['rejected']
    else:
      expected = {
          'e0': ('contradict:flip', 'The overall sentiment is negative: the tone conflicts with '
                                    'the smile.'),
          'e1': ('contradict:flip', 'The overall sentiment is negative: the tone conflicts with '
                                    'the smile.'),
          'z': ('contradict:flip', '整体情绪负面偏好奇，语气与表情矛盾。'),
          'e2': ('contradict:donor', gold[p['donor_id'] or 'e0']['sentiment_analysis']),
      }[rid]
      assert kind == expected[0]
      assert p['rejected'] == make_pairs.render_answer(_with(g, sentiment_analysis=expected[1]),
                                                       lang[rid])
  assert make_pairs.flip_polarity('Not inconsistent; Positive.') == ('Not consistent; Negative.', 2)
  assert make_pairs.flip_polarity('语气与表情不一致') == ('语气与表情一致', 1)


# ----------------------------------------------------------------------------- evaluate


def _saber_refs(tmp_path):
  refs = [{'id': f'c{i}', 'subset': 'consistent',
           'annotation': annotation(f'ref-c{i}')} for i in range(2)]
  refs += [{'id': f'i{i}', 'subset': 'inconsistent',
            'annotation': annotation(f'ref-i{i}')} for i in range(2)]
  return write_jsonl(tmp_path / 'refs.jsonl', refs)


SABER_SCORES = {'c0': [3, 3, 2, 2, 1, 3], 'c1': [2, 3, 2, 1, 1, 2],
                'i0': [1, 3, 1, 0, 1, 0], 'i1': [2, 2, 1, 1, 1, 1]}


def _saber_answer(body, tag):
  return json.dumps(dict(zip(('VD', 'SCD', 'AFD', 'FE', 'BL', 'CR'), SABER_SCORES[tag])))


def _prediction_marker_script(plan):
  # The prompt holds the reference first; key on the prediction's marker.
  def script(body):
    text = user_text(body).split('Prediction:')[-1]
    return plan({**body, 'messages': [{'role': 'user', 'content': text}]})
  return script


def test_evaluate_saber_test_end_to_end(judge_server, tmp_path):
  refs = _saber_refs(tmp_path)
  preds = write_jsonl(tmp_path / 'preds.jsonl', [{'id': k, 'response': f'[[{k}]] prediction'}
                                                 for k in ('c0', 'c1', 'i0', 'i1', 'stray')])
  extra_key = json.dumps({**dict(zip(('VD', 'SCD', 'AFD', 'FE', 'BL', 'CR'), [3] * 6)),
                          'overall': 3})
  plan = Plan(_saber_answer, {'c1': [extra_key, 'ok'], 'i0': ['429', 'ok'], 'i1': ['slow', 'ok']})
  server = judge_server(_prediction_marker_script(plan))
  out = tmp_path / 'eval'
  s = evaluate.main(['saber-test', '--predictions', preds, '--references', refs, '--out', str(out),
                     *judge_args(server)])
  # Hand-computed as in test_metrics: consistent VD 2.5 ... CR 2.5; inconsistent VD 1.5 ...
  assert s['n'] == {'consistent': 2, 'inconsistent': 2} and s['missing'] == 0
  assert s['consistent'] == pytest.approx({'VD': 2.5, 'SCD': 3.0, 'AFD': 2.0, 'FE': 1.5, 'BL': 1.0,
                                           'CR': 2.5})
  assert s['inconsistent'] == pytest.approx({'VD': 1.5, 'SCD': 2.5, 'AFD': 1.0, 'FE': 0.5,
                                             'BL': 1.0, 'CR': 0.5})
  assert s['drop'] == pytest.approx({'VD': 1.0, 'SCD': 0.5, 'AFD': 1.0, 'FE': 1.0, 'BL': 0.0,
                                     'CR': 2.0})
  assert s['run'] == {'done': 4, 'skipped': 0, 'failed': 1}
  assert plan.seen['c1'] == 2  # the extra key was rejected and re-asked
  (err,) = read(out / 'errors.jsonl')
  assert err['id'] == 'stray' and err['kind'] == 'bad_input'
  assert json.loads((out / 'summary.json').read_text())['drop']['CR'] == pytest.approx(2.0)
  report = (out / 'report.md').read_text()
  assert '| drop | 1.00 | 0.50 | 1.00 | 1.00 | 0.00 | 2.00 |' in report
  assert (out / 'saber_test.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  judgments = {r['id']: r for r in read(out / 'judgments.jsonl')}
  assert judgments['c0']['raw'] == _saber_answer(None, 'c0')
  assert judgments['c0']['subset'] == 'consistent'


def test_evaluate_interrupted_with_sigkill_then_resumed(judge_server, tmp_path):
  refs = [{'id': f'k{i:02d}', 'subset': ('consistent', 'inconsistent')[i % 2],
           'annotation': annotation(f'k{i}')}
          for i in range(12)]
  ref_path = write_jsonl(tmp_path / 'refs.jsonl', refs)
  preds = write_jsonl(tmp_path / 'preds.jsonl',
                      [{'id': r['id'], 'response': f"[[{r['id']}]] p"} for r in refs])
  dims = ('VD', 'SCD', 'AFD', 'FE', 'BL', 'CR')
  server = judge_server(lambda body: Reply(json.dumps({d: 2 for d in dims}),
                                           delay=0.15))
  out = tmp_path / 'eval'
  argv = ['saber-test', '--predictions', preds, '--references', ref_path, '--out', str(out),
          *judge_args(server, timeout=5.0, concurrency=2)]
  proc = subprocess.Popen([sys.executable, '-m', 'saber_jax.cli.evaluate', *argv], cwd=str(ROOT),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  judged = out / 'judgments.jsonl'
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline:
    if judged.exists() and judged.read_bytes().count(b'\n') >= 3:
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=10)
  assert proc.returncode == -signal.SIGKILL
  before = [r['id'] for r in read(judged)]
  assert 3 <= len(before) < 12
  s = evaluate.main(argv)
  assert s['run']['skipped'] == len(before) and s['run']['done'] == 12 - len(before)
  ids = [r['id'] for r in read(judged)]
  assert len(ids) == len(set(ids)) == 12 and ids[:len(before)] == before
  assert s['n'] == {'consistent': 6, 'inconsistent': 6} and s['consistent']['VD'] == 2.0


def test_evaluate_emer_end_to_end(judge_server, tmp_path):
  refs = write_jsonl(tmp_path / 'refs.jsonl', [{'id': 'a', 'reference': '[[ra]] 他很焦虑'},
                                               {'id': 'b', 'reference': '[[rb]] 她很开心'}])
  preds = write_jsonl(tmp_path / 'preds.jsonl', [{'id': 'a', 'response': '[[pa]] 他有些紧张'},
                                                 {'id': 'b', 'response': '[[pb]] 她很平静'}])
  clue = {'a': 8, 'b': 3}
  label = {'a': 6.5, 'b': 2}
  emotions = {'ra': ['焦虑'], 'pa': ['紧张', '焦虑'], 'rb': ['开心'], 'pb': ['平静']}
  bad_once = {'clue-b'}

  def script(body):
    text = user_text(body)
    if '"clue_overlap"' in text:
      item = 'a' if '[[ra]]' in text else 'b'
      if f'clue-{item}' in bad_once:
        bad_once.discard(f'clue-{item}')
        return '{"clue_overlap": 12}'   # out of range: re-asked
      return json.dumps({'clue_overlap': clue[item]})
    if '"emotions"' in text:
      return json.dumps({'emotions': emotions[marker_of(text.split('描述：')[-1])]},
                        ensure_ascii=False)
    item = 'a' if '焦虑' in text.split('真实情绪：')[-1].split('\n')[0] else 'b'
    return f'```json\n{json.dumps({"label_overlap": label[item]})}\n```'
  server = judge_server(script)
  out = tmp_path / 'emer'
  s = evaluate.main(['emer', '--predictions', preds, '--references', refs, '--out', str(out),
                     *judge_args(server)])
  assert s['clue_overlap'] == pytest.approx((8 + 3) / 2)
  assert s['label_overlap'] == pytest.approx((6.5 + 2) / 2)
  assert s['n'] == 2 and s['missing'] == 0 and s['run']['failed'] == 0
  rows = {r['id']: r for r in read(out / 'judgments.jsonl')}
  assert rows['a']['predicted_emotions'] == ['紧张', '焦虑']
  assert rows['a']['raw']['label'].startswith('```json')           # raw judge text kept
  label_request = next(b for b in server.requests if '"label_overlap"' in user_text(b)
                       and '紧张、焦虑' in user_text(b))
  assert '真实情绪：焦虑' in user_text(label_request)
  assert (out / 'emer.png').exists() and 'Clue Overlap' in (out / 'report.md').read_text()


def test_evaluate_emobench(tmp_path):
  preds = write_jsonl(tmp_path / 'preds.jsonl', [
      {'id': 1, 'task': 'MOSI', 'label': 'positive', 'response': "{'emotion': 'positive'}"},
      {'id': 2, 'task': 'MOSI', 'label': 'negative', 'response': 'The sentiment is negative.'},
      {'id': 3, 'task': 'MOSI', 'label': 'neutral', 'response': 'I cannot tell.'},
      {'id': 4, 'task': 'MELD', 'label': 'joy', 'response': '{"emotion": "joy"}'},
      {'id': 5, 'task': 'MELD', 'label': 'anger', 'response': "{'emotion': 'fear'}"},
      {'id': 6, 'task': 'MUSTARD', 'label': 'true', 'response': "{'emotion': 'True'}"},
  ])
  out = tmp_path / 'emobench'
  s = evaluate.main(['emobench', '--predictions', preds, '--out', str(out)])
  assert s['tasks'] == pytest.approx({'MELD': 0.5, 'MOSI': 2 / 3, 'MUSTARD': 1.0})
  assert s['average'] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
  assert s['categories'] == pytest.approx({'CEU': 0.5, 'FER': 2 / 3, 'SCEA': 1.0})
  assert s['invalid_rate'] == pytest.approx(1 / 6)
  parsed = {r['id']: r for r in read(out / 'parsed.jsonl')}
  assert (parsed['3']['parsed'] is None and parsed['5']['parsed'] == 'fear'
          and not parsed['5']['correct'])
  assert json.loads((out / 'summary.json').read_text())['invalid_rate'] == pytest.approx(1 / 6)
  assert (out / 'emobench_tasks.png').exists() and (out / 'emobench_categories.png').exists()
  bad = write_jsonl(tmp_path / 'bad.jsonl', [{'id': 'x', 'task': 'MOSI', 'response': 'positive'}])
  with pytest.raises(ValueError, match=r"bad.jsonl: record 'x': 'label' must be a string"):
    evaluate.main(['emobench', '--predictions', bad, '--out', str(out)])


@pytest.mark.parametrize('tool', ['annotate', 'quality', 'build_test_set', 'make_pairs',
                                  'evaluate'])
def test_help_runs_as_a_script(tool):
  result = subprocess.run([sys.executable, '-m', f'saber_jax.cli.{tool}', '--help'], cwd='/',
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0 and 'usage:' in result.stdout


# ----------------------------------------------------------------------------- failure behaviour


def _saber_inputs(tmp_path, responses=('c0', 'c1', 'i0', 'i1')):
  preds = write_jsonl(tmp_path / 'preds.jsonl', [{'id': k, 'response': f'[[{k}]] prediction'}
                                                 for k in responses])
  return ['saber-test', '--predictions', preds, '--references', _saber_refs(tmp_path)]


def test_rerun_with_another_judge_or_predictions_is_refused_until_overwrite(
    judge_server, tmp_path, capsys):
  server = judge_server(_prediction_marker_script(Plan(_saber_answer, {})))
  argv = [*_saber_inputs(tmp_path), '--out', str(tmp_path / 'eval'), *judge_args(server)]
  assert evaluate.main(argv)['run']['done'] == 4
  other_judge = [a if a != 'test-judge' else 'another-judge' for a in argv]
  with pytest.raises(SystemExit, match=r'(?s)judge.model: "test-judge" -> "another-judge".*'
                                       r'--overwrite'):
    evaluate.main(other_judge)
  with open(argv[2], 'a') as f:                      # the predictions file changed
    f.write(json.dumps({'id': 'c9', 'response': '[[c0]] more'}) + '\n')
  with pytest.raises(SystemExit, match=r'input.size: \d+ -> \d+'):
    evaluate.main(argv)
  requests = len(server.requests)
  s = evaluate.main(other_judge + ['--overwrite'])
  assert s['run'] == {'done': 4, 'skipped': 0, 'failed': 1}    # c9 has no reference
  assert s['judge_model'] == 'another-judge' and len(server.requests) == requests + 4


def test_every_item_failing_exits_nonzero_naming_the_url(tmp_path):
  import socket
  with socket.socket() as s:        # a port nobody listens on: connections are refused
    s.bind(('127.0.0.1', 0))
    url = f'http://127.0.0.1:{s.getsockname()[1]}/v1'
  out = tmp_path / 'eval'
  argv = [*_saber_inputs(tmp_path), '--out', str(out), '--base-url', url, '--model', 'm',
          '--max-retries', '0', '--timeout', '2']
  result = subprocess.run([sys.executable, '-m', 'saber_jax.cli.evaluate', *argv],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert f'every item failed (4); the reasons are in {out / "errors.jsonl"}' in result.stderr
  errors = read(out / 'errors.jsonl')
  assert len(errors) == 4 and all(e['kind'] == 'connection' for e in errors)
  assert all(f'(calling {url})' in e['message'] for e in errors)


def test_api_key_echoed_by_the_server_is_redacted(judge_server, tmp_path, monkeypatch):
  key = 'sk-test-0123456789abcdef'
  monkeypatch.setenv('OPENAI_API_KEY', key)
  server = judge_server(lambda body: Reply(status=401, error=f'invalid key {key} '
                                                             f'(Authorization: Bearer {key})'))
  out = tmp_path / 'eval'
  with pytest.raises(SystemExit, match='every item failed'):
    evaluate.main([*_saber_inputs(tmp_path), '--out', str(out), *judge_args(server)])
  text = (out / 'errors.jsonl').read_text()
  assert key not in text and 'invalid key <redacted>' in text and 'http_error' in text


def test_duplicate_input_id_is_refused_before_any_request(judge_server, tmp_path):
  server = judge_server(_prediction_marker_script(Plan(_saber_answer, {})))
  inputs = _saber_inputs(tmp_path, responses=('c0', 'c1', 'i0', 'c1'))
  with pytest.raises(SystemExit, match=r"preds.jsonl: duplicate id 'c1' \(records 2 and 4\)"):
    evaluate.main([*inputs, '--out', str(tmp_path / 'eval'), *judge_args(server)])
  assert server.requests == [] and not (tmp_path / 'eval' / 'judgments.jsonl').exists()


@pytest.mark.parametrize('flag, value, message', [('--max-retries', '-1', 'must be >= 0, got -1'),
                                                  ('--num-shards', '0', 'must be >= 1, got 0'),
                                                  ('--concurrency', 'x', "expected int, got 'x'"),
                                                  ('--temperature', '-0.5',
                                                   'must be >= 0.0, got -0.5'),
                                                  ('--temperature', '7',
                                                   'must be in [0.0, 2.0], got 7'),
                                                  ('--max-tokens', '0', 'must be >= 1, got 0')])
def test_nonsense_run_arguments_are_usage_errors(tmp_path, capsys, flag, value, message):
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main([*_saber_inputs(tmp_path), '--out', str(tmp_path / 'eval'), '--model', 'm',
                   flag, value])
  assert exit_info.value.code == 2
  assert f'argument {flag}: {message}' in capsys.readouterr().err


def test_id_readers_refuse_duplicate_ids_before_any_work(tmp_path, capsys):
  """Pairs from annotations, preference records from pairs and SFT records: an id twice
  is refused naming it and both records before anything is written (the judged tools
  refuse theirs in run_judged: test_judge)."""
  records = [{'id': f'e{i}', 'lang': 'en', 'annotation': annotation(f'e{i}')} for i in range(3)]
  path = write_jsonl(tmp_path / 'ann.jsonl', records + [dict(records[1], lang='fr')])
  with pytest.raises(SystemExit, match=r"ann.jsonl: duplicate id 'e1' \(records 2 and 4\)"):
    make_pairs.main(['--strategy', 'perturb', '--annotations', path, '--out',
                     str(tmp_path / 'pairs')])
  assert not os.path.exists(tmp_path / 'pairs' / 'pairs.jsonl')


@pytest.mark.parametrize('tool, args, message', [
    ('make_pairs', ['--annotations', 'a', '--out', 'o', '--min-margin', '-1'],
     'argument --min-margin: must be >= 0.0, got -1'),
    ('preprocess', ['--manifest', 'm', '--annotations', 'a', '--out', 'o', '--workers', '0'],
     'argument --workers: must be >= 1, got 0'),
    ('preprocess', ['--manifest', 'm', '--annotations', 'a', '--out', 'o', '--max-seconds', '0.2'],
     'argument --max-seconds: must be > --min-seconds (0.5), got 0.2'),
    ('annotate', ['--manifest', 'm', '--out', 'o', '--model', 'j', '--num-frames', '0'],
     'argument --num-frames: must be >= 1, got 0'),
    ('annotate', ['--manifest', 'm', '--out', 'o', '--model', 'j', '--sample-rate', '16'],
     'argument --sample-rate: must be >= 8000, got 16'),
    ('build_test_set', ['--annotations', 'a', '--out', 'o', '--model', 'j', '--per-class', '0'],
     'argument --per-class: must be >= 1, got 0'),
    ('quality', ['--annotations', 'a', '--out', 'o', '--model', 'j', '--wer-threshold', '-0.1'],
     'argument --wer-threshold: must be >= 0.0, got -0.1'),
    ('make_demo_data', ['o', '--n', '0'], 'argument --n: must be >= 1, got 0'),
    ('sample', ['--records', 'r', '--out', 'o', '--model', 'm', '--max-tokens', '8',
                '--top-p', '0'], 'argument --top-p: must be in (0.0, 1.0], got 0'),
    ('convert_hf', ['to-hf', '--params', 'p', '--out', 'o', '--max-shard-gb', '0'],
     'argument --max-shard-gb: must be > 0, got 0'),
])
def test_every_tool_refuses_out_of_range_arguments_as_usage_errors(tool, args, message, capsys):
  import importlib
  module = importlib.import_module(f'saber_jax.cli.{tool}')
  with pytest.raises(SystemExit) as exit_info:
    module.main(args)
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err
