"""The Flax thinker equals transformers' Qwen2_5OmniThinkerForConditionalGeneration (fp32)."""

import numpy as np
import pytest

from hf_reference import hf_logits, make_batch, tiny_hf_model
from saber_jax import convert
from saber_jax.models import thinker_logits

TOLERANCE = 1e-4

CASES = {
    'text_only': ([[('text', 9)]], {}),
    'image_and_text': ([[('text', 3), ('image', (1, 4, 4)), ('text', 4)]], {}),
    'audio_and_text': ([[('text', 3), ('audio', 235), ('text', 4)]], {}),
    # Two TMRoPE chunks (59 audio tokens; t ids 0, 25, 50), 15 audio chunks, a 3x3-unit merged
    # grid cut into uneven 2x2 windows.
    'video_with_audio_interleaved': (
        [[('text', 2), ('video+audio', (3, 6, 6), 1.0, 235), ('text', 2), ('image', (1, 4, 4)),
          ('text', 3)]], dict(use_audio_in_video=True)),
    'video_and_audio_separate': (
        [[('text', 2), ('video', (3, 6, 6), 1.0), ('audio', 120), ('text', 3)]], {}),
    'two_different_rows_left_padded': (
        [[('text', 2), ('image', (1, 4, 4)), ('audio', 50), ('text', 6)],
         [('video', (2, 4, 6), 2.0), ('text', 3), ('image', (1, 2, 6)), ('audio', 30),
          ('text', 2)]], {}),
    'two_different_rows_right_padded': (
        [[('text', 5), ('audio', 70)], [('text', 2), ('image', (1, 6, 4)), ('text', 8)]],
        dict(padding_side='right')),
}


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """(hf_model, checkpoint dir written by save_pretrained, loaded config and params)."""
  model = tiny_hf_model()
  path = tmp_path_factory.mktemp('tiny_thinker')
  model.save_pretrained(path)
  config, params = convert.load_hf(str(path))
  return model, path, config, params


def _max_error(want, got, attention_mask):
  valid = attention_mask.astype(bool)           # padded positions carry no meaning
  return float(np.abs(np.asarray(got) - want)[valid].max())


@pytest.mark.parametrize('case', sorted(CASES))
def test_logits_equal_transformers(reference, case):
  model, _, config, params = reference
  rows, kwargs = CASES[case]
  batch = make_batch(rows, **kwargs)
  want = hf_logits(model, batch)
  got = thinker_logits(config, params, batch)
  assert got.shape == want.shape and got.dtype == np.float32
  assert _max_error(want, got, batch['attention_mask']) < TOLERANCE
