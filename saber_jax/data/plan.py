"""The batch plan: which records make each global batch, and the shapes they pad to.

`BatchPlan` is computed alike by every process from the seed, the epoch and the records'
size index (`records.load_sizes`), with no communication: each epoch a seeded
permutation of all records, sorted by size within windows of `group_batches` global
batches, cut into global batches of `batch_size * process count` examples, the batches
shuffled (`group_by_size`), each batch's examples dealt to the data shards so that each
encodes about the same media (`balanced_deal`). For each global batch it gives the text
length bucket and media sizes from ALL its rows, so every process pads its own rows to
the same shapes with the full bucket ladders, and any config runs on any number of
processes. Each epoch leaves out fewer than one global batch of records, different ones
every epoch.
"""

from typing import Any, Sequence

import numpy as np

from saber_jax.data import media, records
from saber_jax.data.collate import length_bucket, media_buckets, vision_window
from saber_jax.data.examples import DataConfig, data_options, num_rows, row_lengths
from saber_jax.models.config import ThinkerConfig
from saber_jax.errors import UserError


def example_needs(sizes: np.ndarray, kind: str, model_config: ThinkerConfig,
                  options: DataConfig) -> dict[str, np.ndarray]:
  """What each record [n] (rows of `records.load_sizes`) needs of a batch, as `RecordLoader`
  and `collate` would find it: `length` (longest row after `_fit_rows`; 1 when dropped),
  `kept`, `text_real` (unpadded tokens of its rows), the tower needs `audio_chunks`,
  `num_patches`, `num_windows`, `num_frames`, `frame_len`, and `media_real` (mel frames
  + patches)."""
  field = {name: sizes[:, i].astype(np.int64) for i, name in enumerate(records.SIZE_FIELDS)}
  shared = kind == records.PREFERENCE and options.shared_prompt
  rows = row_lengths(sizes[:, :3].astype(np.int64), kind, options.shared_prompt)
  max_len = max(options.length_buckets)
  fits = rows.max(1) <= max_len
  # Truncation keeps an example whose prompt fits and that has trained tokens (a shared
  # row: room for the prompt, its last token copied twice and a token of each answer).
  if shared:
    cut = (options.overlong == 'truncate') & (field['prompt_tokens'] + 3 <= max_len)
  else:
    cut = (options.overlong == 'truncate') & (field['prompt_tokens'] < max_len) & (
        rows > field['prompt_tokens'][:, None]).all(1)
  kept = fits | cut
  copies = np.where(kept, rows.shape[1], 0)
  a, v = model_config.audio, model_config.vision
  p, m, win = v.patch_size, v.spatial_merge_size, vision_window(v)
  video_t = -(-field['video_frames'] // v.temporal_patch_size)
  video_h, video_w = field['video_height'] // p, field['video_width'] // p
  image = [media.smart_resize(h, w, p * m) if h else (0, 0)
           for h, w in zip(field['image_height'], field['image_width'])]
  image_h, image_w = (np.array([x[i] for x in image], np.int64).reshape(-1) // p for i in (0, 1))
  image_t = (image_h > 0).astype(np.int64)
  windows = lambda t, h, w: t * -(-(h // m) // win) * -(-(w // m) // win)
  needs = dict(
      length=np.where(kept, np.minimum(rows.max(1), max_len), 1), kept=kept,
      text_real=np.where(kept, np.minimum(rows, max_len).sum(1), rows.shape[1]),
      audio_chunks=copies * -(-field['mel_frames'] // (2 * a.n_window)),
      num_patches=copies * (video_t * video_h * video_w + image_t * image_h * image_w),
      num_windows=copies * (windows(video_t, video_h, video_w)
                            + windows(image_t, image_h, image_w)),
      num_frames=copies * (video_t + image_t),
      frame_len=np.where(kept, np.maximum(video_h * video_w, image_h * image_w), 0))
  needs['media_real'] = copies * field['mel_frames'] + needs['num_patches']
  # int32 keeps a few ints per record (the plan travels to every Grain worker).
  return {k: v if k == 'kept' else v.astype(np.int32) for k, v in needs.items()}


def group_by_size(keys: np.ndarray, batch_size: int, window: int,
                  rng: np.random.Generator | None) -> np.ndarray:
  """Positions of `keys` [n] as batches [n // batch_size, batch_size] of similar keys:
  shuffled (rng None: in order), sorted by key within windows of `window` batches, cut
  into batches, batches shuffled. window 0: no sorting (random batches). The last
  n % batch_size positions (of the shuffled order) are left out."""
  n = len(keys) // batch_size * batch_size
  order = rng.permutation(len(keys))[:n] if rng is not None else np.arange(n)
  if window:
    span = window * batch_size
    order = np.concatenate([chunk[np.argsort(keys[chunk], kind='stable')]
                            for chunk in np.split(order, range(span, n, span))] or [order])
  batches = order.reshape(-1, batch_size)
  return batches[rng.permutation(len(batches))] if rng is not None and window else batches


def balanced_deal(weights: np.ndarray, num_data_shards: int) -> np.ndarray:
  """Positions [batches, B] that deal each batch's B examples to `num_data_shards` data
  shards of B / num_data_shards (shard after shard) so that no shard carries much more of
  any weight than the others: `weights` [batches, B, D] (e.g. audio chunks and vision
  patches, which each shard encodes as one padded array). Greedy: heaviest example first,
  each to the shard with room whose largest share (of each weight's batch total) stays
  smallest."""
  batches, size, _ = weights.shape
  per_shard = size // num_data_shards
  totals = weights.sum(1, keepdims=True)
  share = weights / np.where(totals > 0, totals, 1)
  load = np.zeros((batches, num_data_shards, share.shape[2]))
  count = np.zeros((batches, num_data_shards), np.int64)
  slot = np.zeros((batches, size), np.int64)      # example -> its place in the dealt batch
  rows = np.arange(batches)
  for i in np.argsort(-share.sum(2), axis=1, kind='stable').T:   # i: [batches]
    after = (load + share[rows, i][:, None]).max(2)
    shard = np.where(count < per_shard, after, np.inf).argmin(1)
    load[rows, shard] += share[rows, i]
    slot[rows, i] = shard * per_shard + count[rows, shard]
    count[rows, shard] += 1
  return np.argsort(slot, axis=1)


class BatchPlan:
  """The global batches of a record set, alike on every process: from the seed, the epoch
  and the records' needs (`example_needs`), each step's examples (record positions, -1:
  padding) and the shapes all processes pad them to.

  Every epoch is `group_by_size` of a new permutation (seeded by (seed, epoch)), so
  batches hold records of similar size and the leftovers (< one global batch) differ
  between epochs. `reference`: every record once, in size order, the last batch padded.
  """

  def __init__(self, needs: dict[str, np.ndarray], *, rows_per_example: int, batch_size: int,
               num_data_shards: int, model_config: ThinkerConfig, options: DataConfig,
               seed: int,
               reference: bool = False):
    self.needs, self.rows_per_example = needs, rows_per_example
    self.batch_size, self.num_data_shards = batch_size, num_data_shards
    self.model_config, self.options = model_config, options
    self.seed, self.reference = seed, reference
    n = len(needs['length'])
    self.steps_per_epoch = -(-n // batch_size) if reference else n // batch_size
    if not self.steps_per_epoch:
      raise UserError(f'{n} records are fewer than one global batch of {batch_size} '
                      '(data.batch_size x processes): add records or lower '
                      '--config.data.batch_size')
    self._orders = {}   # epoch -> its order; the current and the previous epoch

  def _key(self) -> np.ndarray:
    # Text length first (media placeholders are part of it), then the vision size.
    length, patches = (self.needs[k].astype(np.int64) for k in ('length', 'num_patches'))
    return length * (1 << 24) + np.minimum(patches, (1 << 24) - 1)

  def epoch(self, epoch: int) -> np.ndarray:
    """Record positions [steps_per_epoch, batch_size] of one epoch (-1: padding)."""
    order = self._orders.get(epoch)   # one read: Grain's threads share this cache
    if order is not None:
      return order
    if self.reference:
      order = np.argsort(self._key(), kind='stable')
      order = self._deal(np.pad(order, (0, self.steps_per_epoch * self.batch_size - len(order)),
                                constant_values=-1).reshape(-1, self.batch_size))
    else:
      shuffle = self.options.shuffle   # off: file order, ungrouped
      rng = np.random.default_rng([self.seed, epoch]) if shuffle else None
      order = group_by_size(self._key(), self.batch_size,
                            self.options.group_batches if shuffle else 0, rng)
      if shuffle and self.options.group_batches:
        order = self._deal(order)
    self._orders = {**{e: o for e, o in self._orders.items() if e == epoch - 1}, epoch: order}
    return order

  def _deal(self, order: np.ndarray) -> np.ndarray:
    """`order` with each batch's examples dealt to the data shards (devices) so each
    encodes about the same audio and vision (`balanced_deal`)."""
    if self.num_data_shards == 1:
      return order
    weights = np.stack([np.where(order >= 0, self.needs[k][order], 0)
                        for k in ('audio_chunks', 'num_patches')], -1).astype(np.float64)
    return np.take_along_axis(order, balanced_deal(weights, self.num_data_shards), 1)

  def examples(self, step: int) -> np.ndarray:
    """Record positions [batch_size] of global batch `step` (counted over all epochs)."""
    return self.epoch(step // self.steps_per_epoch)[step % self.steps_per_epoch]

  def shapes(self, step: int) -> dict[str, Any]:
    """`collate`'s shapes of global batch `step`: its text length bucket and media sizes
    (from the largest data shard of all its rows) and fill counts (`batch.FILL_FIELDS`)."""
    examples = self.examples(step)
    needs = {k: np.where(examples >= 0, v[np.maximum(examples, 0)], 0)
             for k, v in self.needs.items()}
    shards = {k: needs[k].reshape(self.num_data_shards, -1) for k in
              ('audio_chunks', 'num_patches', 'num_windows', 'num_frames', 'frame_len')}
    largest = {k: int(s.max() if k == 'frame_len' else s.sum(1).max()) for k, s in shards.items()}
    media_sizes = media_buckets(largest, self.model_config, self.options)
    length = length_bucket(int(needs['length'].max(initial=1)), self.options.length_buckets)
    rows = self.rows_per_example * self.batch_size
    padding_rows = self.rows_per_example * int((examples < 0).sum())   # one token each
    audio_len = 2 * self.model_config.audio.n_window
    fill = (int(needs['text_real'].sum()) + padding_rows, rows * length,
            int(needs['media_real'].sum()),
            self.num_data_shards * (media_sizes['num_audio_chunks'] * audio_len
                               + media_sizes['num_patches']))
    return dict(length=length, media=media_sizes, fill=fill)


def check_dropped(sizes: np.ndarray, kept: np.ndarray, kind: str, options: DataConfig,
                  paths: Sequence[str]) -> None:
  """UserError when the examples that train nothing (dropped as too long, or with an empty
  answer) are more than `options.max_dropped_fraction` of the records (1: never; the
  trainer still refuses a stage that trained on no tokens at all)."""
  n = len(kept)
  answers = sizes[:, 1:3 if kind == records.PREFERENCE else 2].astype(np.int64)
  empty = kept & (answers <= 0).any(1)
  dropped, bad = int((~kept).sum()), int(empty.sum())
  if not n or (dropped + bad) / n <= options.max_dropped_fraction:
    return
  reasons = []
  if dropped:
    reasons.append(f'{dropped} longer than the largest length bucket '
                   f'{max(options.length_buckets)} (data.overlong={options.overlong!r})')
  if bad:
    reasons.append(f'{bad} with an empty answer')
  where = paths[0] + (f' and {len(paths) - 1} more shards' if len(paths) > 1 else '')
  raise UserError(
      f'{dropped + bad} of {n} records ({(dropped + bad) / n:.1%}) would train nothing: '
      f'{"; ".join(reasons)}; more than data.max_dropped_fraction='
      f'{options.max_dropped_fraction} ({where}). Raise data.length_buckets, use '
      "data.overlong='truncate', fix the records, or raise data.max_dropped_fraction")


def batch_plan(model_config: ThinkerConfig, data_config: Any, paths: Sequence[str], kind: str,
               *, seed: int, shard_count: int, reference: bool = False,
               damaged_log: str | None = None) -> BatchPlan:
  """The global batch plan of the record files (their size indexes, built if missing) for
  `shard_count` processes of `data_config.batch_size` examples each. With `damaged_log`
  (the reference pass) a record that cannot be read is sized 0 (the loader logs and drops
  it). UserError when more than `data.max_dropped_fraction` of the records would train
  nothing (`check_dropped`)."""
  options = data_options(data_config)
  sizes = records.load_sizes(paths, tolerate_damaged=damaged_log is not None)
  needs = example_needs(sizes, kind, model_config, options)
  readable = sizes[:, 0] > 0 if damaged_log is not None else slice(None)   # damaged: sized 0
  check_dropped(sizes[readable], needs['kept'][readable], kind, options, paths)
  return BatchPlan(needs, rows_per_example=num_rows(kind, options.shared_prompt),
                   batch_size=options.batch_size * shard_count,
                   num_data_shards=options.num_data_shards * shard_count, model_config=model_config,
                   options=options, seed=seed, reference=reference)
