"""The batch plan (data.plan) on SABER-like size indexes: every record once per epoch,
reshuffled, batches of similar size that pad less than random ones, media dealt evenly
over the data shards."""

import dataclasses

import numpy as np
import pytest

from saber_jax.data import plan as plan_lib
from saber_jax.data import records
from saber_jax.errors import UserError
from tiny_data import BASE, TINY


def _needs(n, seed=0):
  """Needs of n SABER-like records (lengths and media sizes spread widely)."""
  rng = np.random.default_rng(seed)
  seconds = rng.uniform(0.5, 30, n)
  frames = np.minimum(40, np.maximum(2, (2 * seconds).astype(int) // 2 * 2))
  sizes = np.stack([40 + (seconds * 25).astype(int) + frames // 2 * 16,
                    rng.integers(150, 600, n), np.zeros(n, int), (seconds * 100).astype(int),
                    frames, np.full(n, 112), np.full(n, 112), np.zeros(n, int), np.zeros(n, int)],
                   1).astype(np.int32)
  return plan_lib.example_needs(sizes, records.SFT, TINY, PLANNED)


PLANNED = dataclasses.replace(BASE, length_buckets=(256, 512, 768, 1024, 1536, 2048))


def _plan(needs, **options):
  return plan_lib.BatchPlan(needs, rows_per_example=1, batch_size=16, num_data_shards=4,
                            model_config=TINY, seed=0,
                            options=dataclasses.replace(PLANNED, **options))


def test_plan_takes_every_record_once_per_epoch_minus_leftovers_and_reshuffles():
  needs = _needs(500)
  plan = _plan(needs)
  assert plan.steps_per_epoch == 500 // 16
  epochs = [plan.epoch(e) for e in range(2)]
  for order in epochs:
    assert order.shape == (31, 16) and len(set(order.ravel())) == 31 * 16
    assert order.min() >= 0 and order.max() < 500
  assert set(epochs[0].ravel()) != set(epochs[1].ravel())       # other leftovers
  np.testing.assert_array_equal(plan.examples(31 + 5), epochs[1][5])
  np.testing.assert_array_equal(_plan(needs).epoch(1), epochs[1])   # a pure function
  # The reference pass: every record once, the last batch padded with -1.
  reference = plan_lib.BatchPlan(needs, rows_per_example=1, batch_size=16, num_data_shards=4,
                                 model_config=TINY, seed=0, options=plan.options, reference=True)
  order = reference.epoch(0)
  assert order.shape == (32, 16) and sorted(order[order >= 0]) == list(range(500))
  assert (order == -1).sum() == 32 * 16 - 500
  assert reference.shapes(31)['fill'][0] > 0


def test_grouped_plan_pads_less_than_random_batches_and_every_row_fits():
  needs = _needs(2000)
  fills = {}
  for name, window in (('random', 0), ('grouped', 16)):
    plan = _plan(needs, group_batches=window)
    totals = np.zeros(4)
    for step in range(plan.steps_per_epoch):
      shapes, examples = plan.shapes(step), plan.examples(step)
      assert needs['length'][examples].max() <= shapes['length']
      groups = needs['num_patches'][examples].reshape(4, -1).sum(1)
      assert groups.max() <= shapes['media']['num_patches']
      totals += shapes['fill']
    fills[name] = (totals[0] / totals[1], totals[2] / totals[3])
  assert fills['grouped'][0] > fills['random'][0] + 0.1, fills
  assert fills['grouped'][1] > fills['random'][1] + 0.1, fills


def test_balanced_deal_spreads_audio_and_vision_evenly_over_the_data_shards():
  weights = np.array([[[4, 0], [4, 0], [0, 4], [0, 4], [1, 1], [1, 1], [2, 2], [0, 0]],
                      [[1, 1]] * 8], float)     # a padding slot; all equal
  dealt = plan_lib.balanced_deal(weights, num_data_shards=4)
  for b, positions in enumerate(dealt):
    assert sorted(positions) == list(range(8))
  groups = weights[0][dealt[0]].reshape(4, 2, 2).sum(1)
  assert groups.max(0).tolist() == [4, 4], groups      # the least any deal can do
  # Over a SABER-like epoch, the largest group (what every group is padded to) carries
  # under 2% more than the mean; the snake deal of the size-sorted batch (what the plan
  # did before) 8-11% more.
  needs = _needs(2000)
  order = _plan(needs).epoch(0)
  snake = np.array([0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11, 15, 14, 13, 12])
  resorted = np.take_along_axis(order, np.argsort(needs['length'][order] * 10**6 +
                                                  needs['num_patches'][order], 1), 1)[:, snake]
  for key in ('audio_chunks', 'num_patches'):
    excess = lambda o: (lambda g: g.max(1).sum() / g.mean(1).sum())(
        needs[key][o].reshape(len(o), 4, 4).sum(2))
    assert excess(order) < 1.02 and excess(resorted) > 1.05, key


def _sizes(prompt, response, rejected=None):
  n = len(prompt)
  zeros = np.zeros(n, int)
  return np.stack([prompt, response, zeros if rejected is None else rejected,
                   *[zeros] * 6], 1).astype(np.int32)


def test_check_dropped_refuses_more_than_the_allowed_fraction_and_empty_answers():
  options = dataclasses.replace(PLANNED, overlong='drop')   # largest bucket 2048
  prompt, response = np.full(200, 100), np.full(200, 50)
  ok = _sizes(prompt, response)
  kept = lambda s: plan_lib.example_needs(s, records.SFT, TINY, options)['kept']
  plan_lib.check_dropped(ok, kept(ok), records.SFT, options, ['a.array_record'])
  two_long = _sizes(np.where(np.arange(200) < 2, 3000, 100), response)   # 1%: allowed
  plan_lib.check_dropped(two_long, kept(two_long), records.SFT, options, ['a.array_record'])
  three_long = _sizes(np.where(np.arange(200) < 3, 3000, 100), response)
  with pytest.raises(UserError, match=r'3 of 200 records \(1.5%\) would train nothing: 3 longer '
                     r"than the largest length bucket 2048 \(data.overlong='drop'\); more than "
                     r'data.max_dropped_fraction=0.01 \(a.array_record and 1 more shards\)'):
    plan_lib.check_dropped(three_long, kept(three_long), records.SFT, options,
                           ['a.array_record', 'b.array_record'])
  # A preference pair with an empty rejected answer trains nothing either.
  pairs = _sizes(prompt, response, np.where(np.arange(200) < 10, 0, 40))
  with pytest.raises(UserError, match='10 of 200 records .* 10 with an empty answer'):
    plan_lib.check_dropped(pairs, kept(pairs), records.PREFERENCE, options, ['p.array_record'])
  everything = dataclasses.replace(options, max_dropped_fraction=1.0)
  plan_lib.check_dropped(pairs, kept(pairs), records.PREFERENCE, everything, ['p.array_record'])
