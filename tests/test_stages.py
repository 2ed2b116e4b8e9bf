"""The reference pass stopped by SIGTERM after its first batch keeps the log-probs done,
and the restart finishes with the same records as an uninterrupted pass."""

import os
import signal

import pytest

from saber_jax.configs import demo
from saber_jax.data import records
from saber_jax.train import preemption, stages
from test_distributed_plan import _write

pytestmark = pytest.mark.slow


def _config(workdir):
  c = demo.get_config()
  c.workdir, c.mesh, c.data.batch_size = str(workdir), (-1, 1, 1), 8    # 2 batches of 8
  # The plan test's default ladders and small floors (its records are up to 12 s long).
  c.data.length_buckets = tuple(range(256, 4097, 256))
  c.data.min_audio_chunks, c.data.min_patches = 2, 256
  c.data.min_vision_blocks, c.data.min_frame_len = 4, 64
  return c


def _logps(out_dir):
  paths = records.shard_paths(os.path.join(out_dir, 'pref'))
  decoded = [records.decode_record(blob, where) for where, blob in records.read_records(paths)]
  return {r['id']: (r['ref_chosen_logps'], r['ref_rejected_logps']) for r in decoded}


def test_reference_pass_stopped_after_a_batch_resumes_to_the_same_records(tmp_path, capsys):
  _, pref = _write(tmp_path / 'records')
  want = _logps(stages.ref_logps_stage(_config(tmp_path / 'straight'), pref, ''))

  config = _config(tmp_path / 'stopped')
  preemption.listen()
  try:
    os.kill(os.getpid(), signal.SIGTERM)       # arrives before the first batch
    with pytest.raises(preemption.Stopped, match=r'stopped after batch 1: 8 pairs kept'):
      stages.ref_logps_stage(config, pref, '')
  finally:
    preemption.stop_listening()
  out = stages.stage_dir(config, 'ref_logps')
  assert os.path.exists(os.path.join(out, stages.PROGRESS))
  assert not os.path.exists(os.path.join(out, stages.DONE))
  capsys.readouterr()
  assert _logps(stages.ref_logps_stage(config, pref, '')) == want
  assert 'resumed after batch 1' in capsys.readouterr().out
  assert not os.path.exists(os.path.join(out, stages.PROGRESS))
