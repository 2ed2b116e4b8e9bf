"""saber-preprocess on real media: every good clip becomes a record, every bad clip or
annotation line a reject with its reason, counts add up, re-runs and shards never
duplicate; saber-make-demo-data is deterministic."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import av
import numpy as np
import psutil
import pytest

import processes
from media_helpers import sine, write_audio, write_video
from saber_jax.data import annotation, media, prompt, records, sed

ROOT = pathlib.Path(__file__).resolve().parents[1]
from saber_jax.cli import make_demo_data, preprocess  # noqa: E402

GOOD = ['demo-0000', 'demo-0001', 'demo-0002', 'demo-0003']
EXPECTED_REJECTS = {
    'demo-0004': 'bad_annotation', 'demo-0005': 'no_annotation',
    'bad-corrupt': 'unreadable_media', 'bad-empty-wav': 'unreadable_media',
    'bad-long': 'too_long', 'bad-lowres': 'low_resolution', 'bad-missing': 'missing_file',
    'bad-silent': 'no_audio', 'bad-lang': 'bad_manifest',
    'demo-0001': 'duplicate_clip', 'ghost': 'annotation_without_clip',
    'bad-truncated': 'unreadable_media', 'bad-short-audio': 'av_mismatch',
    'bad-long-audio': 'too_long',
}
# Lines without a readable id: broken JSON and a non-UTF-8 byte in the manifest, a
# non-UTF-8 byte in the annotations.
UNNAMED_REJECTS = [(None, 'bad_manifest'), (None, 'bad_manifest'), (None, 'bad_annotation')]


def write_truncated_mp4(path, frames, fps):
  """An mp4 whose index (moov, written first) claims every frame, cut after the middle
  frame's packet: it opens and probes fine but decodes half the frames its header says."""
  with av.open(str(path), 'w', options={'movflags': 'faststart'}) as container:
    stream = container.add_stream('libx264', rate=fps)
    stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], 'yuv420p'
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')))
    container.mux(stream.encode(None))
  with av.open(str(path)) as container:
    packets = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
  position, size = packets[len(packets) // 2]
  path.write_bytes(path.read_bytes()[:position + size])


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  """Six demo clips plus every kind of bad input; returns (manifest, annotations)."""
  root = tmp_path_factory.mktemp('clips')
  manifest, labels = make_demo_data.make_demo_data(str(root), n=6, seed=0)
  clips = [json.loads(line) for line in open(manifest)]
  anns = {json.loads(line)['id']: json.loads(line) for line in open(labels)}
  spare = anns['demo-0000']['annotation']

  rng = np.random.default_rng(0)
  frames = lambda n, h, w: np.stack([make_demo_data.draw_frame('happy', (90, 90, 200), k / 10)
                                     for k in range(n)])[:, :h, :w]
  (root / 'media' / 'corrupt.mp4').write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
  (root / 'media' / 'empty.wav').write_bytes(b'')
  make_demo_data.write_mp4(str(root / 'media' / 'silent.mp4'), frames(20, 128, 160), None)
  write_video(root / 'media' / 'long.mp4', frames(40, 128, 160), fps=1,
              audio=sine(220, 40, 16000), audio_rate=16000)
  write_truncated_mp4(root / 'media' / 'truncated.mp4', frames(30, 128, 160), fps=10)
  for name, seconds in (('3s', 3.0), ('short', 0.6), ('long', 35.0)):
    write_audio(root / 'media' / f'{name}.wav', sine(220, seconds, 16000), 16000)
  small = frames(10, 48, 64)
  write_video(root / 'media' / 'lowres.mp4', small, fps=10, audio=sine(220, 1, 16000),
              audio_rate=16000)
  bad = [('bad-corrupt', {'video': 'media/corrupt.mp4'}),
         ('bad-empty-wav', {'video': 'media/silent.mp4', 'audio': 'media/empty.wav'}),
         ('bad-long', {'video': str(root / 'media' / 'long.mp4')}),   # an absolute path
         ('bad-lowres', {'video': 'media/lowres.mp4'}),
         ('bad-missing', {'video': 'media/nowhere.mp4'}),
         ('bad-silent', {'video': 'media/silent.mp4'}),
         ('bad-truncated', {'video': 'media/truncated.mp4', 'audio': 'media/3s.wav'}),
         ('bad-short-audio', {'video': 'media/silent.mp4', 'audio': 'media/short.wav'}),
         ('bad-long-audio', {'video': 'media/silent.mp4', 'audio': 'media/long.wav'})]
  clips += [{'id': clip_id, 'lang': 'en', **paths} for clip_id, paths in bad]
  clips += [{'id': 'bad-lang', 'video': 'media/silent.mp4', 'lang': 'fr'},
            {'id': 'demo-0001', 'video': 'media/silent.mp4', 'lang': 'en'}]   # a duplicate id
  for clip_id, _ in bad:
    anns[clip_id] = {'id': clip_id, 'annotation': spare}
  del anns['demo-0004']['annotation']['sentiment_analysis']
  del anns['demo-0005']
  anns['ghost'] = {'id': 'ghost', 'annotation': spare}
  with open(manifest, 'w') as f:
    f.writelines(json.dumps(c) + '\n' for c in clips)
    f.write('{"id": broken json\n\n')
  with open(manifest, 'ab') as f:
    f.write(b'{"id": "bad-\xff", "lang": "en", "video": "media/silent.mp4"}\n')
  with open(labels, 'w') as f:
    f.writelines(json.dumps(a, ensure_ascii=False) + '\n' for a in anns.values())
  with open(labels, 'ab') as f:
    f.write(b'{"id": "x", "annotation": "\xfe"}\n')
  return manifest, labels


def _run(dataset, out, *extra):
  manifest, labels = dataset
  return preprocess.main(['--manifest', manifest, '--annotations', labels, '--out', str(out),
                          '--quiet', *extra])


def _rejects(out):
  return [json.loads(line) for line in open(os.path.join(out, 'rejects.jsonl'))]


def _record_ids(out):
  return [r['id'] for r in records.iter_records(records.shard_paths(os.path.join(out, 'sft')))]


def test_every_clip_is_a_record_or_a_reject_with_its_reason(dataset, tmp_path):
  stats = _run(dataset, tmp_path)
  assert sorted(_record_ids(tmp_path)) == GOOD
  rejects = _rejects(tmp_path)
  assert sorted(((r['id'], r['reason']) for r in rejects), key=str) == sorted(
      [*EXPECTED_REJECTS.items(), *UNNAMED_REJECTS], key=str)
  assert all(r['message'] for r in rejects)
  by_id = {r['id']: r['message'] for r in rejects}
  assert "field 'sentiment_analysis'" in by_id['demo-0004']
  assert 'empty.wav: empty file' in by_id['bad-empty-wav']
  assert '40.00 s > 30.0 s' in by_id['bad-long']
  assert 'truncated.mp4: truncated or damaged: decodes' in by_id['bad-truncated']
  assert 'short.wav: 0.60 s of audio, ' in by_id['bad-short-audio']
  assert 'long.wav: 35.00 s of audio > 30.0 s' in by_id['bad-long-audio']
  manifest_lines = open(dataset[0], 'rb').read().splitlines()
  unnamed = [r['message'] for r in rejects if r['id'] is None]
  assert any(m.startswith(f'{dataset[0]}:{len(manifest_lines)}: not UTF-8 text') for m in unnamed)
  annotation_lines = len(open(dataset[1], 'rb').read().splitlines())
  assert any(m.startswith(f'{dataset[1]}:{annotation_lines}') and 'not UTF-8 text' in m
             for m in unnamed), unnamed

  manifest_lines = sum(1 for line in manifest_lines if line.strip())
  assert stats['clips'] == manifest_lines == sum(stats['outcomes'].values())
  assert stats['records'] == stats['outcomes']['ok'] == len(GOOD)
  assert stats['rejects'] == len(rejects) == (
      stats['clips'] - stats['records'] + sum(stats['annotation_rejects'].values()))
  assert stats['tokens']['total']['count'] == len(GOOD) and stats['complete']
  assert sum(stats['total_tokens_histogram'].values()) == len(GOOD)
  assert stats['duration_seconds']['max'] <= 4.0


def test_records_hold_the_clip_and_its_sed_target(dataset, tmp_path):
  _run(dataset, tmp_path)
  tokenizer = prompt.load_tokenizer()
  clips = {}
  for line in open(dataset[0], errors='replace'):
    if line.startswith('{"id": "demo'):
      clips.setdefault(json.loads(line)['id'], json.loads(line))   # the first of a duplicate id
  anns = dict(annotation.read_annotations(dataset[1]))
  base = os.path.dirname(dataset[0])
  for record in records.iter_records(records.shard_paths(str(tmp_path / 'sft'))):
    clip = clips[record['id']]
    assert (record['lang'], record['subset']) == (clip['lang'], clip['subset'])
    # Audio: the separate wav when the manifest names one, else the mp4's own track.
    waveform = media.load_audio(os.path.join(base, clip.get('audio', clip['video'])))
    assert record['input_features'].shape == (128, media.feature_length(len(waveform)))
    frames = record['frames']
    assert frames.shape[1] % 28 == 0 and frames.shape[2] % 28 == 0 and len(frames) % 2 == 0
    assert frames.shape[1] * frames.shape[2] <= media.VIDEO_MAX_PIXELS
    ids, labels = record['input_ids'], record['labels']
    n_audio = prompt.audio_token_count(record['input_features'].shape[1])
    n_video = len(frames) // 2 * (frames.shape[1] // 28) * (frames.shape[2] // 28)
    assert np.sum(ids == prompt.OmniTokenIds.audio) == n_audio
    assert np.sum(ids == prompt.OmniTokenIds.video) == n_video
    assert record['use_audio_in_video'] and record['video_fps'] == 2.0
    # The trained tokens spell the SED target of the clip's annotation, in its language.
    target = sed.response_text(sed.sed_target(anns[record['id']], clip['lang']))
    assert tokenizer.decode(labels[labels != -100]) == target + '<|im_end|>\n'
    assert np.all(labels[:records.prompt_length(record)] == -100)
    assert set(record['segments'][labels != -100].tolist()) == {1, 2, 3}


def test_rerun_does_nothing_new(dataset, tmp_path):
  _run(dataset, tmp_path)
  shard = tmp_path / 'sft-00000-of-00001.array_record'
  before = shard.stat().st_mtime_ns, _rejects(tmp_path)
  stats = _run(dataset, tmp_path)
  assert (shard.stat().st_mtime_ns, _rejects(tmp_path)) == before
  assert stats['records'] == len(GOOD) and sorted(_record_ids(tmp_path)) == GOOD


def test_shards_on_separate_runs_cover_every_clip_once(dataset, tmp_path):
  one = _run(dataset, tmp_path / 'one')
  out = tmp_path / 'two'
  # Shard 1 as its own program with a process pool, shard 0 in this process: as on two machines.
  manifest, labels = dataset
  subprocess.run([sys.executable, '-m', 'saber_jax.cli.preprocess', '--manifest', manifest,
                  '--annotations', labels, '--out', str(out), '--num_shards', '2',
                  '--shard_index', '1', '--workers', '2', '--quiet'], check=True)
  partial = json.load(open(out / 'stats.json'))
  assert partial['shards_done'] == [1] and not partial['complete']
  two = _run(dataset, out, '--num_shards', '2', '--shard_index', '0')
  per_shard = [[r['id'] for r in records.iter_records(str(out / records.shard_name('sft', i, 2)))]
               for i in range(2)]
  assert all(per_shard) and not set(per_shard[0]) & set(per_shard[1])
  assert sorted(per_shard[0] + per_shard[1]) == GOOD
  assert two['complete'] and two['outcomes'] == one['outcomes']
  assert two['annotation_rejects'] == one['annotation_rejects']
  key = lambda r: (str(r['id']), r['reason'])
  assert sorted(_rejects(out), key=key) == sorted(_rejects(tmp_path / 'one'), key=key)

  # A run killed before shard 1 finished: its marker is missing, a temporary file lingers.
  os.remove(out / 'parts' / 'stats-00001-of-00002.json')
  (out / 'sft-00001-of-00002.array_record.tmp-999').write_bytes(b'partial')
  shard0 = out / 'sft-00000-of-00002.array_record'
  mtime0 = shard0.stat().st_mtime_ns
  again = _run(dataset, out, '--num_shards', '2')
  assert shard0.stat().st_mtime_ns == mtime0           # the finished shard is not redone
  assert sorted(_record_ids(out)) == GOOD              # nothing duplicated
  assert again['outcomes'] == one['outcomes'] and again['complete']


def test_rerun_after_clips_were_added_is_refused_or_starts_fresh(dataset, tmp_path, capsys):
  manifest, labels = dataset
  grown = os.path.join(os.path.dirname(manifest), 'grown.jsonl')   # media paths stay valid
  lines = [row for row in open(manifest, 'rb') if row.startswith(b'{"id": "demo-000')]
  open(grown, 'wb').writelines(lines[:3])
  run = lambda *extra: preprocess.main(['--manifest', grown, '--annotations', labels,
                                        '--out', str(tmp_path), '--quiet', *extra])
  assert run()['records'] == 3
  with open(grown, 'ab') as f:
    f.write(lines[3])
  with pytest.raises(SystemExit) as exit_info:
    run()
  assert exit_info.value.code == 1
  error = capsys.readouterr().err
  assert f'{tmp_path} holds an earlier output' in error
  assert 'manifest.size: ' in error and '--overwrite' in error
  stats = run('--overwrite')
  assert stats['records'] == 4 and stats['complete'] and len(_record_ids(tmp_path)) == 4


def _children(pid):
  try:
    return psutil.Process(pid).children(recursive=True)
  except psutil.NoSuchProcess:
    return []


def test_sigkilled_run_leaves_no_workers_and_the_rerun_no_temporary_files(dataset, tmp_path):
  manifest, labels = dataset
  command = [sys.executable, '-m', 'saber_jax.cli.preprocess', '--manifest', manifest,
             '--annotations', labels, '--out', str(tmp_path), '--workers', '2', '--quiet']
  process = subprocess.Popen(command)
  workers, deadline = [], time.time() + 300
  while time.time() < deadline and process.poll() is None:
    workers = _children(process.pid)
    if len(workers) >= 2 and list(tmp_path.glob('*.tmp-*')):
      break
    time.sleep(0.05)
  assert process.poll() is None and workers, 'the run ended before it could be killed'
  process.send_signal(signal.SIGKILL)
  process.wait()
  _, alive = psutil.wait_procs(workers, timeout=10)
  assert not alive, alive
  assert list(tmp_path.glob('*.tmp-*'))                  # what the kill left behind
  stats = _run(dataset, tmp_path)
  assert stats['complete'] and sorted(_record_ids(tmp_path)) == GOOD
  assert not list(tmp_path.rglob('*.tmp-*'))


def test_demo_data_is_deterministic_and_labels_follow_the_content(tmp_path):
  first = make_demo_data.make_demo_data(str(tmp_path / 'a'), n=8, seed=3)
  second = make_demo_data.make_demo_data(str(tmp_path / 'b'), n=8, seed=3)
  other = make_demo_data.make_demo_data(str(tmp_path / 'c'), n=8, seed=4)
  read = lambda path: open(path, encoding='utf-8').read()
  assert read(first[0]) == read(second[0]) and read(first[1]) == read(second[1])
  assert read(first[1]) != read(other[1])
  clips = [json.loads(line) for line in open(first[0])]
  anns = [json.loads(line)['annotation'] for line in open(first[1])]
  assert {c['lang'] for c in clips} == {'en', 'zh'}
  for clip, ann in zip(clips, anns):
    annotation.validate_annotation(ann, clip['id'])
    lang = clip['lang']
    assert (clip['subset'] == 'consistent') == (clip['face'] == clip['voice'])
    assert ann['facial_exp_desc'] == make_demo_data.TEXT[lang]['face'][clip['face']]
    assert ann['audio_desc']['acoustic_feat'] == make_demo_data.TEXT[lang]['voice'][clip['voice']]
    info = media.probe(tmp_path / 'a' / clip['video'])
    assert info.has_video and (info.width, info.height) == (160, 128)
    assert info.has_audio == ('audio' not in clip)
    # The voice is what the annotation says: loudness alone tells the four voices apart.
    waveform = media.load_audio(tmp_path / 'a' / clip.get('audio', clip['video']))
    assert abs(len(waveform) / 16000 - info.duration) < 0.1
    rms = float(np.sqrt(np.mean(waveform ** 2)))
    bounds = {'sad': (0.05, 0.09), 'neutral': (0.10, 0.145), 'happy': (0.145, 0.19),
              'angry': (0.19, 0.3)}
    low, high = bounds[clip['voice']]
    assert low < rms < high, (clip['voice'], rms)


def test_held_out_clips_are_left_out_or_taken_alone(dataset, tmp_path):
  test_set = tmp_path / 'test_set.jsonl'
  test_set.write_text(''.join(json.dumps({'id': i, 'subset': 'consistent'}) + '\n'
                              for i in GOOD[:2]))
  stats = _run(dataset, tmp_path / 'train', '--exclude', str(test_set))
  assert sorted(_record_ids(tmp_path / 'train')) == GOOD[2:]
  # Three manifest lines: demo-0001 is listed twice.
  assert stats['left_out'] == 3 and stats['clips'] == sum(stats['outcomes'].values())
  # The test clips' own records, from the same manifest (a plain id list works too).
  ids = tmp_path / 'ids.txt'
  ids.write_text('\n'.join(GOOD[:2]) + '\n')
  for only, out in ((test_set, 'test'), (ids, 'test_ids')):
    stats = _run(dataset, tmp_path / out, '--only', str(only))
    assert sorted(_record_ids(tmp_path / out)) == GOOD[:2]
    assert stats['records'] == 2
    # Still rejected: the lines without a readable id, demo-0001's second line.
    assert sorted((r['id'] or '', r['reason']) for r in _rejects(tmp_path / out)) == [
        ('', 'bad_annotation'), ('', 'bad_manifest'), ('', 'bad_manifest'),
        ('demo-0001', 'duplicate_clip')]
  # Another selection is another output: refused, not mixed.
  with pytest.raises(SystemExit):
    _run(dataset, tmp_path / 'test', '--only', str(ids))


def test_no_record_at_all_exits_1_with_the_counts_and_reason(dataset, tmp_path, capsys):
  manifest, labels = dataset
  with pytest.raises(SystemExit) as e:
    preprocess.main(['--manifest', manifest, '--annotations', labels, '--out', str(tmp_path),
                     '--quiet', '--min-seconds', '29'])
  assert e.value.code == 1
  err = capsys.readouterr().err
  assert 'wrote no record' in err and 'most frequent reason: too_short' in err


def test_preference_records_refuse_nothing_and_count_reasons(dataset, tmp_path, capsys):
  from saber_jax.cli import make_preference_records
  _run(dataset, tmp_path / 'sft', '--num_shards', '2')      # the old spelling still works
  assert '--num_shards is deprecated' in capsys.readouterr().err
  good = 'Visual evidence: a face.\nReasoning: calm.'
  pairs = tmp_path / 'pairs.jsonl'
  pairs.write_text(''.join(json.dumps(p) + '\n' for p in [
      {'id': GOOD[0], 'chosen': ' ' + good, 'rejected': good},
      {'id': GOOD[1], 'chosen': ' ' + good, 'rejected': good},
      {'id': 'nowhere', 'chosen': good, 'rejected': good + '!'}]))
  args = ['--pairs', str(pairs), '--sft-records', str(tmp_path / 'sft' / 'sft')]
  with pytest.raises(SystemExit, match=r'no record \(3 pairs rejected; most frequent reason: '
                                       r'chosen: the response must be non-empty'):
    make_preference_records.main(args + ['--out', str(tmp_path / 'none')])
  pairs.write_text(json.dumps({'id': GOOD[0], 'chosen': good, 'rejected': good + '!'}) + '\n')
  stats = make_preference_records.main(args + ['--out', str(tmp_path / 'one')])
  assert (stats['records'], stats['rejected']) == (1, 0)
  # Degenerate pairs are rejects with their reason.
  other = tmp_path / 'other.jsonl'
  other.write_text(''.join(json.dumps(p) + '\n' for p in [
      {'id': GOOD[0], 'chosen': good, 'rejected': good + '!', 'chosen_score': 9,
       'rejected_score': 2},
      {'id': GOOD[1], 'chosen': good, 'rejected': good},
      {'id': GOOD[2], 'chosen': good, 'rejected': good + '!', 'chosen_score': 1,
       'rejected_score': 2}]))
  again = ['--pairs', str(other), '--sft-records', str(tmp_path / 'sft' / 'sft'),
           '--out', str(tmp_path / 'one')]
  # The same inputs again: done. Other pairs into the same output: refused, never "done".
  assert make_preference_records.main(args + ['--out', str(tmp_path / 'one')]) == stats
  assert 'is done' in capsys.readouterr().out
  with pytest.raises(SystemExit, match=r'error: .*one holds an earlier output .*\n  pairs'):
    make_preference_records.main(again)
  stats = make_preference_records.main(again + ['--overwrite'])
  assert (stats['records'], stats['rejected']) == (1, 2)
  rejects = {r['id']: r['reason'] for r in map(json.loads, open(tmp_path / 'one' /
                                                                  'rejects.jsonl'))}
  assert 'chosen and rejected answers are equal' in rejects[f'{GOOD[1]}#0']
  assert 'chosen scored below rejected (1 < 2)' in rejects[f'{GOOD[2]}#0']

  # The SFT records hold two different records of one id: refused naming the id and both
  # places before a record is written.
  first = records.shard_paths(str(tmp_path / 'sft' / 'sft'))[0]
  twice = dict(next(records.iter_records(first)), duration=99.0)   # another clip, same id
  dup = [records.shard_name(str(tmp_path / 'dup' / 'sft'), i, 2) for i in range(2)]
  records.write_records(dup[0], (blob for _, blob in records.read_records(first)))
  records.write_records(dup[1], [records.pack(twice)])
  dup_args = ['--pairs', str(pairs), '--sft-records', str(tmp_path / 'dup' / 'sft')]
  with pytest.raises(SystemExit, match=re.escape(f"duplicate id {twice['id']!r}: {dup[0]}:0 "
                                                 f'and {dup[1]}:0 hold different records')):
    make_preference_records.main(dup_args + ['--out', str(tmp_path / 'dup-out')])
  assert not os.path.exists(tmp_path / 'dup-out' / 'stats.json')


def test_a_second_run_of_a_shard_exits_at_once_naming_the_first(dataset, tmp_path, capsys):
  """One writer per shard: a live process holding shard 0's lock (a run started first)
  makes this run exit 1 before any clip is read; a shard run with other settings is a
  fingerprint error even before the first run wrote a record (checked in test_files)."""
  lock = preprocess.shard_lock(str(tmp_path), 0, 2)
  with processes.held_by_another_process(lock) as holder_pid:
    with pytest.raises(SystemExit) as exit_info:
      _run(dataset, tmp_path, '--num-shards', '2', '--shard-index', '0')
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert f'{tmp_path} shard 0 is being written by pid {holder_pid} on ' in error
    assert not os.path.exists(tmp_path / 'parts')                 # no work was done
    stats = _run(dataset, tmp_path, '--num-shards', '2', '--shard-index', '1')   # shard 1 runs
    assert stats['shards_done'] == [1]
  assert not os.path.exists(preprocess.shard_lock(str(tmp_path), 1, 2))   # released
