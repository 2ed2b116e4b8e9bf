"""saber_jax.files: whole-file writes a kill cannot tear (temporary name with the pid,
renamed only when complete, removed on an error), the directory swap, durable appends and
torn-tail reads, JSONL reading and the id checks that name file, record and id."""

import multiprocessing
import os
import threading
import time

import pytest

from saber_jax import files


# ------------------------------------------------------------------------- whole files

def test_atomic_writes_leave_no_temporary_and_keep_the_old_file_on_an_error(tmp_path):
  path = tmp_path / 'deep' / 'out.json'
  files.write_json(path, {'a': 'é'})
  assert files.read_json(path) == {'a': 'é'} and 'é' in path.read_text(encoding='utf-8')
  with pytest.raises(RuntimeError):
    with files.atomic_open(path) as f:
      f.write('{"half": ')
      assert os.path.exists(files.temp_path(path))       # written beside, under the pid
      raise RuntimeError('killed mid-write')
  assert files.read_json(path) == {'a': 'é'}
  assert sorted(os.listdir(path.parent)) == ['out.json']
  assert files.temp_path(path).endswith(f'.tmp-{os.getpid()}')
  assert files.write_jsonl(tmp_path / 'r.jsonl', [{'id': 1}, {'id': 'b'}]) == 2
  assert [r['id'] for r in files.read_jsonl(tmp_path / 'r.jsonl')] == [1, 'b']
  files.write_bytes(tmp_path / 'b.bin', b'\x00\x01')
  files.write_text(tmp_path / 'b.bin', 'text')
  assert (tmp_path / 'b.bin').read_text() == 'text'
  assert sorted(os.listdir(tmp_path)) == ['b.bin', 'deep', 'r.jsonl']


def test_atomic_path_renames_what_a_writer_opened_by_name(tmp_path):
  path = tmp_path / 'shard.bin'
  with files.atomic_path(path) as tmp:
    with open(tmp, 'wb') as f:
      f.write(b'whole')
    assert not path.exists()
  assert path.read_bytes() == b'whole'
  with pytest.raises(ValueError):
    with files.atomic_path(path) as tmp:
      open(tmp, 'wb').close()
      raise ValueError('writer failed')
  assert path.read_bytes() == b'whole' and os.listdir(tmp_path) == ['shard.bin']


def test_replace_dir_swaps_whole_and_carries_over_what_it_is_told(tmp_path):
  out = tmp_path / 'export'

  def fill(names):
    return lambda tmp: [open(os.path.join(tmp, n), 'w').close() for n in names]
  files.replace_dir(out, fill(['a.safetensors', 'b.safetensors']))
  (out / 'tokenizer.json').write_text('{}')
  files.replace_dir(out, fill(['model.safetensors']),
                    carry_over=lambda name: not name.endswith('.safetensors'))
  assert sorted(os.listdir(out)) == ['model.safetensors', 'tokenizer.json']
  with pytest.raises(OSError):
    files.replace_dir(out, lambda tmp: (_ for _ in ()).throw(OSError('disk full')))
  assert sorted(os.listdir(out)) == ['model.safetensors', 'tokenizer.json']
  assert sorted(os.listdir(tmp_path)) == ['export']        # no temporary left beside it


# ------------------------------------------------------------------- append-only files

def _append_forever(path):
  while True:
    files.append_jsonl(path, [{'id': i, 'pad': 'x' * 4000} for i in range(8)])


def test_append_jsonl_killed_mid_run_leaves_whole_lines_in_order(tmp_path):
  """SIGKILL during appends: the file reads back as whole lines in write order and at most
  one torn tail, which repair_tail cuts. (A 32 KB write can itself be cut short by SIGKILL
  -- Linux checks fatal signals between the pages it copies -- so a killed batch may leave
  some of its lines: they are whole records, and a resumed run skips exactly those ids.)"""
  path = str(tmp_path / 'part0')
  files.append_jsonl(path, [])
  assert not os.path.exists(path)                          # nothing to write, no file
  process = multiprocessing.get_context('spawn').Process(target=_append_forever, args=(path,))
  process.start()
  deadline = time.time() + 60
  while (not os.path.exists(path) or os.path.getsize(path) < 200_000) and time.time() < deadline:
    time.sleep(0.001)
  process.kill()
  process.join()
  lines = list(files.read_whole_lines(path))
  assert len(lines) >= 8 and [r['id'] for r in lines] == [i % 8 for i in range(len(lines))]
  files.repair_tail(path)
  assert list(files.read_jsonl(path)) == lines              # only a torn tail was cut


def test_repair_tail_drops_only_an_unterminated_line(tmp_path):
  path = str(tmp_path / 'out.jsonl')
  with open(path, 'w') as f:
    f.write('{"id": "a"}\n{"id": "b"}\n{"id": "c", "x": ')
  assert files.repair_tail(path) == len('{"id": "c", "x": ')
  assert [r['id'] for r in files.read_jsonl(path)] == ['a', 'b']
  assert files.repair_tail(path) == 0
  with open(path, 'w') as f:
    f.write('{"id": "only", "half')
  files.repair_tail(path)
  assert os.path.getsize(path) == 0


def test_read_jsonl_names_file_and_line(tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"id": 1}\n\nnot json\n')
  with pytest.raises(ValueError, match=r'bad.jsonl:3: not valid JSON'):
    list(files.read_jsonl(str(path)))
  path.write_text('[1]\n')
  with pytest.raises(ValueError, match=r'bad.jsonl:1: expected a JSON object'):
    list(files.read_jsonl(str(path)))


def test_appender_writes_whole_lines_from_many_threads(tmp_path):
  path = str(tmp_path / 'out.jsonl')
  with files.JsonlAppender(path) as out:
    threads = [threading.Thread(target=lambda t=t: [out.append({'id': f'{t}-{i}', 'pad': 'x' * 500})
                                                      for i in range(20)]) for t in range(4)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  ids = [r['id'] for r in files.read_jsonl(path)]
  assert len(ids) == 80 and len(set(ids)) == 80


# ------------------------------------------------------------------------------ records

def test_ids_are_checked_naming_file_record_and_id(tmp_path):
  path = tmp_path / 'in.jsonl'
  path.write_text('{"id": "a", "x": 1}\n{"id": 2}\n\n{"id": "a"}\n')
  # Several records of one id only where the reader asks for them (pairs of one clip).
  assert [rid for rid, _ in files.records_with_ids(path, unique=False)] == ['a', '2', 'a']
  with pytest.raises(files.DuplicateId, match=r"in.jsonl: duplicate id 'a' \(records 1 and 3\)"):
    files.check_unique_ids(path)
  # Two different records of one id: refused before the first record is handed out.
  for read in (lambda: next(files.records_with_ids(path)), lambda: files.load_by_id(path),
               lambda: files.load_by_id(path, ids={'2'})):
    with pytest.raises(files.DuplicateId,
                       match=r"in.jsonl: duplicate id 'a' \(records 1 and 3 differ\)"):
      read()
  # The same record twice (a file concatenated with itself): kept once, counted.
  path.write_text('{"id": "a", "x": 1}\n{"id": 2}\n{"x": 1, "id": "a"}\n{"id": 2}\n')
  assert files.repeated_lines(path) == {3, 4}
  assert [rid for rid, _ in files.records_with_ids(path)] == ['a', '2']
  assert files.load_by_id(path, ids={'2'}) == {'2': {'id': 2}}
  with pytest.raises(ValueError, match=r"in.jsonl: record 'a' has no 'y' field"):
    files.load_by_id(path, required=('y',))
  with pytest.raises(files.DuplicateId, match=r"duplicate id 'a' \(records 1 and 3\)"):
    files.check_unique_ids(path)       # a judged run's input: every line would be judged
  path.write_text('{"id": "a"}\n{"name": "no id"}\n')
  with pytest.raises(ValueError, match=r"in.jsonl record 2: record has no 'id' field"):
    files.check_unique_ids(path)


def test_sharding_by_line_splits_every_item_once():
  shards = [list(files.sharded(range(10), i, 3)) for i in range(3)]
  assert sorted(sum(shards, [])) == list(range(10))
  assert [len(s) for s in shards] == [files.shard_size(10, i, 3) for i in range(3)]
  with pytest.raises(ValueError, match=r'shard index must be in \[0, 3\), got 3'):
    list(files.sharded(range(10), 3, 3))


# ------------------------------------------------------------------------------ locks

_HOLD = '''
import sys, time
from saber_jax import files
files.acquire_lock(sys.argv[1], 'the output')
print('held', flush=True)
time.sleep(float(sys.argv[2]))
'''

_TRY = '''
import sys
from saber_jax import files
try:
  files.acquire_lock(sys.argv[1], 'the output')
except files.LockHeld as e:
  raise SystemExit(f'error: {e}')
print('got it', flush=True)
'''


def _python(code, *args, **kwargs):
  import subprocess
  import sys
  return subprocess.Popen([sys.executable, '-c', code, *map(str, args)], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_a_second_writer_exits_at_once_naming_the_holder(tmp_path):
  lock = str(tmp_path / 'out' / 'fingerprint.json.lock')
  holder = _python(_HOLD, lock, 60)
  try:
    assert holder.stdout.readline() == 'held\n'
    held = files._holder(lock)
    assert held['pid'] == holder.pid and held['host'] and held['since'] and held['argv']
    second = _python(_TRY, lock)
    _, err = second.communicate(timeout=60)
    assert second.returncode == 1
    assert f'the output is being written by pid {holder.pid} on ' in err and lock in err
  finally:
    holder.kill()
    holder.wait()
  # The holder was killed (SIGKILL: no cleanup): its lock is stale, named and taken over.
  assert files._holder(lock)['pid'] == holder.pid
  third = _python(_TRY, lock)
  out, err = third.communicate(timeout=60)
  assert third.returncode == 0 and out == 'got it\n'
  assert f'taking over the stale lock of pid {holder.pid}' in err
  assert not os.path.exists(lock)        # released when the taker exited
  # A lock copied with its output folder (`cp -r` of a running run's workdir) is not held.
  holder = _python(_HOLD, lock, 60)
  try:
    assert holder.stdout.readline() == 'held\n'
    copy = str(tmp_path / 'copy' / 'fingerprint.json.lock')
    os.makedirs(os.path.dirname(copy))
    with open(lock, 'rb') as src, open(copy, 'wb') as dst:
      dst.write(src.read())
    fourth = _python(_TRY, copy)
    out, err = fourth.communicate(timeout=60)
    assert fourth.returncode == 0 and f'replacing a lock copied from {lock}' in err
  finally:
    holder.kill()
    holder.wait()


def test_lock_is_shared_by_its_process_and_children_and_released_by_the_last_claim(tmp_path):
  lock = str(tmp_path / 'x.lock')
  files.acquire_lock(lock)
  files.acquire_lock(lock)
  child = _python(_TRY, lock)                 # a child of the holder works for it
  assert child.communicate(timeout=60)[0] == 'got it\n' and child.returncode == 0
  files.release_lock(lock)
  assert files._holder(lock)['pid'] == os.getpid()
  files.release_lock(lock)
  assert not os.path.exists(lock)
  with files.locked(lock):
    assert os.path.exists(lock)
  assert not os.path.exists(lock)


_ENSURE = '''
import os, sys, time
from saber_jax import fingerprint
path, settings, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))
try:
  fingerprint.ensure(path, {'settings': settings}, hold=False, overwrite=False, clear=None,
                     has_output=lambda: os.path.exists(path))
except fingerprint.Mismatch as e:
  raise SystemExit('mismatch')
print('claimed', flush=True)
'''


def test_runs_started_together_with_other_settings_never_both_claim_an_output(tmp_path):
  """preprocess's shard runs: the fingerprint check-and-write happens under the lock."""
  for attempt in range(3):
    path = str(tmp_path / str(attempt) / 'fingerprint.json')
    start = time.time() + 3
    runs = [_python(_ENSURE, path, settings, start) for settings in ('a', 'b', 'a')]
    results = [(p.communicate(timeout=120), p.returncode) for p in runs]
    claimed = [r for (out, _), r in results if out == 'claimed\n']
    assert len(claimed) in (1, 2), results          # never both settings
    winner = files.read_json(path)['settings']
    assert len(claimed) == (2 if winner == 'a' else 1), results
    assert not os.path.exists(path + files.LOCK_SUFFIX)


# ------------------------------------------------------------------- gs:// (the emulator)

def test_whole_file_functions_open_gs_urls_and_make_no_local_gs_folder(gcs, tmp_path,
                                                                         monkeypatch):
  monkeypatch.chdir(tmp_path)
  root = 'gs://runs/files'
  files.write_json(f'{root}/a/x.json', {'a': 'é'})
  files.write_text(f'{root}/a/t.txt', 'text\n')
  assert files.write_jsonl(f'{root}/r.jsonl', [{'id': 1}, {'id': 'b'}]) == 2
  assert files.read_json(f'{root}/a/x.json') == {'a': 'é'}
  assert files.read_text(f'{root}/a/t.txt') == 'text\n'
  assert [r['id'] for r in files.read_jsonl(f'{root}/r.jsonl')] == [1, 'b']
  assert files.exists(f'{root}/a/x.json') and not files.exists(f'{root}/nothing')
  assert files.is_dir(f'{root}/a') and files.listdir(f'{root}/a') == ['t.txt', 'x.json']
  assert files.listdir(f'{root}/nothing') == []
  identity = files.tree_identity(f'{root}/a')
  assert [i['path'] for i in identity] == [f'{root}/a/t.txt', f'{root}/a/x.json']
  assert identity[0]['size'] == 5
  # An error inside a write leaves the old object.
  with pytest.raises(RuntimeError):
    with files.atomic_open(f'{root}/a/x.json') as f:
      f.write('{"half": ')
      raise RuntimeError('killed mid-write')
  assert files.read_json(f'{root}/a/x.json') == {'a': 'é'}
  # Directories up and down, and a directory replaced whole (carrying one entry over).
  (tmp_path / 'up' / 'sub').mkdir(parents=True)
  (tmp_path / 'up' / 'sub' / 'f.bin').write_bytes(b'\0\1')
  files.upload(str(tmp_path / 'up'), f'{root}/up')
  assert files.download(f'{root}/up', str(tmp_path / 'down'))
  assert (tmp_path / 'down' / 'sub' / 'f.bin').read_bytes() == b'\0\1'
  assert not files.download(f'{root}/none', str(tmp_path / 'none'))

  def fill(directory):
    with open(os.path.join(directory, 'new.txt'), 'w') as f:
      f.write('new')
  files.replace_dir(f'{root}/a', fill, carry_over=lambda name: name == 't.txt')
  assert files.listdir(f'{root}/a') == ['new.txt', 't.txt']
  files.rmtree(f'{root}/a')
  assert not files.exists(f'{root}/a/new.txt')
  assert files.absolute(f'{root}/a') == f'{root}/a'
  assert not (tmp_path / 'gs:').exists()


def test_with_prefix_sees_objects_another_host_wrote_and_remove_takes_files_or_objects(
    gcs, tmp_path):
  import gcsfs
  root = 'gs://runs/prefix'
  files.write_text(f'{root}/out.jsonl', 'a\n')
  files.write_text(f'{root}/out.jsonl.part0.1', 'b\n')
  files.write_text(f'{root}/other.jsonl.part0', 'c\n')
  assert files.listdir(root) == ['other.jsonl.part0', 'out.jsonl', 'out.jsonl.part0.1']
  # Another host's client (its own listing cache) writes: this one's cached folder listing
  # misses the object, the prefix listing does not.
  gcsfs.GCSFileSystem(skip_instance_cache=True).pipe('runs/prefix/out.jsonl.part1.2', b'd\n')
  assert 'out.jsonl.part1.2' not in files.listdir(root)
  assert files.with_prefix(f'{root}/out.jsonl.part') == [f'{root}/out.jsonl.part0.1',
                                                         f'{root}/out.jsonl.part1.2']
  assert files.with_prefix(f'{root}/none') == []
  files.remove(f'{root}/out.jsonl.part0.1')
  files.remove(f'{root}/out.jsonl.part0.1')                 # gone already: nothing
  assert files.with_prefix(f'{root}/out.jsonl.') == [f'{root}/out.jsonl.part1.2']
  # Locally the same, with glob's special characters taken literally.
  for name in ('a[1].jsonl', 'a[1].jsonl.part0', 'a1.jsonl.part0'):
    (tmp_path / name).write_text('x\n')
  assert files.with_prefix(tmp_path / 'a[1].jsonl.') == [str(tmp_path / 'a[1].jsonl.part0')]
  files.remove(tmp_path / 'a[1].jsonl.part0')
  files.remove(tmp_path / 'a[1].jsonl.part0')
  assert files.with_prefix(tmp_path / 'a[1]') == [str(tmp_path / 'a[1].jsonl')]
