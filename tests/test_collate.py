"""Collate (data.collate): the bucket ladders, and one encoding path whose left-padded
batches (generation) hold the same rows as its right-padded ones (training)."""

import jax
import numpy as np

from saber_jax.batch import IGNORE_INDEX, PAD_ID
from saber_jax.data import collate
from saber_jax.data.examples import Example
from saber_jax.data.prompt import expand_placeholders
from tiny_data import BASE, TINY


def test_bucket_ladder():
  assert [collate.bucket_size(n, 64) for n in (1, 64, 65, 96, 97, 129, 200)] == [
      64, 64, 96, 96, 128, 192, 256]
  assert [collate.bucket_size(n, 64, steps=1) for n in (1, 65, 129)] == [64, 128, 256]
  assert collate.bucket_size(97, 10, steps=4, multiple=4) == 100   # 10,12,15,17,20,...,80,100
  assert collate.bucket_size(0, 2) == 2


def _example(text_tokens: int, mel_frames: int = 0) -> Example:
  """One SFT row: text, then an audio clip of `mel_frames` frames (none: 0)."""
  ids = np.concatenate([np.arange(100, 100 + text_tokens),
                        expand_placeholders(audio_lengths=[mel_frames] if mel_frames else [])])
  media = {'use_audio_in_video': False}
  if mel_frames:
    rng = np.random.default_rng(mel_frames)
    media['audio'] = rng.standard_normal((TINY.audio.num_mel_bins, mel_frames), np.float32)
  labels = np.where(np.arange(len(ids)) >= 2, ids, IGNORE_INDEX).astype(np.int32)
  row = dict(input_ids=ids, labels=labels, segments=np.zeros(len(ids), np.int8))
  return Example([row], media, False, index=0)


def test_left_and_right_padding_encode_the_same_rows_and_media():
  """Generation (left) and training (right) go through `encode` alike: each row's tokens
  and TMRoPE positions, and every media array but the scatter slots, are the same."""
  examples = [_example(5, 300), None, _example(9), _example(3, 120)]
  length = 128
  shards = collate.data_shard_batches(examples, 2, 1, length)
  sizes = collate.media_sizes(shards, TINY, BASE)
  right = collate.encode(shards, TINY, sizes)
  left = collate.encode(shards, TINY, sizes, padding='left', length=length, pad_id=7,
                        keep_text=False)
  assert set(right) - set(left) == {'labels', 'segments'}
  assert right['labels'].shape == right['input_ids'].shape == (4, length)
  for tower in ('audio', 'vision'):
    same = {k: v for k, v in right[tower].items() if k != 'slots'}
    jax.tree.map(np.testing.assert_array_equal, same,
                 {k: left[tower][k] for k in same})
  for r in range(len(examples)):
    rm, lm = (x['attention_mask'][r].astype(bool) for x in (right, left))
    np.testing.assert_array_equal(right['input_ids'][r][rm], left['input_ids'][r][lm])
    np.testing.assert_array_equal(right['position_ids'][:, r][:, rm],
                                  left['position_ids'][:, r][:, lm])
    assert rm[:rm.sum()].all() and lm[length - lm.sum():].all()
    assert (right['input_ids'][r][~rm] == PAD_ID).all() and (left['input_ids'][r][~lm] == 7).all()
  assert right['audio']['slots'].shape == left['audio']['slots'].shape
