"""The training log: window means, throughput and MFU; where the wall time went."""

import json
import time

import jax
import jax.numpy as jnp
import pytest

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
