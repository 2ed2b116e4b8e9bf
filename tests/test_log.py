"""The training log: window means, throughput and MFU; where the wall time went."""

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import pytest

from saber_jax import files
from saber_jax.train.log import Clock, MetricLogger


def test_writes_window_means_throughput_and_mfu(tmp_path, capsys):
  logger = MetricLogger(str(tmp_path), 'sft', total_steps=4)
  logger.peak_flops = 1e12                # as on an accelerator `flops.peak_flops` knows
  for loss in (2.0, 4.0):
    logger.add({'loss': loss}, tokens=100, model_flops=3e11)
  time.sleep(0.05)
  record = logger.write(2, {'lr': 0.1})
  logger.close()
  assert record['loss'] == 3.0 and record['lr'] == 0.1
  elapsed = 200 / record['tokens_per_s']
  per_device = record['model_flops_per_s_per_device']

  assert per_device == pytest.approx(6e11 / elapsed / jax.local_device_count())
  assert record['mfu'] == pytest.approx(per_device / 1e12)
  assert 'MFU' in capsys.readouterr().out
  with open(tmp_path / 'metrics.jsonl') as f:
    assert json.loads(f.read())['mfu'] == pytest.approx(record['mfu'])


def test_without_a_known_peak_logs_flops_but_no_mfu(tmp_path, capsys):
  logger = MetricLogger(str(tmp_path), 'dpo', total_steps=1)
  logger.peak_flops = None                # a CPU: no vendor peak
  logger.add({'loss': 1.0}, tokens=10, model_flops=1e9)
  record = logger.write(1, {})
  logger.close()
  assert 'mfu' not in record and record['model_flops_per_s_per_device'] > 0
  assert 'GFLOP/s/device' in capsys.readouterr().out


def test_fills_are_the_window_ratios_of_real_to_padded_positions(tmp_path, capsys):
  logger = MetricLogger(str(tmp_path), 'sft', total_steps=3)
  logger.add({'loss': 1.0}, tokens=10, model_flops=1e9, fill=(300, 400, 10, 100))
  logger.add({'loss': 1.0}, tokens=10, model_flops=1e9, fill=(100, 400, 50, 100))
  record = logger.write(2, {})
  assert record['data/text_fill'] == 0.5 and record['data/media_fill'] == 0.3
  assert 'fill text 50% media 30%' in capsys.readouterr().out
  logger.add({'loss': 1.0}, tokens=10, model_flops=1e9, fill=(4, 4, 1, 2))   # a new window
  assert logger.write(3, {})['data/text_fill'] == 1.0
  logger.close()


def _wandb_history(run_file) -> tuple[list[dict], bool]:
  """The `history` records of an offline W&B run file, and whether its `exit` record is
  there yet: W&B's record log (a 7-byte header, then 32 KiB blocks of
  [crc32c:4][length:2][type:1][data] chunks: 1 full, 2 first, 3 middle, 4 last) of `Record`
  protobufs."""
  from wandb.proto import wandb_internal_pb2
  data, pos, block = run_file.read_bytes(), 7, 32768
  assert data[:4] == b':W&B'
  history, pending, finished = [], b'', False
  while pos + 7 <= len(data):
    if block - pos % block < 7:            # a block's tail too short for a chunk header
      pos += block - pos % block
      continue
    length, kind = int.from_bytes(data[pos + 4:pos + 6], 'little'), data[pos + 6]
    pending += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      pending = b''
      if record.WhichOneof('record_type') == 'history':
        history.append({item.key or '/'.join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item})
      finished |= record.WhichOneof('record_type') == 'exit'
  return history, finished


def test_wandb_offline_run_holds_the_metrics_of_metrics_jsonl(tmp_path, monkeypatch, capsys):
  import ml_collections
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  settings = ml_collections.ConfigDict(dict(project='saber-test', entity='', name='', mode=''))
  logger = MetricLogger(str(tmp_path), 'sft', total_steps=4, wandb=settings,
                        run_config={'optim': {'lr': 0.1}})
  for step, loss in ((1, 2.0), (2, 1.5)):
    logger.add({'loss': loss, 'accuracy': loss / 4}, tokens=10, model_flops=1e9,
               fill=(3, 4, 1, 2))
    logger.write(step, {'lr': 0.1 * step})
  logger.close()
  run_id = (tmp_path / 'wandb' / 'sft.id').read_text().strip()
  run_file, = (tmp_path / 'wandb').glob(f'offline-run-*-{run_id}/run-{run_id}.wandb')
  # wandb-core (its own process) may still be flushing the file after `finish()` returns.
  deadline = time.time() + 60
  while not (read := _wandb_history(run_file))[1] and time.time() < deadline:
    time.sleep(0.2)
  history, _ = read
  lines = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert len(history) == len(lines) == 2, (run_file.stat().st_size, history)
  for logged, line in zip(history, lines):
    assert logged['_step'] == line['step']
    metrics = {k: v for k, v in logged.items() if not k.startswith('_')}
    assert metrics == {f'sft/{k}': v for k, v in line.items() if k not in ('stage', 'step')}

  # A resumed stage continues the same run (its id is kept in the workdir).
  logger = MetricLogger(str(tmp_path), 'sft', total_steps=4, start_step=2, wandb=settings)
  assert logger.wandb.run.id == run_id
  logger.close()


def test_wandb_is_off_without_a_project(tmp_path):
  import ml_collections
  settings = ml_collections.ConfigDict(dict(project='', entity='', name='', mode='offline'))
  logger = MetricLogger(str(tmp_path), 'sft', total_steps=1, wandb=settings)
  assert logger.wandb is None
  logger.close()
  assert not (tmp_path / 'wandb').exists()
def test_clock_splits_the_window_and_counts_compiles_apart():
  clock = Clock()
  try:
    with clock.part('input'):
      time.sleep(0.05)
    with clock.part('eval'):           # a compile inside a part counts as compile
      jax.jit(lambda x: jnp.sin(x) * 3.0)(jnp.ones(7)).block_until_ready()
    time.sleep(0.05)                    # outside any part: the step
    record = clock.take()
  finally:
    clock.close()
  parts = [record[f'time/{k}_s'] for k in ('input', 'compile', 'checkpoint', 'eval', 'step')]
  assert sum(parts) == pytest.approx(record['time/total_s'], rel=1e-6)
  assert record['time/input_s'] >= 0.05 and record['time/step_s'] >= 0.05
  assert record['time/compile_s'] > 0 and record['time/checkpoint_s'] == 0
  assert record['goodput'] == pytest.approx(record['time/step_s'] / record['time/total_s'])
  assert clock.take()['time/input_s'] == 0          # a new window


def test_a_gs_workdir_stages_logs_locally_and_a_new_machine_continues_them(gcs, tmp_path,
                                                                           monkeypatch):
  monkeypatch.chdir(tmp_path)
  workdir = 'gs://runs/logs'
  logger = MetricLogger(workdir, 'sft', total_steps=4)
  for step in (1, 2, 3):
    logger.add({'loss': float(step)}, tokens=10, model_flops=1e9)
    logger.write(step, {})
    if step == 2:
      logger.sync()                 # a checkpoint at step 2; then the machine is lost
  assert [r['step'] for r in files.read_jsonl(f'{workdir}/metrics.jsonl')] == [1, 2]
  assert files.listdir(f'{workdir}/tensorboard/sft')
  lost = logger
  # Another machine resumes from the step-2 checkpoint: the history comes down with it.
  logger = MetricLogger(workdir, 'sft', total_steps=4, start_step=2)
  for step in (3, 4):
    logger.add({'loss': 10.0 * step}, tokens=10, model_flops=1e9)
    logger.write(step, {})
  local = logger.local_dir
  logger.close()
  rows = list(files.read_jsonl(f'{workdir}/metrics.jsonl'))
  assert [(r['step'], r['loss']) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
  assert not os.path.exists(local) and not (tmp_path / 'gs:').exists()
  lost.jsonl.close(), lost.tensorboard.close()     # free the lost machine's files
  shutil.rmtree(lost.local_dir, ignore_errors=True)
