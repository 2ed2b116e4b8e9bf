"""Synthetic training batches for the step tests: processor-style rows from hf_reference,
split into data shards, with labels on the last tokens of each row."""

import jax.numpy as jnp
import numpy as np

from hf_reference import make_batch
from saber_jax.models.thinker import model_inputs, stack_shards
from saber_jax.train import steps

ROWS = [
    [('text', 3), ('video+audio', (2, 4, 4), 1.0, 60), ('text', 8)],
    [('text', 4), ('image', (1, 4, 4)), ('text', 9)],
    [('text', 2), ('audio', 40), ('text', 10)],
    [('text', 12)],
]
# Padded sizes large enough for any shard of ROWS, so every shard has the same shapes.
SIZES = dict(num_audio_chunks=32, num_audio_tokens=64, num_patches=128, num_windows=32,
             window_len=16, num_frames=16, frame_len=16)


def _labels(batch, response_tokens=6):
  """Train on the last `response_tokens` valid tokens of each row, in three segments."""
  ids, mask = batch['input_ids'], batch['attention_mask'].astype(bool)
  labels = np.full_like(ids, -100)
  segments = np.zeros_like(ids)
  for row in range(len(ids)):
    valid = np.flatnonzero(mask[row])[-response_tokens:]
    labels[row, valid] = ids[row, valid]
    segments[row, valid] = np.repeat([1, 2, 3], 2)
  return labels.astype(np.int32), segments.astype(np.int32)


def sft_batch(config, num_shards: int, rows=ROWS, length=48, use_audio_in_video=True) -> dict:
  """One global batch of `rows` (right padded to `length`) as `num_shards` data shards."""
  per_shard = len(rows) // num_shards
  shards, labels, segments = [], [], []
  for s in range(num_shards):
    shard_rows = rows[s * per_shard:(s + 1) * per_shard]
    # One seed per row, so the content does not depend on the sharding.
    parts = [make_batch([r], padding_side='right', use_audio_in_video=use_audio_in_video,
                        seed=s * per_shard + i, length=length, frames=80)
             for i, r in enumerate(shard_rows)]
    batch = _concat(parts)
    shards.append(model_inputs(config, batch, **SIZES))
    row_labels, row_segments = _labels(batch)
    labels.append(row_labels)
    segments.append(row_segments)
  return dict(stack_shards(shards), labels=np.concatenate(labels),
              segments=np.concatenate(segments))


def _concat(parts):
  """Rows of several processor batches (same padded length) as one batch."""
  keys = {k for p in parts for k in p} - {'use_audio_in_video'}
  out = {k: np.concatenate([p[k] for p in parts if k in p]) for k in keys}
  if any(p.get('use_audio_in_video') for p in parts):
    out['use_audio_in_video'] = True
  return out


def fresh_state(trainable, frozen, optimizer):
  """A train state at step 0, unsharded (the trainer builds its own, sharded)."""
  return steps.TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                          opt_state=optimizer.init(trainable))
