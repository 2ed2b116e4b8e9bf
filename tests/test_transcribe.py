"""saber-transcribe on real clips with a tiny random CTC model: the transcripts are what
transformers' ASR pipeline gives each clip alone, batched runs resume, refuse other
models, shard and report bad clips; saber-quality reads them as they are and refuses to
run without transcripts."""

import json
import os

import pytest

from asr_helpers import save_tiny_ctc
from saber_jax import files
from saber_jax.cli import make_demo_data, quality, transcribe
from saber_jax.data import media

pytest.importorskip('torch')


def read(path):
  return list(files.read_jsonl(str(path)))


@pytest.fixture(scope='module')
def clips(tmp_path_factory):
  """Five demo clips (one a silent mp4 + wav, en and zh) plus one whose file is missing;
  returns (manifest, annotations, model dir, other model dir)."""
  root = tmp_path_factory.mktemp('asr')
  manifest, annotations = make_demo_data.make_demo_data(str(root / 'data'), n=5, seed=0)
  with open(manifest, 'a') as f:
    f.write(json.dumps({'id': 'gone', 'video': 'media/gone.mp4', 'lang': 'en'}) + '\n')
  return (manifest, annotations, save_tiny_ctc(str(root / 'ctc'), seed=0),
          save_tiny_ctc(str(root / 'ctc2'), seed=1))


def test_transcripts_equal_the_pipeline_per_clip_and_runs_resume(clips, tmp_path, capsys):
  import transformers
  manifest, _, model, other = clips
  out = tmp_path / 'asr'
  args = ['--manifest', manifest, '--out', str(out), '--model', model, '--batch-size', '3']
  run = transcribe.main(args)
  assert (run.done, run.failed) == (5, 1)
  (error,) = read(out / 'errors.jsonl')
  assert error['id'] == 'gone' and 'gone.mp4' in error['message']
  got = {r['id']: r for r in read(out / 'transcripts.jsonl')}
  asr = transformers.pipeline('automatic-speech-recognition', model=model, device='cpu')
  base = os.path.dirname(manifest)
  for clip in read(manifest)[:5]:
    waveform = media.load_audio(os.path.join(base, clip.get('audio') or clip['video']))
    expected = asr({'raw': waveform, 'sampling_rate': 16000})['text'].strip()
    assert got[clip['id']] == {'id': clip['id'], 'lang': clip['lang'], 'transcript': expected}
  assert any(r['transcript'] for r in got.values())   # a random model says something

  run = transcribe.main(args + ['--batch-size', '2'])     # batch size is not in the output
  assert (run.done, run.skipped, run.failed) == (0, 5, 1)
  with pytest.raises(SystemExit, match='asr.model'):
    transcribe.main(['--manifest', manifest, '--out', str(out), '--model', other])
  # Old underscore spellings still work, with a note.
  shard = tmp_path / 'shard'
  run = transcribe.main(['--manifest', manifest, '--out', str(shard), '--model', model,
                         '--num_shards', '2', '--shard_index', '1'])
  assert '--num_shards is deprecated, spell it --num-shards' in capsys.readouterr().err
  ids = sorted(r['id'] for r in read(shard / 'transcripts.jsonl'))
  assert ids == [c['id'] for c in read(manifest)[1::2] if c['id'] != 'gone']


def test_quality_reads_the_transcripts_as_they_are(clips, tmp_path):
  manifest, annotations, model, _ = clips
  out = tmp_path / 'asr'
  transcribe.main(['--manifest', manifest, '--out', str(out), '--model', model])
  transcripts = {r['id']: r['transcript'] for r in read(out / 'transcripts.jsonl')}
  # Annotations whose speech content is the transcript (two clips) or another text.
  rows = read(annotations)
  for k, r in enumerate(rows):
    r['annotation']['audio_desc']['speech_content'] = (
        transcripts[r['id']] if k < 2 else 'something else entirely was said here')
  edited = tmp_path / 'ann.jsonl'
  edited.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows))
  counts = quality.main(['--annotations', str(edited), '--transcripts',
                         str(out / 'transcripts.jsonl'), '--out', str(tmp_path / 'qc')])
  assert counts['kept'] == 2 and counts['reasons'] == {'wer': len(rows) - 2}
  assert [r['id'] for r in read(tmp_path / 'qc' / 'kept.jsonl')] == [r['id'] for r in rows[:2]]
  assert all(r['qc']['wer'] == 0.0 for r in read(tmp_path / 'qc' / 'kept.jsonl'))

  # Nothing kept: exit 1 naming the counts and the reason.
  for r in rows:
    r['annotation']['audio_desc']['speech_content'] = 'something else entirely was said here'
  edited.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows))
  with pytest.raises(SystemExit, match=r'kept no clip \(dropped 5.*most frequent reason: wer'):
    quality.main(['--annotations', str(edited), '--transcripts', str(out / 'transcripts.jsonl'),
                  '--out', str(tmp_path / 'qc0')])
  summary = json.loads((tmp_path / 'qc0' / 'summary.json').read_text())
  assert (summary['kept'], summary['dropped']) == (0, 5)


def test_quality_without_transcripts_is_a_usage_error_naming_saber_transcribe(clips, tmp_path,
                                                                             capsys):
  _, annotations, _, _ = clips
  with pytest.raises(SystemExit) as e:
    quality.main(['--annotations', annotations, '--out', str(tmp_path / 'qc')])
  assert e.value.code == 2
  assert 'saber-transcribe' in capsys.readouterr().err
  assert not (tmp_path / 'qc').exists()


def test_batcher_groups_waiting_clips_by_language_and_isolates_a_failing_one():
  import concurrent.futures
  calls = []

  def run(waveforms, lang):
    calls.append((lang, list(waveforms)))
    if 'bad' in waveforms:
      raise RuntimeError('cannot transcribe')
    return [f'{lang}:{w}' for w in waveforms]

  batcher = transcribe.Batcher(run, batch_size=4, linger=5.0)  # all four in one batch
  jobs = [('a', 'en'), ('b', 'zh'), ('bad', 'en'), ('c', 'en')]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    futures = [pool.submit(batcher.transcribe, w, lang) for w, lang in jobs]
    results = [f.exception() or f.result() for f in futures]
  batcher.close()
  assert results[0] == 'en:a' and results[1] == 'zh:b' and results[3] == 'en:c'
  assert isinstance(results[2], RuntimeError)
  # One batch of four, split by language; the failing English group retried clip by clip.
  assert sorted((lang, tuple(w)) for lang, w in calls) == [
      ('en', ('a',)), ('en', ('a', 'bad', 'c')), ('en', ('bad',)), ('en', ('c',)), ('zh', ('b',))]


def test_whisper_runs_batched_in_each_clips_language(clips, tmp_path):
  import transformers
  from asr_helpers import save_tiny_whisper
  manifest, _, _, _ = clips
  model = save_tiny_whisper(str(tmp_path / 'whisper'))
  out = tmp_path / 'asr'
  run = transcribe.main(['--manifest', manifest, '--out', str(out), '--model', model,
                         '--batch-size', '4'])
  assert (run.done, run.failed) == (5, 1)
  got = {r['id']: r['transcript'] for r in read(out / 'transcripts.jsonl')}
  asr = transformers.pipeline('automatic-speech-recognition', model=model, device='cpu')
  base = os.path.dirname(manifest)
  for clip in read(manifest)[:5]:
    waveform = media.load_audio(os.path.join(base, clip.get('audio') or clip['video']))
    alone = asr({'raw': waveform, 'sampling_rate': 16000},
                generate_kwargs={'task': 'transcribe', 'language': clip['lang']})
    assert got[clip['id']] == alone['text'].strip()
  run = transcribe.main(['--manifest', manifest, '--out', str(tmp_path / 'auto'), '--model', model,
                         '--language', 'auto'])
  assert run.done == 5
