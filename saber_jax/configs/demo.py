"""The whole two-stage pipeline on a tiny model and generated clips, on a laptop CPU:
demo data -> records -> SED fine-tuning -> offline preference pairs -> reference
log-probs -> CA-DPO. No downloads, a few minutes.

  python -m saber_jax.main --config=configs/demo.py
"""

import ml_collections

from saber_jax.train.config import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.mode = 'pipeline'
  c.workdir = 'workdir/demo'
  c.model.name = 'tiny'
  c.model.dtype = 'float32'
  c.model.remat = 'none'
  c.mesh = (-1, 1, 1)
  c.data.batch_size = 4
  # One shape per stage, so each compiles once: the demo clips fit these sizes.
  c.data.length_buckets = (512,)
  c.data.min_audio_chunks = 16
  c.data.min_patches = 3072
  c.data.min_vision_blocks = 128
  c.data.min_frame_len = 128
  c.data.num_epochs = None            # repeat; the steps below bound each stage
  c.checkpoint.every_steps = 20
  c.log_every = 4
  c.logps_chunk_size = 128
  c.optim.weight_decay = 0.0
  c.generate.max_new_tokens = 96
  c.generate.batch_size = 1
  c.pipeline = ml_collections.ConfigDict(dict(
      num_clips=32,
      eval_clips=8,           # held out: the eval sets of both stages (2 batches each)
      # Each stage's changes to the fields above.
      sft=dict(optim=dict(lr=3e-3, total_steps=40, warmup_steps=4), eval=dict(every_steps=8)),
      dpo=dict(optim=dict(lr=2e-4, total_steps=16, warmup_steps=2), eval=dict(every_steps=4))))
  c.eval.max_batches = 2
  return c
