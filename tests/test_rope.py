"""TMRoPE position ids equal transformers' get_rope_index, case by case."""

import numpy as np
import pytest

from hf_reference import hf_rope_index, make_batch, tiny_hf_model
from saber_jax.models.config import ThinkerConfig
from saber_jax.models.rope import chunk_bounds, rope_index

CASES = {
    'text_only': ([[('text', 7)], [('text', 4)]], {}),
    'image_and_text': ([[('text', 3), ('image', (1, 4, 4)), ('text', 2)]], {}),
    'audio_and_text': ([[('text', 3), ('audio', 40), ('text', 2)]], {}),
    # 59 audio tokens and t ids 0, 25, 50: two TMRoPE chunks.
    'video_with_audio_interleaved': (
        [[('text', 2), ('video+audio', (3, 6, 6), 1.0, 235), ('text', 1), ('image', (1, 4, 4)),
          ('text', 2)]], dict(use_audio_in_video=True)),
    # t ids 0, 50, 100 jump a whole chunk per grid; a 0.5 s grid gives fractional times.
    'interleaved_batch_with_chunk_jumps': (
        [[('text', 2), ('video+audio', (3, 6, 6), 2.0, 235), ('text', 1)],
         [('text', 3), ('video+audio', (2, 4, 6), 0.5, 90)]], dict(use_audio_in_video=True)),
    'video_and_audio_separate': (
        [[('text', 2), ('video', (3, 6, 6), 1.0), ('audio', 235), ('text', 3)]], {}),
    'two_rows_several_media': (
        [[('text', 2), ('image', (1, 4, 4)), ('audio', 50), ('text', 2)],
         [('video', (2, 4, 4), 2.0), ('text', 5), ('image', (1, 2, 6)), ('audio', 30)]], {}),
}


@pytest.fixture(scope='module')
def hf_model():
  return tiny_hf_model()


@pytest.mark.parametrize('padding_side', ['left', 'right'])
@pytest.mark.parametrize('case', sorted(CASES))
def test_rope_index_equals_get_rope_index(hf_model, case, padding_side):
  rows, kwargs = CASES[case]
  batch = make_batch(rows, padding_side=padding_side, **kwargs)
  config = ThinkerConfig.from_hf(hf_model.config.to_dict())
  want_positions, want_deltas = hf_rope_index(hf_model, batch)
  positions, deltas = rope_index(config, batch)
  np.testing.assert_array_equal(positions, want_positions)
  np.testing.assert_array_equal(deltas, want_deltas)


def test_chunk_bounds_cut_once_per_token():
  # A jump over two chunk widths cuts twice, at consecutive tokens (get_chunked_index).
  assert chunk_bounds([0, 0, 100, 100, 100], 50, 0) == [(0, 2), (2, 3), (3, 5)]
  assert chunk_bounds(list(range(120)), 50, 0) == [(0, 50), (50, 100), (100, 120)]


def test_wrong_placeholder_count_names_the_row(hf_model):
  config = ThinkerConfig.from_hf(hf_model.config.to_dict())
  batch = make_batch([[('text', 2), ('image', (1, 4, 4))]])
  batch['image_grid_thw'] = np.array([[1, 4, 8]])
  with pytest.raises(ValueError, match='row 0: expected 8 image tokens'):
    rope_index(config, batch)
