"""`mode=generate` at scale (saber_jax/generate.py) over real preprocessed records: one
compilation per bucket used, each id written once, samples that depend only on (seed,
id, j) whatever the batch size, bucket, mesh or resume point, a torn tail repaired, bad
records and failing prompts isolated in errors.jsonl, rows sharded over the devices."""

import importlib.util
import json
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest

from hf_reference import make_batch, tiny_hf_config
from processes import cpu_env, free_port
from saber_jax import decode, files, generate, sharding, weights
from saber_jax.data import collate, prompt, records
from saber_jax.models import ThinkerConfig, abstract_params, model_inputs

ROOT = pathlib.Path(__file__).resolve().parents[1]
from saber_jax.cli import make_demo_data, preprocess  # noqa: E402

NUM_CLIPS = 24


def demo_config():
  spec = importlib.util.spec_from_file_location('demo_config', ROOT / 'configs' / 'demo.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def sampling_config(buckets='many'):
  """The demo config (tiny thinker) sampling k=3 short responses at T=0.8. 'many': two
  length buckets and a low audio floor, so the clips fall in several buckets; 'one': the
  demo's one shape that fits every clip."""
  c = demo_config()
  c.mode = 'generate'
  g = c.generate
  g.num_samples, g.max_new_tokens, g.temperature, g.window_batches = 3, 6, 0.8, 4
  if buckets == 'many':
    c.data.length_buckets = (224, 288)
    c.data.min_audio_chunks = 2
  else:
    c.data.length_buckets = (288,)
  return c


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """Record shard paths: 24 demo clips (184-278 prompt tokens, 4 or 6 frames, 1.6-3.8 s of
  audio), then a shard with a record whose audio placeholders are one short (fails when
  its batch is built) and bytes that are no record."""
  root = tmp_path_factory.mktemp('sampling')
  manifest, labels = make_demo_data.make_demo_data(str(root / 'clips'), n=NUM_CLIPS, seed=5)
  preprocess.main(['--manifest', manifest, '--annotations', labels, '--out', str(root / 'sft'),
                   '--quiet'])
  paths = records.shard_paths(str(root / 'sft' / 'sft'))
  broken = next(records.iter_records(paths))
  audio = np.flatnonzero(broken['input_ids'] == ThinkerConfig.tiny().audio_token_id)[0]
  for field in ('input_ids', 'labels', 'segments'):
    broken[field] = np.delete(broken[field], audio)
  broken['id'] = 'broken-audio'
  extra = str(root / 'extra.array_record')
  # Written without `write_records`, which indexes every record and so refuses the bytes.
  writer = records._array_record().ArrayRecordWriter(extra, records.WRITER_OPTIONS)
  for blob in (records.pack(broken), b'not a record'):
    writer.write(blob)
  writer.close()
  return paths + [extra]


@pytest.fixture(scope='module')
def tokenizer():
  return prompt.load_tokenizer()


def run(config, paths, out_dir, devices=1, mesh_shape=(-1, 1, 1), batch_size=5):
  """sample_records on the first `devices` devices -> ({id: line}, stats)."""
  config.generate.batch_size = batch_size
  model_config = weights.model_config_of(config)
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:devices])
  params = weights.initial_params(config, model_config, mesh, '')
  out = pathlib.Path(out_dir) / 'predictions.jsonl'
  out.parent.mkdir(parents=True, exist_ok=True)
  _, stats = generate.sample_records(config, model_config, params, mesh, paths, str(out),
                                     prompt.load_tokenizer())
  generate.merge_outputs(str(out))
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  by_id = {line['id']: line for line in lines}
  assert len(by_id) == len(lines), 'an id was written twice'
  return by_id, stats


def assert_same_samples(got, want):
  assert sorted(got) == sorted(want)
  for i in want:
    for field in ('responses', 'finished', 'num_tokens'):
      assert got[i][field] == want[i][field], (i, field)
    np.testing.assert_allclose(got[i]['logprob'], want[i]['logprob'], rtol=1e-4, err_msg=i)


@pytest.fixture(scope='module')
def reference(data, tmp_path_factory):
  """Batch 5 on one device over several buckets: (lines by id, stats, out dir, compilations)."""
  before = decode.generate_inputs._cache_size()
  out = tmp_path_factory.mktemp('reference')
  lines, stats = run(sampling_config('many'), data, out)
  return lines, stats, out, decode.generate_inputs._cache_size() - before


@pytest.mark.slow
def test_each_bucket_compiles_once_and_each_id_is_written_once(data, reference):
  lines, stats, out, compilations = reference
  good = sorted(r['id'] for r in records.iter_records(data[:-1]))
  assert sorted(lines) == good and len(good) == NUM_CLIPS
  assert len({s[0] for s in stats.shapes}) == 2 and len(stats.shapes) >= 3   # really bucketed
  assert compilations <= len(stats.shapes)
  for line in lines.values():
    assert len(line['responses']) == len(line['finished']) == len(line['logprob']) == 3
    assert line['response'] == line['responses'][0]
    assert all(0 < n <= 6 for n in line['num_tokens']) and all(lp < 0 for lp in line['logprob'])
    assert len(set(line['responses'])) > 1                       # k different samples
  errors = [json.loads(line) for line in (out / 'errors.jsonl').read_text().splitlines()]
  errors = {e['id']: e for e in errors}
  assert sorted(errors, key=str) == [None, 'broken-audio']
  assert 'audio tokens' in errors['broken-audio']['reason']       # its batch was split to it
  assert errors[None]['where'].endswith('extra.array_record:1')
  assert stats.errors == 2 and stats.written == NUM_CLIPS


@pytest.mark.slow
@pytest.mark.parametrize('devices, mesh_shape, batch_size', [
    (1, (-1, 1, 1), 2), (8, (-1, 1, 1), 8), (8, (1, -1, 1), 8)])
def test_samples_do_not_depend_on_batch_bucket_or_mesh(data, reference, tmp_path, devices,
                                                       mesh_shape, batch_size):
  want, _, _, _ = reference
  got, stats = run(sampling_config('one'), data, tmp_path, devices, mesh_shape, batch_size)
  assert len(stats.shapes) == 1
  assert_same_samples(got, want)


@pytest.mark.slow
def test_resume_repairs_a_torn_tail_and_skips_finished_ids(data, reference, tmp_path):
  want, _, reference_dir, _ = reference
  ids = sorted(want)
  part = tmp_path / 'predictions.jsonl.part0'
  done = [json.dumps(want[i]) + '\n' for i in ids[:10]]
  part.write_text(''.join(done) + json.dumps(want[ids[10]])[:40])      # killed mid-write
  (tmp_path / 'errors.jsonl').write_text((reference_dir / 'errors.jsonl').read_text())
  got, stats = run(sampling_config('one'), data, tmp_path, batch_size=2)
  # Skipped: the 10 done, and the two records given up on (by id, and by place when
  # unreadable).
  assert stats.skipped == 12 and stats.written == NUM_CLIPS - 10 and stats.errors == 0
  assert_same_samples(got, want)


def test_torn_tail_is_cut_and_finished_ids_read_every_part(tmp_path):
  out = tmp_path / 'predictions.jsonl'
  out.write_text('{"id": "a"}\n')
  (tmp_path / 'predictions.jsonl.part0').write_text('{"id": "b"}\n{"id": "c"')
  (tmp_path / 'predictions.jsonl.part1').write_text('{"id": "c"}\n{"id": "a"}\nnot json\n')
  (tmp_path / 'errors.jsonl').write_text('{"id": "d", "reason": "x"}\n')
  # Each process logs its errors in its own part; one without an id is keyed by place.
  (tmp_path / 'errors.jsonl.part0').write_text('{"id": null, "where": "f:3"}\n'
                                               '{"id": "e", "where": "f:4"}\n')
  (tmp_path / 'errors.jsonl.part1.7').write_text('{"id": null, "where": "f:3"}\n'
                                                 '{"id": "d", "where": "f:1"}\n')
  assert generate.finished_ids(str(out)) == {'a', 'b', 'c', 'd', 'e', 'f:3'}
  assert files.repair_tail(str(tmp_path / 'predictions.jsonl.part0')) == len('{"id": "c"')
  assert (tmp_path / 'predictions.jsonl.part0').read_text() == '{"id": "b"}\n'
  assert generate.merge_outputs(str(out)) == 3
  assert out.read_text() == '{"id": "a"}\n{"id": "b"}\n{"id": "c"}\n'
  assert (tmp_path / 'errors.jsonl').read_text() == (
      '{"id": "d", "reason": "x"}\n{"id": null, "where": "f:3"}\n{"id": "e", "where": "f:4"}\n')
  assert not list(tmp_path.glob('*.part*'))
  # No error anywhere: no errors.jsonl.
  (tmp_path / 'errors.jsonl').unlink()
  assert generate.merge_outputs(str(out)) == 3 and not (tmp_path / 'errors.jsonl').exists()


@pytest.mark.parametrize('mesh_shape', [(-1, 1, 1), (1, -1, 1)])
def test_rows_shard_over_eight_devices_a_quarter_of_the_flops_or_less(mesh_shape):
  """The compiled generation (prefill + decode loop) of 8 prompts x 2 samples: per-device
  FLOPs on 8 devices <= 1/4 of one device's, the rows and KV cache split, not replicated,
  and no all-reduce of logits (FSDP gathers the weights instead)."""
  vocab = 4096
  config = ThinkerConfig.from_hf(tiny_hf_config(vocab_size=vocab).to_dict())
  batch = make_batch([[('text', 5 + i)] for i in range(8)])
  inputs = model_inputs(config, collate.left_pad(batch, None, decode.PAD_TOKEN_ID))
  first = decode.first_new_positions(inputs['position_ids'], inputs['attention_mask'])
  settings = decode.DecodeSettings(8, temperature=0.8, num_samples=2, eos_token_ids=(),
                                     pad_token_id=0)

  def flops(mesh):
    boxed = abstract_params(config)
    params = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
                          nn.unbox(boxed), sharding.tree_shardings(boxed, mesh))
    placed = sharding.global_batch(dict(inputs=inputs, first=first,
                                        streams=np.arange(8, dtype=np.uint32)), mesh)
    with jax.set_mesh(mesh):
      compiled = decode.generate_inputs.lower(config, settings, params, placed['inputs'],
                                                placed['first'], jax.random.key(0),
                                                placed['streams']).compile()
    return compiled.cost_analysis()['flops'], compiled.as_text()

  one, _ = flops(sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
  eight, hlo = flops(sharding.make_mesh(mesh_shape))
  assert eight <= one / 4, (one, eight)
  reduced = re.findall(r'= (\S+) all-reduce\(', hlo)
  assert reduced and not [shape for shape in reduced if f',{vocab}]' in shape], reduced


def _launch(workdir, records_prefix, port):
  """Two `python -m saber_jax.main` processes of 4 CPU devices, one jax.distributed job."""
  env = cpu_env(4)
  args = ['--config=configs/demo.py', '--config.mode=generate', f'--config.workdir={workdir}',
          f'--config.generate.records={records_prefix}', '--config.generate.num_samples=3',
          '--config.generate.max_new_tokens=6', '--config.generate.temperature=0.8',
          '--config.generate.batch_size=4', '--config.generate.window_batches=2',
          '--config.data.length_buckets=(288,)', '--config.mesh=(-1,1,1)',
          f'--config.distributed.coordinator_address=127.0.0.1:{port}',
          '--config.distributed.num_processes=2']
  return [subprocess.Popen([sys.executable, '-m', 'saber_jax.main', *args,
                            f'--config.distributed.process_id={i}'], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(2)]


@pytest.mark.slow
def test_two_processes_stopped_by_sigterm_and_restarted_write_each_id_once_with_the_same_samples(
    data, reference, tmp_path):
  want, _, _, _ = reference
  prefix = str(pathlib.Path(data[0]).parent / 'sft')
  # Stopped by SIGTERM to one process once the first batch is on disk: both finish the
  # batch in flight, fsync it, leave the parts unmerged and exit 0; then run to the end.
  processes = _launch(tmp_path, prefix, free_port())
  deadline = time.time() + 400
  while not any(p.stat().st_size for p in tmp_path.glob('predictions.jsonl.part*')) \
      and all(p.poll() is None for p in processes) and time.time() < deadline:
    time.sleep(0.05)
  assert all(p.poll() is None for p in processes), processes[0].communicate()[0][-3000:]
  processes[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  for p, out in zip(processes, outputs):
    assert p.returncode == 0 and '[generate] stopped after' in out, out[-4000:]
  assert not (tmp_path / 'predictions.jsonl').exists()
  before = sum(len(list(files.read_whole_lines(str(p))))
               for p in tmp_path.glob('predictions.jsonl.part*'))
  processes = _launch(tmp_path, prefix, free_port())
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  for p, out in zip(processes, outputs):
    assert p.returncode == 0, out[-4000:]
  written = [int(re.search(r'process \d: (\d+) prompts', out).group(1)) for out in outputs]
  assert before >= 1 and sum(written) == NUM_CLIPS - before      # nothing done twice
  assert not list(tmp_path.glob('*.part*'))
  lines = [json.loads(line) for line in (tmp_path / 'predictions.jsonl').read_text().splitlines()]
  got = {line['id']: line for line in lines}
  assert len(got) == len(lines)
  assert_same_samples(got, want)


@pytest.mark.slow
def test_gs_workdir_stopped_and_restarted_merges_in_the_bucket_like_a_local_run(
    data, reference, gcs, tmp_path):
  """`mode=generate` in gs://runs/gen: each batch's lines uploaded as a new part object
  (upload_every=1); SIGTERM once the first is there, restart in a fresh staging directory:
  the bucket ends with the reference's lines and errors, each once, and no part objects."""
  want, _, reference_dir, _ = reference
  # The good shards and the damaged one under one prefix, as a command line names them.
  prefix = tmp_path / 'records' / 'mix'
  prefix.parent.mkdir()
  for i, path in enumerate(data):
    shutil.copy(path, records.shard_name(str(prefix), i, len(data)))
  workdir = 'gs://runs/gen'
  args = [sys.executable, '-m', 'saber_jax.main', '--config=configs/demo.py',
          '--config.mode=generate', f'--config.workdir={workdir}',
          f'--config.generate.records={prefix}', '--config.generate.num_samples=3',
          '--config.generate.max_new_tokens=6', '--config.generate.temperature=0.8',
          '--config.generate.batch_size=2', '--config.generate.window_batches=4',
          '--config.generate.upload_every=1', '--config.data.length_buckets=(288,)']
  env = {**cpu_env(1), **gcs}
  process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 400
  while not files.with_prefix(f'{workdir}/predictions.jsonl.part0.') \
      and process.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert process.poll() is None, process.communicate()[0][-3000:]
  process.send_signal(signal.SIGTERM)
  first = process.communicate(timeout=300)[0]
  assert process.returncode == 0 and '[generate] stopped after' in first, first[-4000:]
  assert not files.exists(f'{workdir}/predictions.jsonl')
  uploaded = sum(len(files.read_text(p).splitlines())
                 for p in files.with_prefix(f'{workdir}/predictions.jsonl.part'))
  second = subprocess.run(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
  assert second.returncode == 0, second.stdout[-4000:]
  written = [int(re.search(r'process 0: (\d+) prompts', out).group(1))
             for out in (first, second.stdout)]
  assert 1 <= uploaded == written[0] < NUM_CLIPS and sum(written) == NUM_CLIPS   # none twice
  lines = list(files.read_jsonl(f'{workdir}/predictions.jsonl'))
  got = {line['id']: line for line in lines}
  assert len(got) == len(lines)
  assert_same_samples(got, want)
  errors = {e['id']: e for e in files.read_jsonl(f'{workdir}/errors.jsonl')}
  want_errors = {e['id']: e for e in files.read_jsonl(reference_dir / 'errors.jsonl')}
  assert sorted(errors, key=str) == sorted(want_errors, key=str) == [None, 'broken-audio']
  damaged = records.shard_name(str(prefix), len(data) - 1, len(data))
  assert [errors[i]['where'] for i in (None, 'broken-audio')] == [damaged + ':1', damaged + ':0']
  for e in (errors, want_errors):       # the reason names the place, then says what failed
    assert e['broken-audio']['reason'].startswith(e['broken-audio']['where'] + ': ')
  assert errors['broken-audio']['reason'].split(': ', 1)[1] == \
      want_errors['broken-audio']['reason'].split(': ', 1)[1]
  assert files.with_prefix(f'{workdir}/predictions.jsonl.') == []
  assert files.with_prefix(f'{workdir}/errors.jsonl.') == []
  assert not (ROOT / 'gs:').exists() and not pathlib.Path('gs:').exists()


def test_own_records_hand_damaged_records_and_shards_to_errors(data, tmp_path):
  """A shard cut short is one error naming it (process 0 only); a flipped byte is one
  error naming path:index; every other record is still read."""
  whole = data[0]
  raw = pathlib.Path(whole).read_bytes()
  cut, flip = str(tmp_path / 'cut.array_record'), str(tmp_path / 'flip.array_record')
  pathlib.Path(cut).write_bytes(raw[:len(raw) // 2])
  flipped = bytearray(raw)
  flipped[len(raw) // 3] ^= 0xFF
  pathlib.Path(flip).write_bytes(bytes(flipped))
  got = list(generate._own_records([cut, whole, flip], 0, 1))
  errors = [(w, e) for w, e in got if isinstance(e, records.RecordError)]
  assert [w for w, _ in errors][0] == cut and len(errors) == 2
  assert re.fullmatch(re.escape(flip) + r':\d+', errors[1][0])
  assert str(errors[1][1]).startswith(errors[1][0] + ': damaged record file')
  n = records.count_records(whole)
  assert len(got) == 1 + 2 * n
  assert [w for w, _ in generate._own_records([cut, whole], 1, 2)][0] != cut   # process 0 logs
  # The same shard given twice: the repeats `repeated_records` finds are skipped.
  repeats = records.repeated_records([whole, whole])
  assert repeats == list(range(n, 2 * n))
  assert len(list(generate._own_records([whole, whole], 0, 1, repeats))) == n


def test_two_records_of_one_id_are_refused_before_sampling(data, tmp_path):
  """One id, two prompts: one of them would be lost (one line per id). Refused naming both
  places before a prompt is sampled; the same shard given twice is sampled once."""
  record = next(records.iter_records(data[0]))
  record['duration'] += 1.0                                # another recording, same id
  other = str(tmp_path / records.shard_name('other', 0, 1))
  records.write_records(other, [records.pack(record)])
  config = sampling_config('one')
  config.generate.batch_size = 2
  model_config = weights.model_config_of(config)
  mesh = sharding.make_mesh((-1, 1, 1), jax.devices()[:1])
  params = abstract_params(model_config)         # never used: refused before sampling
  out = tmp_path / 'predictions.jsonl'
  with pytest.raises(records.RecordError, match=re.escape(
      f"duplicate id {record['id']!r}: {data[0]}:0 and {other}:0 hold different records")):
    generate.sample_records(config, model_config, params, mesh, [data[0], other], str(out),
                            prompt.load_tokenizer())
  assert not list(tmp_path.glob('predictions.jsonl*'))
