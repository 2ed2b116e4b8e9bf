"""Record blobs round-trip, bad blobs fail naming the record and field, and shards are
written atomically."""

import math
import re
import os
import shutil

import msgpack
import numpy as np
import pytest

from saber_jax.batch import IGNORE_INDEX, REASONING
from saber_jax.data import annotation, prompt, records, sed


def _sft_fields(rng, clip_id='clip-1', with_image=False):
  length = 37
  labels = np.full(length, IGNORE_INDEX, np.int32)
  labels[20:] = rng.integers(0, 1000, length - 20)
  fields = dict(
      id=clip_id, lang='en', subset='consistent', duration=3.25,
      input_ids=rng.integers(0, 151000, length).astype(np.int32), labels=labels,
      segments=np.repeat(np.array([0, 1, 2, 3], np.int8), [20, 6, 6, 5]),
      input_features=rng.standard_normal((128, 53)).astype(np.float32),
      frames=rng.integers(0, 256, (4, 56, 84, 3)).astype(np.uint8), video_fps=2.0,
      use_audio_in_video=True)
  if with_image:
    fields['image'] = rng.integers(0, 256, (30, 40, 3)).astype(np.uint8)
  return fields


def _assert_same(decoded, fields):
  for key, value in fields.items():
    if isinstance(value, np.ndarray):
      assert decoded[key].dtype == value.dtype and decoded[key].shape == value.shape, key
      np.testing.assert_array_equal(decoded[key], value)
    else:
      assert decoded[key] == value and type(decoded[key]) is type(value), key


def test_sft_record_round_trips_every_field():
  fields = _sft_fields(np.random.default_rng(0), with_image=True)
  decoded = records.decode_record(records.encode_sft_record(**fields))
  _assert_same(decoded, fields)
  assert decoded['kind'] == records.SFT and decoded['schema_version'] == records.SCHEMA_VERSION


def test_audio_only_record_has_no_video_fields():
  fields = _sft_fields(np.random.default_rng(1))
  del fields['frames'], fields['video_fps']
  fields['use_audio_in_video'] = False
  decoded = records.decode_record(records.encode_sft_record(**fields))
  assert 'frames' not in decoded and 'video_fps' not in decoded
  _assert_same(decoded, fields)


def test_preference_record_round_trips_and_defaults_to_nan():
  rng = np.random.default_rng(2)
  fields = dict(id='pair-1', clip_id='clip-1', lang='zh', subset='inconsistent', duration=1.5,
                prompt_ids=rng.integers(0, 1000, 12).astype(np.int32),
                chosen_ids=rng.integers(0, 1000, 5).astype(np.int32),
                rejected_ids=rng.integers(0, 1000, 7).astype(np.int32),
                chosen_segments=np.array([1, 1, 2, 3, 3], np.int8),
                rejected_segments=np.full(7, 3, np.int8), chosen='好', rejected='坏',
                chosen_score=8.5, rejected_score=2.0, margin=6.5,
                input_features=rng.standard_normal((128, 9)).astype(np.float32))
  decoded = records.decode_record(records.encode_preference_record(**fields))
  _assert_same(decoded, fields)
  assert math.isnan(decoded['ref_chosen_logps']) and math.isnan(decoded['ref_rejected_logps'])


@pytest.mark.parametrize('blob', [b'', b'\xc1garbage', msgpack.packb([1, 2, 3])])
def test_malformed_blob_is_a_record_error_naming_where(blob):
  with pytest.raises(records.RecordError,
                     match=r'shard-3\.array_record:17: not a saber_jax record'):
    records.decode_record(blob, 'shard-3.array_record:17')


@pytest.mark.parametrize('change, field', [
    (lambda r: r.pop('labels'), 'labels'),
    (lambda r: r.update(labels=r['labels'][:-1]), 'labels'),
    (lambda r: r.update(input_ids=r['input_ids'].astype(np.int64)), 'input_ids'),
    (lambda r: r.update(frames=r['frames'][..., 0]), 'frames'),
    (lambda r: r.pop('video_fps'), 'video_fps'),
    (lambda r: r.update(schema_version=records.SCHEMA_VERSION + 1), 'schema_version'),
    (lambda r: r.update(kind='mystery'), 'kind'),
    (lambda r: r.update(duration='3 s'), 'duration'),
    (lambda r: r.pop('input_features'), 'use_audio_in_video'),
])
def test_bad_field_is_named_with_the_record_id(change, field):
  record = records.unpack(records.encode_sft_record(**_sft_fields(np.random.default_rng(3))))
  record = {k: np.array(v) if isinstance(v, np.ndarray) else v for k, v in record.items()}
  change(record)
  with pytest.raises(records.RecordError, match=rf"f.rec:4: record 'clip-1': field '{field}'"):
    records.decode_record(records.pack(record), 'f.rec:4')


def test_encoder_refuses_what_the_decoder_would_refuse():
  fields = _sft_fields(np.random.default_rng(4))
  fields['segments'] = fields['segments'][:5]
  with pytest.raises(records.RecordError, match="field 'segments'"):
    records.encode_sft_record(**fields)


def test_preference_from_sft_keeps_the_sft_tokenization():
  """With the SFT target as the chosen text, prompt + chosen reproduces the SFT row."""
  tokenizer = prompt.load_tokenizer()
  ann = annotation.validate_annotation({
      'video_desc': 'A kitchen.', 'audio_desc': {'speech_content': 'Hello there.',
                                                 'acoustic_feat': 'Calm, low voice.'},
      'facial_exp_desc': 'A slight smile.', 'body_lang_desc': 'Arms crossed.',
      'sentiment_analysis': 'Mildly positive.'}, 'c1')
  target = sed.sed_target(ann, 'en')
  prompt_ids = prompt.build_prompt(tokenizer, text=sed.sed_instruction('en'), audio_lengths=[120])
  example = sed.build_sft_example(tokenizer, prompt_ids, target)
  rng = np.random.default_rng(5)
  sft = records.decode_record(records.encode_sft_record(
      id='c1', lang='en', duration=1.2, **example,
      input_features=rng.standard_normal((128, 120)).astype(np.float32)))
  assert records.prompt_length(sft) == len(prompt_ids)
  pair = records.decode_record(records.preference_from_sft(
      sft, tokenizer, chosen=sed.response_text(target), rejected='Holistic reasoning:\nAngry.',
      pair_id='c1#0', chosen_score=9, rejected_score=1, margin=8))
  np.testing.assert_array_equal(pair['prompt_ids'], prompt_ids)
  np.testing.assert_array_equal(np.concatenate([pair['prompt_ids'], pair['chosen_ids']]),
                                example['input_ids'])
  np.testing.assert_array_equal(pair['chosen_segments'], example['segments'][len(prompt_ids):])
  assert set(pair['rejected_segments'].tolist()) == {REASONING}
  assert tokenizer.decode(pair['rejected_ids']) == 'Holistic reasoning:\nAngry.<|im_end|>\n'
  np.testing.assert_array_equal(pair['input_features'], sft['input_features'])
  assert (pair['id'], pair['clip_id'], pair['margin']) == ('c1#0', 'c1', 8.0)
  with pytest.raises(ValueError, match="pair 'c1#1': rejected"):
    records.preference_from_sft(sft, tokenizer, chosen='ok', rejected=' leading space',
                                pair_id='c1#1')
  # Degenerate pairs never become records: equal answers, chosen scored below rejected.
  with pytest.raises(ValueError, match="pair 'c1#2': chosen and rejected answers are equal"):
    records.preference_from_sft(sft, tokenizer, chosen='Same.', rejected='Same.', pair_id='c1#2')
  with pytest.raises(ValueError, match=r"pair 'c1#3': chosen scored below rejected \(1 < 2\)"):
    records.preference_from_sft(sft, tokenizer, chosen='A.', rejected='B.', pair_id='c1#3',
                                chosen_score=1, rejected_score=2)


def _blobs(n, prefix='r'):
  rng = np.random.default_rng(6)
  return [records.encode_sft_record(**_sft_fields(rng, f'{prefix}{i}')) for i in range(n)]


def test_shards_read_back_in_order(tmp_path):
  prefix = str(tmp_path / 'sft')
  blobs = _blobs(5)
  for index, part in enumerate((blobs[:3], blobs[3:])):
    assert records.write_records(records.shard_name(prefix, index, 2), part) == len(part)
  paths = records.shard_paths(prefix)
  assert [os.path.basename(p) for p in paths] == ['sft-00000-of-00002.array_record',
                                                  'sft-00001-of-00002.array_record']
  assert records.count_records(paths) == 5
  read = list(records.read_records(paths, chunk=2))
  assert [blob for _, blob in read] == blobs
  assert read[4][0] == f'{paths[1]}:1'
  assert [r['id'] for r in records.iter_records(paths)] == [f'r{i}' for i in range(5)]


def test_missing_shard_is_named(tmp_path):
  prefix = str(tmp_path / 'sft')
  records.write_records(records.shard_name(prefix, 1, 3), _blobs(1))
  with pytest.raises(FileNotFoundError,
                     match=r'2 of 3 shards missing, e\.g\. .*sft-00000-of-00003'):
    records.shard_paths(prefix)


def test_a_failed_write_leaves_no_shard_and_keeps_the_old_one(tmp_path):
  path = str(tmp_path / records.shard_name('sft', 0, 1))
  blobs = _blobs(3)

  def dies_midway():
    yield blobs[0]
    yield blobs[1]
    raise KeyboardInterrupt  # a killed writer

  with pytest.raises(KeyboardInterrupt):
    records.write_records(path, dies_midway())
  assert os.listdir(tmp_path) == []          # neither the shard nor a temporary file
  records.write_records(path, blobs[:1])
  with pytest.raises(KeyboardInterrupt):
    records.write_records(path, dies_midway())
  assert sorted(os.listdir(tmp_path)) == [os.path.basename(path),
                                          os.path.basename(path) + '.sizes.npz']
  assert [b for _, b in records.read_records(path)] == blobs[:1]


def _pairs(n):
  rng = np.random.default_rng(7)
  return [records.encode_preference_record(
      id=f'p{i}', lang='en', duration=1.0, prompt_ids=[1, 2, 3], chosen_ids=[4, 5],
      rejected_ids=[6], chosen_segments=[3, 3], rejected_segments=[3], chosen='a', rejected='b',
      input_features=rng.standard_normal((128, 4)).astype(np.float32)) for i in range(n)]


def test_fill_reference_logps_rewrites_shards(tmp_path):
  prefix = str(tmp_path / 'pairs')
  paths = [records.shard_name(prefix, i, 2) for i in range(2)]
  pairs = _pairs(5)
  records.write_records(paths[0], pairs[:2])
  records.write_records(paths[1], pairs[2:])
  out = tmp_path / 'filled'
  logps = {f'p{i}': (-10.0 - i, -20.0 - i) for i in range(5)}
  assert records.fill_reference_logps(paths, logps, out_dir=str(out)) == {'filled': 5, 'kept': 0}
  filled = list(records.iter_records(records.shard_paths(str(out / 'pairs'))))
  assert [(r['id'], r['ref_chosen_logps'], r['ref_rejected_logps']) for r in filled] == [
      (f'p{i}', -10.0 - i, -20.0 - i) for i in range(5)]
  assert all(math.isnan(r['ref_chosen_logps']) for r in records.iter_records(paths))  # inputs kept
  np.testing.assert_array_equal(filled[3]['input_features'],
                                records.decode_record(pairs[3])['input_features'])

  # In place, by position in the files, keeping the pairs that have no value.
  counts = records.fill_reference_logps(paths, {0: (-1.0, -2.0), 4: (-3.0, -4.0)}, key='index',
                                        missing='keep')
  assert counts == {'filled': 2, 'kept': 3}
  values = [r['ref_chosen_logps'] for r in records.iter_records(paths)]
  assert values[0] == -1.0 and values[4] == -3.0 and all(math.isnan(v) for v in values[1:4])
  with pytest.raises(records.RecordError, match="record 'p1': no reference log-probs given"):
    records.fill_reference_logps(paths, {'p0': (0.0, 0.0)})
  assert sorted(os.listdir(tmp_path)) == ['filled', *sorted(
      os.path.basename(p) + suffix for p in paths for suffix in ('', '.sizes.npz'))]


def test_size_index_is_written_with_the_shard_and_matches_the_records(tmp_path):
  path = str(tmp_path / records.shard_name('mixed', 0, 1))
  rng = np.random.default_rng(8)
  blobs = [records.encode_sft_record(**_sft_fields(rng, 'a', with_image=True)), *_pairs(2)]
  records.write_records(path, blobs)
  sizes = records.load_sizes([path], rebuild=False)
  assert sizes.dtype == np.int32 and sizes.shape == (3, len(records.SIZE_FIELDS))
  named = [dict(zip(records.SIZE_FIELDS, row.tolist())) for row in sizes]
  assert named[0] == dict(prompt_tokens=20, response_tokens=17, rejected_tokens=0, mel_frames=53,
                          video_frames=4, video_height=56, video_width=84, image_height=30,
                          image_width=40)
  assert named[1] == dict(prompt_tokens=3, response_tokens=2, rejected_tokens=1, mel_frames=4,
                          video_frames=0, video_height=0, video_width=0, image_height=0,
                          image_width=0)


def test_missing_or_stale_size_index_is_detected_and_rebuilt(tmp_path):
  path = str(tmp_path / records.shard_name('sft', 0, 1))
  records.write_records(path, _blobs(3))
  want = records.load_sizes(path)
  os.remove(records.sizes_path(path))
  with pytest.raises(records.RecordError, match=r'sft-00000-of-00001\.array_record: no size index'):
    records.load_sizes(path, rebuild=False)
  np.testing.assert_array_equal(records.load_sizes(path), want)   # rebuilt and cached
  assert os.path.exists(records.sizes_path(path))

  # The shard replaced by other records (copied in, its index left behind): stale.
  other = str(tmp_path / 'other' / records.shard_name('sft', 0, 1))
  rng = np.random.default_rng(9)
  fields = [_sft_fields(rng, f'o{i}') for i in range(3)]
  fields[1]['frames'] = fields[1]['frames'][:2]
  records.write_records(other, [records.encode_sft_record(**f) for f in fields])
  shutil.copyfile(other, path)
  with pytest.raises(records.RecordError, match='stale size index'):
    records.load_sizes(path, rebuild=False)
  rebuilt = records.load_sizes(path)
  assert rebuilt[1, records.SIZE_FIELDS.index('video_frames')] == 2
  np.testing.assert_array_equal(rebuilt, records.load_sizes(other, rebuild=False))


# ---------------------------------------------------------------- damaged record files

def _damaged_shards(tmp_path, n=6):
  """(whole shard, its blobs, the shard cut to half, the shard with one byte flipped in
  its middle)."""
  path = str(tmp_path / records.shard_name('whole', 0, 1))
  blobs = _blobs(n)
  records.write_records(path, blobs)
  data = open(path, 'rb').read()
  cut = str(tmp_path / records.shard_name('cut', 0, 1))
  open(cut, 'wb').write(data[:len(data) // 2])
  flipped = bytearray(data)
  flipped[len(data) // 3] ^= 0xFF
  flip = str(tmp_path / records.shard_name('flip', 0, 1))
  open(flip, 'wb').write(bytes(flipped))
  return path, blobs, cut, flip


def test_every_read_of_a_damaged_shard_names_the_file_and_record(tmp_path):
  path, blobs, cut, flip = _damaged_shards(tmp_path)
  for read in (records.count_records, lambda p: list(records.read_records(p)),
               lambda p: records.ShardSource([p]), records.load_sizes):
    with pytest.raises(records.RecordError, match=re.escape(cut) + r': damaged record file '
                       r'\(RuntimeError: .*Riegeli'):
      read(cut)
  # One flipped byte: the record it hit is named by its index, the others read fine.
  got, damaged = [], []
  read = records.read_records(flip, chunk=4, on_damaged=lambda w, e: damaged.append((w, e)))
  for where, blob in read:
    got.append((where, blob))
  assert len(damaged) == 1 and len(got) == len(blobs) - 1
  bad = int(damaged[0][0].rsplit(':', 1)[1])
  assert str(damaged[0][1]).startswith(f'{flip}:{bad}: damaged record file')
  assert [b for _, b in got] == blobs[:bad] + blobs[bad + 1:]
  with pytest.raises(records.RecordError, match=re.escape(f'{flip}:{bad}: damaged record')):
    list(records.read_records(flip))
  source = records.ShardSource([path, flip])
  assert len(source) == 2 * len(blobs) and source[len(blobs) + bad + 1] == blobs[bad + 1]
  with pytest.raises(records.RecordError, match=re.escape(f'{flip}:{bad}: damaged record')):
    source[len(blobs) + bad]
  with pytest.raises(records.RecordError, match=re.escape(f'{flip}:{bad}: damaged record')):
    records.load_sizes(flip)
  sizes = records.load_sizes(flip, tolerate_damaged=True)    # the reference pass: sized 0
  assert sizes.shape[0] == len(blobs) and not sizes[bad].any() and sizes[bad - 1].all() >= 0
  assert not os.path.exists(records.sizes_path(flip))        # a partial index is not cached


def test_fill_reference_logps_drops_damaged_pairs_when_asked(tmp_path):
  path = str(tmp_path / records.shard_name('pairs', 0, 1))
  records.write_records(path, _pairs(40))
  data = bytearray(open(path, 'rb').read())
  data[int(len(data) * 0.3)] ^= 0xFF      # inside the records (the file ends in padding)
  open(path, 'wb').write(bytes(data))
  logps = {i: (-1.0, -2.0) for i in range(40)}
  with pytest.raises(records.RecordError, match='damaged record file'):
    records.fill_reference_logps([path], logps, key='index', out_dir=str(tmp_path / 'a'))
  counts = records.fill_reference_logps([path], logps, key='index', out_dir=str(tmp_path / 'b'),
                                        drop=[0], skip_unreadable=True)
  kept = [r['id'] for r in records.iter_records(str(tmp_path / 'b' / os.path.basename(path)))]
  assert counts['dropped'] >= 2 and counts['filled'] == len(kept) == 40 - counts['dropped']
  assert 'p0' not in kept and kept == sorted(kept, key=lambda i: int(i[1:]))


def test_size_index_of_a_shard_rewritten_with_its_mtime_kept_is_stale(tmp_path):
  path = str(tmp_path / records.shard_name('sft', 0, 1))
  records.write_records(path, _blobs(3))
  records.load_sizes(path, rebuild=False)
  stat = os.stat(path)
  other = str(tmp_path / 'other' / records.shard_name('sft', 0, 1))
  records.write_records(other, _blobs(3, prefix='other-id-'))     # same size, other bytes
  assert os.path.getsize(other) == stat.st_size
  shutil.copyfile(other, path)
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))          # `cp -p`: mtime kept
  with pytest.raises(records.RecordError, match='stale size index'):
    records.load_sizes(path, rebuild=False)


def test_duplicate_ids_across_shards_are_refused_and_repeats_found(tmp_path):
  a = str(tmp_path / records.shard_name('a', 0, 1))
  records.write_records(a, _blobs(3))
  # The same shard given twice: every record of the second copy repeats one of the first.
  assert records.repeated_records([a, a]) == [3, 4, 5]
  assert records.repeated_records([a]) == []
  rng = np.random.default_rng(11)
  other = str(tmp_path / records.shard_name('b', 0, 1))
  records.write_records(other, [_blobs(1, prefix='x')[0],
                                records.encode_sft_record(**_sft_fields(rng, 'r1'))])
  with pytest.raises(records.RecordError, match=re.escape(
      f"duplicate id 'r1': {a}:1 and {other}:1 hold different records")):
    records.repeated_records([a, other])
  # An index of an older version (no ids) is rebuilt, not trusted.
  with np.load(records.sizes_path(a)) as index:
    old = {k: index[k] for k in ('sizes', 'fields', 'fingerprint')}
  np.savez(records.sizes_path(a), **old)
  with pytest.raises(records.RecordError, match='size index without record ids'):
    records.load_sizes(a, rebuild=False)
  assert records.repeated_records([a, a]) == [3, 4, 5]


def test_degenerate_pairs_are_named_and_left_out_of_the_reference_pass_output(tmp_path):
  assert records.degenerate_pair('a', 'b', 2.0, 1.0) is None
  assert records.degenerate_pair('a', 'b', math.nan, 1.0) is None     # unknown: not compared
  assert records.degenerate_pair('a', 'b', 1.0, 1.0) is None          # a tie is not below
  assert 'below' in records.degenerate_pair('a', 'b', 0.5, 1.0)
  assert 'equal' in records.degenerate_pair(np.array([4, 5]), np.array([4, 5]))
  rng = np.random.default_rng(8)
  common = dict(lang='en', duration=1.0, prompt_ids=[1, 2, 3], chosen_segments=[3, 3],
                rejected_segments=[3, 3], input_features=rng.standard_normal((128, 4)).astype(
                    np.float32))
  blobs = [
      records.encode_preference_record(id='good', chosen_ids=[4, 5], rejected_ids=[6, 7],
                                       chosen='a', rejected='b', **common),
      records.encode_preference_record(id='same', chosen_ids=[4, 5], rejected_ids=[4, 5],
                                       chosen='a', rejected='a', **common),
      # Different texts, one tokenization: equal ids are as degenerate as equal texts.
      records.encode_preference_record(id='same-ids', chosen_ids=[4, 5], rejected_ids=[4, 5],
                                       chosen='a', rejected='a ', **common),
      records.encode_preference_record(id='inverted', chosen_ids=[4, 5], rejected_ids=[6, 7],
                                       chosen='a', rejected='b', chosen_score=1.0,
                                       rejected_score=3.0, **common)]
  path = records.shard_name(str(tmp_path / 'pairs'), 0, 1)
  records.write_records(path, blobs)
  left_out = []
  counts = records.fill_reference_logps([path], {i: (-1.0, -2.0) for i in range(4)}, key='index',
                                        out_dir=str(tmp_path / 'out'), degenerate=left_out)
  assert counts == {'filled': 1, 'kept': 0, 'degenerate': 3}
  assert [(d['id'], d['reason'].split(' (')[0]) for d in left_out] == [
      ('same', 'chosen and rejected answers are equal'),
      ('same-ids', 'chosen and rejected answers are equal'),
      ('inverted', 'chosen scored below rejected')]
  assert left_out[1]['where'] == f'{path}:2'
  kept = list(records.iter_records([str(tmp_path / 'out' / os.path.basename(path))]))
  assert [r['id'] for r in kept] == ['good']
