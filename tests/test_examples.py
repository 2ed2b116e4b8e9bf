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
