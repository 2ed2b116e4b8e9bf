"""The training loop: a run with a skipped non-finite step, interrupted and resumed, ends
exactly where the uninterrupted run does, and logs each step once; SIGTERM at a random
step of SFT and of CA-DPO stops after that step with a checkpoint and the restart matches
the straight run, held-out eval numbers included (equal to a separate forward); time
accounting and the profile trace."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from hf_reference import tiny_hf_config
from saber_jax import sharding, weights
from saber_jax.train import config as config_lib, preemption, trainer
from test_train_steps import _pair_batch, pair_examples  # noqa: F401 (a fixture)
from train_batches import ROWS, sft_batch


def _config(workdir, hf_config):
  c = config_lib.base_config()
  c.model.hf_config, c.model.dtype, c.model.remat = hf_config, 'float32', 'none'
  c.workdir, c.nonfinite, c.log_every = str(workdir), 'skip', 1
  c.checkpoint.every_steps, c.optim.total_steps, c.optim.lr = 2, 6, 1e-3
  return c


def _logged_steps(workdir):
  return [json.loads(line)['step'] for line in open(workdir / 'metrics.jsonl')]


@pytest.mark.slow
def test_skipped_nonfinite_step_resumes_identically(tmp_path, capsys):
  tiny_hf_config().save_pretrained(tmp_path / 'model')     # the config train_batches fits
  hf_config = str(tmp_path / 'model' / 'config.json')
  config = _config(tmp_path / 'straight', hf_config)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  good = sft_batch(weights.model_config_of(config), 1)
  bad = dict(good, labels=good['labels'].copy())
  bad['audio'] = dict(good['audio'], chunks=np.full_like(good['audio']['chunks'], np.nan))
  batches = [good, good, bad, good, good, good]      # step 3 is skipped
  setup = trainer.plan(config, 'sft', mesh)
  straight = trainer.train(config, setup, iter(batches), None, str(tmp_path / 'straight'),
                           'sft', 6).state
  assert 'non-finite loss or gradient at step 3' in capsys.readouterr().out

  resumed_dir = tmp_path / 'resumed'
  config = _config(resumed_dir, hf_config)
  trainer.train(config, setup, iter(batches[:4]), None, str(resumed_dir), 'sft', 4)
  with open(resumed_dir / 'metrics.jsonl', 'a') as f:   # logged, then killed before saving
    f.write(json.dumps({'stage': 'sft', 'step': 5, 'loss': 0.0}) + '\n')
  # The restored data iterator continues after the 4 batches the checkpoint consumed.
  resumed = trainer.train(config, setup, iter(batches[4:]), None, str(resumed_dir), 'sft', 6).state
  assert int(resumed.step) == int(straight.step) == 6
  for got, want in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert _logged_steps(resumed_dir) == [1, 2, 3, 4, 5, 6]
  losses = lambda d: [json.loads(line)['loss'] for line in open(d / 'metrics.jsonl')]
  assert losses(resumed_dir) == losses(tmp_path / 'straight')


def _signal_at(batches, step):
  """`batches`, sending this process SIGTERM as batch `step` (1-based) is taken."""
  for i, batch in enumerate(batches, start=1):
    if i == step:
      os.kill(os.getpid(), signal.SIGTERM)
    yield batch


@pytest.fixture
def listening():
  preemption.listen()
  yield
  preemption.stop_listening()


@pytest.mark.slow
def test_sigterm_stops_after_the_step_in_flight_and_resumes_exactly_with_eval(
    tmp_path, capsys, listening):
  tiny_hf_config().save_pretrained(tmp_path / 'model')
  hf_config = str(tmp_path / 'model' / 'config.json')
  config = _config(tmp_path / 'straight', hf_config)
  config.log_every, config.checkpoint.every_steps, config.eval.every_steps = 3, 100, 2
  config.profile = (2, 2)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  model_config = weights.model_config_of(config)
  batches = [sft_batch(model_config, 1, rows=ROWS[i % 4:] + ROWS[:i % 4]) for i in range(6)]
  held_out = [sft_batch(model_config, 1, rows=ROWS[1:]), sft_batch(model_config, 1, rows=ROWS[2:])]
  setup = trainer.plan(config, 'sft', mesh)
  evaluation = trainer.plan_evaluation(config, 'sft', setup, held_out)
  straight = trainer.train(config, setup, iter(batches), None, str(tmp_path / 'straight'), 'sft',
                           6, evaluation=evaluation).state
  want = _lines(tmp_path / 'straight')

  # The eval numbers are the token-weighted NLL of a separate forward over the same batches.
  loss_fn = trainer.stage_loss(config, 'sft', model_config)
  forward = [loss_fn(straight.trainable, straight.frozen, b) for b in held_out]
  tokens = [float(m['tokens']) for _, m in forward]
  expected = sum(float(loss) * t for (loss, _), t in zip(forward, tokens)) / sum(tokens)
  assert want[6]['eval/loss'] == pytest.approx(expected, rel=1e-5)
  for part in ('visual', 'acoustic', 'reasoning'):
    n = [float(m[f'tokens/{part}']) for _, m in forward]
    nll = sum(float(m[f'nll/{part}']) * c for (_, m), c in zip(forward, n)) / sum(n)
    assert want[6][f'eval/nll/{part}'] == pytest.approx(nll, rel=1e-5)
  assert sorted(s for s in want if 'eval/loss' in want[s]) == [2, 4, 6]
  assert want[2]['eval/loss'] > want[6]['eval/loss']
  # Where the time went: the first window compiled, every window adds up.
  assert want[2]['time/compile_s'] > 0
  for line in want.values():
    parts = sum(line[f'time/{k}_s'] for k in ('input', 'compile', 'checkpoint', 'eval', 'step'))
    assert parts == pytest.approx(line['time/total_s'], rel=1e-6)
    assert 0 <= line['goodput'] <= 1
  profiles = tmp_path / 'straight' / 'tensorboard' / 'sft' / 'plugins' / 'profile'
  traces = list(profiles.glob('*/*.xplane.pb'))
  assert traces, 'no profile written'
  capsys.readouterr()

  # SIGTERM while a random step is taken: that step finishes, is checkpointed, and the run
  # stops with Stopped (main: exit 0); the restart resumes with the same losses, eval
  # numbers and params.
  stop = int(np.random.default_rng().integers(1, 6))
  resumed_dir = tmp_path / 'resumed'
  config = _config(resumed_dir, hf_config)
  config.log_every, config.checkpoint.every_steps, config.eval.every_steps = 3, 100, 2
  with pytest.raises(preemption.Stopped, match=f'stopped after step {stop} of 6'):
    trainer.train(config, setup, _signal_at(batches, stop), None, str(resumed_dir), 'sft', 6,
                  evaluation=evaluation)
  assert (resumed_dir / 'checkpoints' / str(stop)).is_dir()
  assert 'SIGTERM received' in capsys.readouterr().err
  preemption.stop_listening()
  preemption.listen()
  resumed = trainer.train(config, setup, iter(batches[stop:]), None, str(resumed_dir), 'sft', 6,
                          evaluation=evaluation).state
  for got, expect in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expect))
  got = _lines(resumed_dir)
  assert sorted(got) == sorted(set(want) | {stop})
  for step in (2, 4, 6):
    for key in [k for k in want[step] if k.startswith('eval/')]:
      assert got[step][key] == want[step][key], (step, key)
  logged = sorted(want)
  for before, step in zip([0] + logged, logged):
    if not before < stop < step:        # the stop split no window of these steps' means
      assert got[step]['loss'] == want[step]['loss'], step


def _lines(workdir):
  return {line['step']: line for line in map(json.loads, open(workdir / 'metrics.jsonl'))}


def test_resuming_with_another_global_batch_names_both_numbers(tmp_path):
  """data.batch_size is per process: resuming the 8-example global batch of 2 processes on
  one process with batch_size 4 is refused before any work, naming 8 and 4."""
  stage = tmp_path / 'sft'
  stage.mkdir()
  (stage / 'fingerprint.json').write_text(json.dumps({'data': {'global_batch_size': 8}}))
  with pytest.raises(ValueError, match=r'global batch of 8 .* = 4\. To resume, use '
                                       r'--config\.data\.batch_size=8'):
    trainer.check_global_batch(str(stage / 'fingerprint.json'), 4)
  trainer.check_global_batch(str(stage / 'fingerprint.json'), 8)


@pytest.mark.slow
def test_dpo_sigterm_at_a_random_step_resumes_exactly(tmp_path, capsys, listening,
                                                      pair_examples):
  tiny_hf_config().save_pretrained(tmp_path / 'model')
  hf_config = str(tmp_path / 'model' / 'config.json')
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])

  def config_of(workdir):
    c = _config(workdir, hf_config)
    c.nonfinite, c.optim.total_steps, c.checkpoint.every_steps = 'stop', 4, 100
    c.eval.every_steps, c.dpo.beta = 2, 0.5
    return c

  config = config_of(tmp_path / 'straight')
  model_config = weights.model_config_of(config)
  rotated = lambda i: {True: pair_examples[True][i:] + pair_examples[True][:i]}
  batches = [_pair_batch(model_config, rotated(i), True, 1) for i in range(4)]
  setup = trainer.plan(config, 'dpo', mesh)
  evaluation = trainer.plan_evaluation(config, 'dpo', setup,
                                       [_pair_batch(model_config, rotated(5), True, 1)])
  straight = trainer.train(config, setup, iter(batches), None, str(tmp_path / 'straight'),
                           'dpo', 4, evaluation=evaluation).state
  want = _lines(tmp_path / 'straight')
  assert all('eval/rewards/accuracies' in want[s] for s in (2, 4))

  stop = int(np.random.default_rng().integers(1, 4))
  config = config_of(tmp_path / 'resumed')
  with pytest.raises(preemption.Stopped, match=f'stopped after step {stop} of 4'):
    trainer.train(config, setup, _signal_at(batches, stop), None, str(tmp_path / 'resumed'),
                  'dpo', 4, evaluation=evaluation)
  assert (tmp_path / 'resumed' / 'checkpoints' / str(stop)).is_dir()
  preemption.stop_listening()
  preemption.listen()
  resumed = trainer.train(config, setup, iter(batches[stop:]), None, str(tmp_path / 'resumed'),
                          'dpo', 4, evaluation=evaluation).state
  for got, expect in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expect))
  got = _lines(tmp_path / 'resumed')
  for step, line in want.items():      # log_every=1: every line is one step's
    for key in [k for k in line if not _timing(k)]:
      assert got[step][key] == line[key], (step, key)


def _timing(key):
  return key.startswith('time/') or key in ('goodput', 'step_time_s', 'tokens_per_s',
                                            'model_flops_per_s_per_device')


def test_a_stage_that_trained_on_no_tokens_fails_before_writing_weights():
  from saber_jax.errors import UserError
  from saber_jax.train.trainer import check_trained
  with pytest.raises(UserError, match=r'\[sft\] 3 steps trained on 0 tokens'):
    check_trained('sft', 0, 3)
  check_trained('sft', 17, 3)
  check_trained('sft', 0, 0)    # resumed at the last step: nothing trained now, nothing to say
