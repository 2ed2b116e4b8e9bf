"""Resumable outputs know what produced them: a rerun with other inputs or settings is an
error naming what differs, or starts fresh when asked to overwrite."""

import json
import os

import pytest

import processes
from saber_jax import files, fingerprint
from saber_jax.judge import runs
from saber_jax.train import config as config_lib, trainer


def test_differences_name_each_changed_field():
  old = {'judge': {'model': 'a', 'temperature': 0.0}, 'inputs': [{'size': 3}]}
  new = {'judge': {'model': 'b', 'temperature': 0.0}, 'inputs': [{'size': 4}], 'x': 1}
  assert fingerprint.differences(old, new) == [
      'inputs[0].size: 3 -> 4', 'judge.model: "a" -> "b"', 'x: "<absent>" -> 1']


def test_ensure_resumes_refuses_or_starts_fresh(tmp_path):
  path = str(tmp_path / fingerprint.FILE)
  cleared = []
  kwargs = dict(clear=lambda: cleared.append(1), overwrite=False)
  assert fingerprint.ensure(path, {'a': (1, 2)}, has_output=False, **kwargs) == 'fresh'
  assert fingerprint.ensure(path, {'a': [1, 2]}, has_output=True, **kwargs) == 'resume'
  with pytest.raises(fingerprint.Mismatch, match=r'a\[1\]: 2 -> 3\n.*--overwrite'):
    fingerprint.ensure(path, {'a': [1, 3]}, has_output=True, **kwargs)
  assert not cleared
  assert fingerprint.ensure(path, {'a': [1, 3]}, has_output=True, clear=lambda: cleared.append(1),
                            overwrite=True) == 'fresh'
  assert cleared == [1] and fingerprint.read(path) == {'a': [1, 3]}
  os.remove(path)   # output without a fingerprint: made by something unknown
  with pytest.raises(fingerprint.Mismatch, match='no fingerprint file'):
    fingerprint.ensure(path, {'a': [1, 3]}, has_output=True, **kwargs)


def test_training_workdir_reused_with_other_records_or_settings_is_refused(tmp_path):
  records = tmp_path / 'sft-00000-of-00001.arrayrecord'
  records.write_bytes(b'x' * 10)
  workdir = tmp_path / 'run' / 'sft'
  config = config_lib.base_config()
  claim = lambda c: trainer.claim_workdir(c, str(workdir), 'sft', [str(records)], None)
  claim(config)
  (workdir / 'checkpoints' / '4').mkdir(parents=True)     # the run saved a checkpoint
  claim(config)                                            # same run: resumes
  config.optim.lr = 1e-3
  with pytest.raises(fingerprint.Mismatch, match=r'optim.lr: 0.0001 -> 0.001\n.*'
                                                 r'--config.overwrite=True'):
    claim(config)
  config.optim.lr = 1e-4
  records.write_bytes(b'x' * 12)                           # clips added
  with pytest.raises(fingerprint.Mismatch, match=r'records\[0\].size: 10 -> 12'):
    claim(config)
  config.overwrite = True
  claim(config)
  assert not (workdir / 'checkpoints').exists()
  assert json.loads((workdir / fingerprint.FILE).read_text())['records'][0]['size'] == 12


def test_every_claimed_output_has_one_writer(tmp_path):
  """The lock `ensure` takes: a training stage's workdir and a judged run's output are
  refused while another live process writes them, before any work; a non-writer process
  of a multi-host run does not take it."""
  records = tmp_path / 'sft-00000-of-00001.arrayrecord'
  records.write_bytes(b'x' * 10)
  workdir = tmp_path / 'run' / 'sft'
  config = config_lib.base_config()
  lock = str(workdir / fingerprint.FILE) + files.LOCK_SUFFIX
  with processes.held_by_another_process(lock) as pid:
    with pytest.raises(files.LockHeld, match=f'{workdir} is being written by pid {pid} on '):
      trainer.claim_workdir(config, str(workdir), 'sft', [str(records)], None)
    assert not (workdir / fingerprint.FILE).exists()
    fingerprint.ensure(str(workdir / fingerprint.FILE), {}, has_output=False, overwrite=False,
                       clear=None, writer=False)     # process 1 of a multi-host run
  trainer.claim_workdir(config, str(workdir), 'sft', [str(records)], None)   # stale: taken
  assert files._holder(lock)['pid'] == os.getpid()
  files.release_lock(lock)

  out, errors = str(tmp_path / 'o.jsonl'), str(tmp_path / 'e.jsonl')
  judged = []
  with processes.held_by_another_process(runs.fingerprint_path(out) + files.LOCK_SUFFIX) as pid:
    with pytest.raises(files.LockHeld, match=f'pid {pid}'):
      runs.run_jobs([{'id': 'a'}], judged.append, out_path=out, errors_path=errors,
                    produced_by={'judge': 'j'})
  assert judged == [] and not os.path.exists(out)
