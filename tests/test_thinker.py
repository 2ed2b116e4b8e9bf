"""The Flax thinker equals transformers' Qwen2_5OmniThinkerForConditionalGeneration (fp32)."""

import dataclasses

import jax
import numpy as np
import pytest

from hf_reference import hf_logits, make_batch, tiny_hf_model
from saber_jax import convert
from saber_jax.models import layers, thinker_logits
from saber_jax.models.thinker import model_inputs

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


def test_length_based_causal_attention_equals_transformers(reference, monkeypatch):
  """attention='cudnn' feeds the decoder each row's length instead of a dense mask
  (`layers.causal_attention`). cuDNN itself needs a GPU (the device check in the README
  runs it); here the same call runs through XLA, so the routing and the lengths are
  checked against transformers."""
  model, _, config, params = reference
  calls = []

  def through_xla(q, k, v, lengths, implementation):
    calls.append(implementation)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                        key_value_seq_lengths=lengths, implementation='xla')
  monkeypatch.setattr(layers, 'causal_attention', through_xla)
  rows, kwargs = CASES['two_different_rows_right_padded']
  batch = make_batch(rows, **kwargs)
  got = thinker_logits(dataclasses.replace(config, attention='cudnn'), params, batch)
  assert calls and set(calls) == {'cudnn'}
  assert _max_error(hf_logits(model, batch), got, batch['attention_mask']) < TOLERANCE


def test_cudnn_attention_needs_right_padding(reference):
  _, _, config, _ = reference
  rows, _ = CASES['two_different_rows_left_padded']
  with pytest.raises(ValueError, match=r'right-padded rows .*rows \[\d'):
    model_inputs(dataclasses.replace(config, attention='cudnn'), make_batch(rows))
  with pytest.raises(ValueError, match='unknown attention'):
    model_inputs(dataclasses.replace(config, attention='flash'), make_batch(rows))
