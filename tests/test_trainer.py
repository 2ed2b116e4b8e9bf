"""The training loop: a run with a skipped non-finite step, interrupted and resumed, ends
exactly where the uninterrupted run does, and logs each step once."""

import json

import jax
import numpy as np
import pytest

from hf_reference import tiny_hf_config
from saber_jax import sharding, weights
from saber_jax.train import config as config_lib, trainer
from train_batches import sft_batch


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


def test_a_stage_that_trained_on_no_tokens_fails_before_writing_weights():
  from saber_jax.errors import UserError
  from saber_jax.train.trainer import check_trained
  with pytest.raises(UserError, match=r'\[sft\] 3 steps trained on 0 tokens'):
    check_trained('sft', 0, 3)
  check_trained('sft', 17, 3)
  check_trained('sft', 0, 0)    # resumed at the last step: nothing trained now, nothing to say
