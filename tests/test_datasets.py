"""The Grain datasets (data.datasets) over real preprocessed records: deterministic per seed, epochs
reshuffled, exact resume from a saved state, disjoint process shards, bucketed shapes,
preference pairs kept together, and batches the tiny thinker runs on."""

import collections
import dataclasses
import functools
import json
import math
import pathlib
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from saber_jax import files, losses
from saber_jax.batch import CHOSEN, FILL, REJECTED
from saber_jax.data import collate, datasets, prompt, records
from saber_jax.data.examples import DataConfig
from saber_jax.errors import UserError
from saber_jax.models import thinker
from saber_jax.train import flops, steps
from tiny_data import BASE, TINY

ROOT = pathlib.Path(__file__).resolve().parents[1]
from saber_jax.cli import make_demo_data, preprocess  # noqa: E402

NUM_CLIPS = 12


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """(SFT shard paths, preference shard paths, clip id of each SFT row's ids)."""
  root = tmp_path_factory.mktemp('pipeline')
  manifest, labels = make_demo_data.make_demo_data(str(root / 'clips'), n=NUM_CLIPS, seed=1)
  preprocess.main(['--manifest', manifest, '--annotations', labels, '--out', str(root / 'sft'),
                   '--num_shards', '2', '--quiet'])
  sft = records.shard_paths(str(root / 'sft' / 'sft'))
  sft_records = list(records.iter_records(sft))
  assert len(sft_records) == NUM_CLIPS
  tokenizer = prompt.load_tokenizer()
  texts = [tokenizer.decode(r['labels'][r['labels'] != -100]).removesuffix('<|im_end|>\n')
           for r in sft_records]
  pairs = [records.preference_from_sft(r, tokenizer, chosen=texts[i], pair_id=f'{r["id"]}#0',
                                       rejected=texts[(i + 1) % NUM_CLIPS])
           for i, r in enumerate(sft_records)]
  pref = [records.shard_name(str(root / 'pairs'), i, 2) for i in range(2)]
  records.write_records(pref[0], pairs[:7])
  records.write_records(pref[1], pairs[7:])
  by_ids = {tuple(r['input_ids'].tolist()): r['id'] for r in sft_records}
  return sft, pref, by_ids


def sft_batches(*args, **kwargs):
  return iter(datasets.sft_dataset(*args, **kwargs))


def preference_batches(*args, **kwargs):
  return iter(datasets.preference_dataset(*args, **kwargs))


def _row_ids(batch, by_ids):
  """Clip id of each row that holds an example (None for empty rows)."""
  out = []
  for ids, mask, keep in zip(batch['input_ids'], batch['attention_mask'], batch['example_mask']):
    out.append(by_ids[tuple(ids[mask].tolist())] if keep else None)
  return out


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


def test_same_seed_same_batches_and_each_epoch_reshuffled(data):
  sft, _, by_ids = data
  config = dataclasses.replace(BASE, num_epochs=2)
  make = lambda seed: sft_batches(TINY, config, sft, seed=seed, shard_index=0, shard_count=1)
  first, second = list(make(7)), list(make(7))
  steps_per_epoch = datasets.steps_per_epoch(NUM_CLIPS, config, shard_count=1)
  assert len(first) == len(second) == 2 * steps_per_epoch == 6
  for a, b in zip(first, second):
    _assert_batches_equal(a, b)
  order = [i for b in first for i in _row_ids(b, by_ids)]
  epochs = order[:NUM_CLIPS], order[NUM_CLIPS:]
  assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(by_ids.values())
  assert epochs[0] != epochs[1]
  other = [i for b in make(8) for i in _row_ids(b, by_ids)]
  assert other != order and sorted(other) == sorted(order)


@pytest.mark.parametrize('restore_at', [2, 3])   # mid-epoch, and at the epoch boundary
def test_restored_state_continues_with_the_next_batch(data, restore_at):
  sft, _, _ = data
  config = dataclasses.replace(BASE, num_epochs=2)
  make = lambda: sft_batches(TINY, config, sft, seed=1, shard_index=0, shard_count=1)
  reference = list(make())
  running = make()
  _take(running, restore_at)
  state = json.loads(json.dumps(running.get_state()))   # what grain.checkpoint writes
  resumed = make()
  resumed.set_state(state)
  rest = list(resumed)
  assert len(rest) == len(reference) - restore_at
  for a, b in zip(rest, reference[restore_at:]):
    _assert_batches_equal(a, b)


def test_processes_see_disjoint_halves_that_cover_everything(data):
  sft, _, by_ids = data
  config = dataclasses.replace(BASE, batch_size=2, num_data_shards=1, num_epochs=1)
  seen = [[i for b in sft_batches(TINY, config, sft, seed=5, shard_index=p, shard_count=2)
           for i in _row_ids(b, by_ids)] for p in range(2)]
  assert len(seen[0]) == len(seen[1]) == NUM_CLIPS // 2
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(by_ids.values())


@functools.cache
def _ladder(minimum, steps=DataConfig.bucket_steps, multiple=1, top=1 << 14):
  """Every size `bucket_size` can give below `top`."""
  return frozenset(collate.bucket_size(n, minimum, steps, multiple) for n in range(top))


def test_batch_shapes_fall_in_the_buckets(data):
  sft, _, _ = data
  config = dataclasses.replace(BASE, num_epochs=3)
  batches = list(sft_batches(TINY, config, sft, seed=0, shard_index=0, shard_count=1))
  shapes = set()
  for b in batches:
    rows, length = b['input_ids'].shape
    assert rows == config.batch_size and length in config.length_buckets
    assert b['labels'].shape == b['segments'].shape == (rows, length)
    assert b['position_ids'].shape == (3, rows, length)
    assert np.all(b['labels'][~b['attention_mask']] == -100)
    audio, vision = b['audio'], b['vision']
    shards, chunks = audio['chunks'].shape[:2]
    assert shards == config.num_data_shards and chunks in _ladder(config.min_audio_chunks, top=64)
    assert audio['slots'].shape[1] == chunks * TINY.audio.n_window // 2
    assert vision['pixel_values'].shape[1] in _ladder(config.min_patches, multiple=4)
    assert vision['window_blocks'].shape[1] in _ladder(config.min_vision_blocks)
    assert vision['window_blocks'].shape[2] == (112 // 28) ** 2 * 4
    assert vision['frame_blocks'].shape[1] in _ladder(config.min_vision_blocks)
    assert vision['frame_blocks'].shape[2] in _ladder(config.min_frame_len, multiple=4, top=1024)
    # Every placeholder of a shard's rows is filled by one of that shard's feature rows.
    per_shard = rows // shards
    for s in range(shards):
      ids = b['input_ids'][s * per_shard:(s + 1) * per_shard]
      assert audio['pool_index'][s][audio['slots'][s] < ids.size].shape[0] == np.sum(
          ids == TINY.audio_token_id)
      assert np.sum(vision['token_mask'][s]) == np.sum(ids == TINY.video_token_id)
    shapes.add(tuple(x.shape for x in jax.tree.leaves(b)))
  assert len(shapes) <= 3   # 12 clips of 1.5-4 s: a couple of buckets, not one shape per batch


def test_batches_run_through_the_tiny_thinker(data):
  sft, _, _ = data
  batch = next(sft_batches(TINY, BASE, sft, seed=0, shard_index=0, shard_count=1))
  params = jax.jit(lambda key: nn.unbox(thinker.init_params(TINY, key)))(jax.random.key(0))

  @jax.jit
  def loss_fn(params, batch):
    hidden = thinker.Thinker(TINY).apply({'params': params},
                                         {k: batch[k] for k in steps.MODEL_KEYS if k in batch})
    return losses.sed_loss_from_hidden(hidden, params['text']['lm_head']['kernel'],
                                       batch['labels'], batch['segments'])

  loss, metrics = loss_fn(params, batch)
  assert np.isfinite(float(loss)) and 0 < float(loss) < 2 * math.log(TINY.text.vocab_size)
  assert int(metrics['tokens']) > 0
  assert {int(metrics[f'tokens/{s}']) > 0 for s in ('visual', 'acoustic', 'reasoning')} == {True}
  # The training log counts each pipeline batch's model FLOPs: every part is there.
  parts = flops.training_flops(TINY, flops.batch_counts(TINY, batch))
  assert all(flops.total({name: part}) > 0 for name, part in parts.items()), parts


def test_worker_processes_give_the_same_batches_and_resume(data):
  sft, _, _ = data
  config = dataclasses.replace(BASE, num_epochs=1)
  make = lambda workers: sft_batches(
      TINY, dataclasses.replace(config, worker_count=workers), sft, seed=2, shard_index=0,
      shard_count=1)
  reference = list(make(0))
  workers = make(2)
  got = [next(workers)]
  state = json.loads(json.dumps(workers.get_state()))
  got += list(workers)
  for a, b in zip(got, reference):
    _assert_batches_equal(a, b)
  assert len(got) == len(reference)
  resumed = make(2)
  resumed.set_state(state)
  for a, b in zip(resumed, reference[1:]):
    _assert_batches_equal(a, b)
  del got, a, b


@pytest.mark.parametrize('overlong', ['truncate', 'drop'])
def test_overlong_rows_are_truncated_or_dropped_and_flagged(data, overlong):
  sft, _, by_ids = data
  limit = 256
  expected = collections.Counter()
  for r in records.iter_records(sft):
    if len(r['input_ids']) <= limit:
      expected['kept'] += 1
    elif overlong == 'truncate' and records.prompt_length(r) < limit:
      expected['truncated'] += 1
    else:
      expected['dropped'] += 1
  assert expected['dropped'] and (overlong == 'drop' or expected['truncated'])
  # Most records are cut or dropped here on purpose: allow that (the default refuses it).
  config = dataclasses.replace(BASE, length_buckets=(limit,), overlong=overlong, num_epochs=1,
                               max_dropped_fraction=1.0)
  got = collections.Counter()
  for b in sft_batches(TINY, config, sft, seed=0, shard_index=0, shard_count=1):
    assert b['input_ids'].shape[1] == limit
    for row in range(len(b['input_ids'])):
      valid, labels = b['attention_mask'][row], b['labels'][row]
      if not b['example_mask'][row]:
        got['dropped'] += 1
        assert valid.sum() == 1 and np.all(labels == -100) and not b['truncated'][row]
      elif b['truncated'][row]:
        got['truncated'] += 1
        assert valid.all() and np.any(labels != -100)
      else:
        got['kept'] += 1
  assert got == expected
  if overlong == 'drop':   # by default, a stage that drops this many records refuses to start
    refuse = dataclasses.replace(config, max_dropped_fraction=0.01)
    with pytest.raises(UserError, match=rf"{expected['dropped']} of {sum(expected.values())} "
                       r'records .* would train nothing: .* longer than the largest length '
                       rf'bucket {limit} .*max_dropped_fraction=0.01 \(\S+\.array_record'):
      next(iter(sft_batches(TINY, refuse, sft, seed=0, shard_index=0, shard_count=1)))


@pytest.mark.parametrize('shared_prompt', [True, False])
def test_preference_pairs_share_prompt_and_media_and_carry_reference_logps(data, tmp_path,
                                                                           shared_prompt):
  _, pref, _ = data
  config = dataclasses.replace(BASE, batch_size=2, num_epochs=1, shuffle=False,
                               shared_prompt=shared_prompt)
  rows_per_pair = 1 if shared_prompt else 2
  with pytest.raises(records.RecordError, match=r"record 'demo-\d+#0': field 'ref_chosen_logps'"):
    next(preference_batches(TINY, config, pref, seed=0, shard_index=0, shard_count=1))

  # The reference pass: every pair once over two processes, padded to whole batches.
  logps, seen = {}, []
  for process in range(2):
    for b in datasets.reference_batches(TINY, config, pref, shard_index=process, shard_count=2):
      assert b['input_ids'].shape[0] == rows_per_pair * config.batch_size
      assert b['pair_index'].shape == (config.batch_size,)
      for pair, index in enumerate(b['pair_index']):
        assert np.all(b['example_mask'].reshape(-1, rows_per_pair)[pair] == (index >= 0))
        if index >= 0:
          seen.append(int(index))
          # A stand-in for the reference model: any number that identifies the pair.
          logps[int(index)] = (-float(index) - 0.5, -float(index) - 100.0)
  assert sorted(seen) == list(range(NUM_CLIPS))
  filled = [str(tmp_path / pathlib.Path(p).name) for p in pref]
  records.fill_reference_logps(pref, logps, key='index', out_dir=str(tmp_path))

  pairs = list(records.iter_records(filled))
  batches = list(preference_batches(TINY, config, filled, seed=0, shard_index=0,
                                             shard_count=1))
  assert len(batches) == NUM_CLIPS // config.batch_size
  for k, b in enumerate(batches):
    for pair in range(config.batch_size):
      record = pairs[k * config.batch_size + pair]   # shuffle=False: file order
      n_prompt = len(record['prompt_ids'])
      for answer, side in ((CHOSEN, 'chosen'), (REJECTED, 'rejected')):
        row = pair if shared_prompt else 2 * pair + answer - CHOSEN
        # The prompt and this answer: the whole row in two rows, a part of the shared one.
        sees = np.isin(b['pair_segments'][row], (1, answer))
        assert np.all(b['attention_mask'][row] == (b['pair_segments'][row] > 0))
        kept = int(sees.sum()) - n_prompt        # fewer than the answer's tokens if truncated
        assert kept > 0 and (kept < len(record[f'{side}_ids'])) <= b['truncated'][row]
        np.testing.assert_array_equal(b['input_ids'][row][sees],
                                      np.concatenate([record['prompt_ids'],
                                                      record[f'{side}_ids'][:kept]]))
        assert np.all(b['labels'][row][sees][:n_prompt] == -100)
        np.testing.assert_array_equal(b['labels'][row][sees][n_prompt:],
                                      record[f'{side}_ids'][:kept])
        np.testing.assert_array_equal(b['segments'][row][sees][n_prompt:],
                                      record[f'{side}_segments'][:kept])
      assert b['ref_chosen_logps'][pair] == np.float32(record['ref_chosen_logps'])
      assert b['ref_rejected_logps'][pair] == np.float32(record['ref_rejected_logps'])
    # A pair's media are in its rows' shard (and once per pair in the shared layout).
    assert b['audio']['chunks'].shape[0] == config.num_data_shards
  assert batches[0]['ref_chosen_logps'].dtype == np.float32


def test_orbax_checkpoint_restores_the_iterator(data, tmp_path):
  """The trainer's checkpoints (Orbax + grain.checkpoint) carry the iterator position."""
  from saber_jax.train import checkpoint
  sft, _, _ = data
  make = lambda: sft_batches(TINY, BASE, sft, seed=4, shard_index=0, shard_count=1)
  running = make()
  _take(running, 2)
  state = {'w': jax.numpy.ones(3)}
  manager = checkpoint.manager(str(tmp_path), keep=1, every_steps=1, async_save=False)
  checkpoint.save(manager, 2, state, running, force=True)
  manager.wait_until_finished()
  want = next(running)
  resumed = make()
  checkpoint.restore(manager, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state), resumed)
  manager.close()
  _assert_batches_equal(next(resumed), want)


def _join_processes(batches):
  """One batch from the same step's batches of processes 0, 1, ... (rows in process order)."""
  def join(path, *xs):
    key = getattr(path[-1], 'key', None)
    if key == FILL:   # global already: every process has the same
      assert all(np.array_equal(x, xs[0]) for x in xs)
      return xs[0]
    return np.concatenate(xs, axis=1 if key == 'position_ids' else 0)
  return jax.tree_util.tree_map_with_path(join, *batches)


@pytest.fixture(scope='module')
def filled(data, tmp_path_factory):
  """The preference shards with (arbitrary) reference log-probs filled in."""
  out = tmp_path_factory.mktemp('filled')
  records.fill_reference_logps(data[1], {i: (-1.0 - i, -2.0 - i) for i in range(NUM_CLIPS)},
                               key='index', out_dir=str(out))
  return [str(out / pathlib.Path(p).name) for p in data[1]]


@pytest.mark.parametrize('kind', ['sft', 'preference'])
def test_global_batches_are_the_same_for_1_2_4_processes_and_0_2_workers(data, filled, kind):
  make = sft_batches if kind == 'sft' else preference_batches
  paths = data[0] if kind == 'sft' else filled
  # 4 examples and 4 data shards per global batch, however many processes.
  config = dataclasses.replace(BASE, num_epochs=1, group_batches=2)
  one = list(make(TINY, dataclasses.replace(config, batch_size=4, num_data_shards=4), paths,
                  seed=3, shard_index=0, shard_count=1))
  assert len(one) == NUM_CLIPS // 4
  for count, workers in ((2, 0), (4, 0), (2, 2)):
    per = dataclasses.replace(config, batch_size=4 // count, num_data_shards=4 // count,
                              worker_count=workers)
    parts = [list(make(TINY, per, paths, seed=3, shard_index=p, shard_count=count))
             for p in range(count)]
    assert all(len(p) == len(one) for p in parts)
    for step, batch in enumerate(one):
      _assert_batches_equal(_join_processes([p[step] for p in parts]), batch)


def test_the_planned_fill_counts_what_the_batches_hold(data):
  sft, _, _ = data
  for batch in sft_batches(TINY, dataclasses.replace(BASE, num_epochs=1), sft, seed=0,
                                    shard_index=0, shard_count=1):
    audio, vision = batch['audio'], batch['vision']
    mel = audio['chunk_lengths']
    chunk = 2 * TINY.audio.n_window
    assert batch[FILL].tolist() == [
        batch['attention_mask'].sum(), batch['attention_mask'].size,
        mel.sum() + vision['patch_mask'].sum(), mel.size * chunk + vision['patch_mask'].size]


def test_stale_size_index_is_caught_by_collate(data, tmp_path):
  sft, _, _ = data
  copy = [str(tmp_path / pathlib.Path(p).name) for p in sft]
  for src, dst in zip(sft, copy):
    records.write_records(dst, (b for _, b in records.read_records(src)))
  sizes = records.load_sizes(copy[0])
  sizes[:, records.SIZE_FIELDS.index('video_frames')] = 1   # an index that lies
  with np.load(records.sizes_path(copy[0])) as index:
    kept = {k: index[k] for k in ('ids', 'digests', 'fingerprint')}
  np.savez(records.sizes_path(copy[0]), sizes=sizes, fields=np.array(records.SIZE_FIELDS),
           **kept)
  with pytest.raises(records.RecordError, match='size index does not match'):
    list(sft_batches(TINY, dataclasses.replace(BASE, num_epochs=1, batch_size=6,
                                                        num_data_shards=1),
                              copy, seed=0, shard_index=0, shard_count=1))


@pytest.mark.parametrize('cut', ['frames', 'input_features', 'no_frames'])
def test_a_record_with_cut_media_fails_naming_the_id_and_field(data, tmp_path, cut):
  sft, _, _ = data
  record = next(records.iter_records(sft[0]))
  if cut == 'frames':          # 2 of its frames kept, the placeholders of all of them
    record['frames'] = record['frames'][:2]
  elif cut == 'input_features':
    record['input_features'] = record['input_features'][:, :record['input_features'].shape[1] // 2]
  else:
    del record['frames'], record['video_fps']
    record['use_audio_in_video'] = False
  path = str(tmp_path / records.shard_name('cut', 0, 1))
  records.write_records(path, [records.pack(records.validate_record(record))])  # schema-valid
  field = 'frames' if cut == 'no_frames' else cut
  what = 'audio' if cut == 'input_features' else 'video'
  with pytest.raises(records.RecordError, match=re.escape(f'{path}:0: record {record["id"]!r}: '
                                                          f'field {field!r}: the prompt has ')
                     + rf'\d+ {what} tokens \(placeholders\), its {field} .* make \d+'):
    next(sft_batches(TINY, dataclasses.replace(BASE, batch_size=1, num_data_shards=1,
                                               shuffle=False), [path], seed=0, shard_index=0,
                     shard_count=1))


def test_the_reference_pass_logs_a_damaged_record_and_goes_on(data, tmp_path):
  _, pref, _ = data
  copy = [str(tmp_path / pathlib.Path(p).name) for p in pref]
  for src, dst in zip(pref, copy):
    records.write_records(dst, (b for _, b in records.read_records(src)))
  raw = bytearray(pathlib.Path(copy[1]).read_bytes())
  raw[len(raw) // 3] ^= 0xFF
  pathlib.Path(copy[1]).write_bytes(bytes(raw))
  bad = []
  list(records.read_records(copy[1], on_damaged=lambda where, e: bad.append(where)))
  assert len(bad) == 1
  config = dataclasses.replace(BASE, batch_size=2, num_epochs=1, shuffle=False)
  with pytest.raises(records.RecordError, match=re.escape(bad[0]) + ': damaged record file'):
    list(datasets.reference_batches(TINY, config, copy, shard_index=0, shard_count=1))
  log = str(tmp_path / 'errors.jsonl')
  real = []
  for b in datasets.reference_batches(TINY, config, copy, shard_index=0, shard_count=1,
                                      damaged_log=log):
    mask = b['example_mask'].reshape(len(b['pair_index']), -1)[:, 0]
    real += [int(i) for i, m in zip(b['pair_index'], mask) if m]
  errors = list(files.read_jsonl(log))
  assert [e['where'] for e in errors] == bad
  assert 'damaged record file' in errors[0]['reason']
  assert sorted(real + [errors[0]['index']]) == list(range(NUM_CLIPS))
