"""Examples (data.examples): the data options, a record's rows and their truncation."""

import ml_collections
import numpy as np
import pytest

from saber_jax.data import examples, records


def test_data_options_read_a_config_dict():
  config = ml_collections.ConfigDict(dict(batch_size=6, num_data_shards=3,
                                          length_buckets=[128, 256],
                                          other_field='ignored'))
  options = examples.data_options(config)
  assert (options.batch_size, options.num_data_shards, options.length_buckets) == (6, 3, (128, 256))
  assert options.overlong == 'truncate'
  with pytest.raises(ValueError, match='multiple of num_data_shards'):
    examples.data_options(dict(batch_size=5, num_data_shards=2))


def test_overlong_pair_row_cuts_the_longer_answer_first():
  record = dict(kind=records.PREFERENCE, prompt_ids=np.arange(100, 110),
                chosen_ids=np.arange(200, 205), chosen_segments=np.ones(5, np.int8),
                rejected_ids=np.arange(300, 320), rejected_segments=np.ones(20, np.int8))
  rows = examples._rows_of(record, shared_prompt=True)
  assert len(rows) == 1 and len(rows[0]['input_ids']) == 9 + (1 + 5) + (1 + 20)
  (row,), truncated = examples._fit_rows(rows, 25, 'truncate')
  # 25 = 9 shared prompt tokens + (last prompt token + 5 chosen) + (last prompt token + 9 rejected)
  assert truncated and len(row['input_ids']) == 25
  np.testing.assert_array_equal(row['input_ids'][9:],
                                [109, *range(200, 205), 109, *range(300, 309)])
  np.testing.assert_array_equal(row['pair_segments'], [1] * 9 + [2] * 6 + [3] * 10)
  assert examples._fit_rows(rows, 12, 'truncate') == (None, False)   # no room for an answer
  assert examples._fit_rows(rows, 25, 'drop') == (None, False)


def test_dpo_loader_refuses_a_degenerate_pair_naming_it(tmp_path):
  """Records not made by our builder or reference pass: DPO stops at a pair with equal
  answers instead of training it at exactly log 2."""
  from saber_jax.data.examples import DataConfig, RecordLoader
  from tiny_data import TINY
  path = records.shard_name(str(tmp_path / 'pairs'), 0, 1)
  records.write_records(path, [records.encode_preference_record(
      id='twins#0', lang='en', duration=1.0, prompt_ids=[1, 2, 3], chosen_ids=[4, 5],
      rejected_ids=[4, 5], chosen_segments=[3, 3], rejected_segments=[3, 3], chosen='a',
      rejected='a', ref_chosen_logps=-1.0, ref_rejected_logps=-1.0)])
  loader = RecordLoader([path], records.PREFERENCE, TINY, DataConfig(), require_reference=True)
  with pytest.raises(records.RecordError, match=rf"{path}:0: record 'twins#0': degenerate pair: "
                     'chosen and rejected answers are equal'):
    loader(0)
  # The reference pass itself reads it (and leaves it out of its output).
  RecordLoader([path], records.PREFERENCE, TINY, DataConfig(), require_reference=False)(0)
