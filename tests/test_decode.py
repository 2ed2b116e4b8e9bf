"""KV-cache generation equals transformers' `generate` (greedy, fp32), and the sampler equals
transformers' logits warpers; sampling, EOS handling, padding and sharding properties."""

import jax
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from hf_reference import make_batch, tiny_hf_model
from saber_jax import convert, sharding
from saber_jax import decode as gen
from saber_jax.data import collate
from saber_jax.data.prompt import load_tokenizer
from saber_jax.models import abstract_params, model_inputs, thinker_logits

NEW_TOKENS = 24
PAD = 0                       # inside the tiny 99-id vocabulary
TEXT_ROWS = [[('text', 5)], [('text', 9)]]
MEDIA_ROWS = [[('text', 2), ('video+audio', (3, 6, 6), 1.0, 235), ('text', 2)],
              [('text', 4), ('image', (1, 4, 4)), ('text', 3)]]


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """(hf_model, config, params). Weights get a second, larger perturbation: with only the
  shared one the tiny model repeats one token greedily, which would hide a wrong position
  or cache slot."""
  model = tiny_hf_model(seed=0)
  torch.manual_seed(100)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.2)
  path = tmp_path_factory.mktemp('tiny_thinker')
  model.save_pretrained(path)
  config, params = convert.load_hf(str(path))
  return model, config, params


def hf_generate(model, batch, **kwargs):
  """transformers' greedy generate on a numpy batch -> (new tokens [B, N] padded with PAD to
  NEW_TOKENS, log-probs of those tokens [B, N] from the raw step logits)."""
  inputs = {k: torch.as_tensor(v) for k, v in batch.items() if k != 'use_audio_in_video'}
  kwargs = dict(dict(eos_token_id=None), **kwargs)
  with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD,
                         use_audio_in_video=bool(batch.get('use_audio_in_video', False)),
                         return_dict_in_generate=True, output_logits=True, **kwargs)
  tokens = out.sequences[:, batch['input_ids'].shape[1]:].numpy()
  logprobs = np.stack([torch.log_softmax(step.float(), -1).gather(-1, tok[:, None])[:, 0].numpy()
                       for step, tok in zip(out.logits, torch.as_tensor(tokens).T)], axis=1)
  width = NEW_TOKENS - tokens.shape[1]             # generate stops once every row is done
  return np.pad(tokens, ((0, 0), (0, width)), constant_values=PAD), logprobs


@pytest.fixture(scope='module')
def text_greedy(reference):
  model, _, _ = reference
  batch = make_batch(TEXT_ROWS)
  return batch, hf_generate(model, batch)


def test_greedy_text_rows_left_padded_equal_transformers_generate(reference, text_greedy):
  _, config, params = reference
  batch, (want_tokens, want_logprobs) = text_greedy
  assert len(set(want_tokens[0].tolist())) > NEW_TOKENS // 2     # not a repeated token
  out = gen.generate(config, params, batch, max_new_tokens=NEW_TOKENS, eos_token_ids=(),
                     pad_token_id=PAD)
  np.testing.assert_array_equal(out['tokens'], want_tokens)
  np.testing.assert_allclose(out['logprobs'], want_logprobs, atol=1e-4, rtol=0)
  np.testing.assert_array_equal(out['lengths'], [NEW_TOKENS] * 2)
  assert not out['finished'].any() and out['steps'] == NEW_TOKENS


def test_greedy_with_audio_in_video_and_image_equals_transformers_generate(reference):
  model, config, params = reference
  batch = make_batch(MEDIA_ROWS, use_audio_in_video=True)
  assert (batch['attention_mask'] == 0).any()                  # the rows really are padded
  want_tokens, want_logprobs = hf_generate(model, batch)
  out = gen.generate(config, params, batch, max_new_tokens=NEW_TOKENS, eos_token_ids=(),
                     pad_token_id=PAD)
  np.testing.assert_array_equal(out['tokens'], want_tokens)
  np.testing.assert_allclose(out['logprobs'], want_logprobs, atol=1e-4, rtol=0)


def test_right_padded_batch_gives_the_left_padded_result(reference, text_greedy):
  _, config, params = reference
  _, (want_tokens, _) = text_greedy
  batch = make_batch(TEXT_ROWS, padding_side='right')
  assert batch['attention_mask'][0, -1] == 0
  out = gen.generate(config, params, batch, max_new_tokens=NEW_TOKENS, eos_token_ids=(),
                     pad_token_id=PAD)
  np.testing.assert_array_equal(out['tokens'], want_tokens)


def test_rows_stop_at_eos_and_pad_after_as_transformers(reference, text_greedy):
  model, config, params = reference
  batch, (free_running, _) = text_greedy
  # An EOS id that row 0 first emits at step >= 3; each row should stop at its first one.
  k = next(k for k in range(3, NEW_TOKENS) if free_running[0, k] not in free_running[0, :k])
  eos = (int(free_running[0, k]), 98 if free_running[0, k] != 98 else 97)
  first_eos = [int(np.flatnonzero(np.isin(row, eos))[0]) if np.isin(row, eos).any()
               else NEW_TOKENS for row in free_running]
  want_tokens, _ = hf_generate(model, batch, eos_token_id=list(eos))
  out = gen.generate(config, params, batch, max_new_tokens=NEW_TOKENS, eos_token_ids=eos,
                     pad_token_id=PAD)
  np.testing.assert_array_equal(out['tokens'], want_tokens)
  np.testing.assert_array_equal(out['lengths'], first_eos)
  np.testing.assert_array_equal(out['finished'], [n < NEW_TOKENS for n in first_eos])
  for row, n in zip(out['tokens'], first_eos):
    if n < NEW_TOKENS:
      assert row[n] in eos and (row[n + 1:] == PAD).all()
  assert (out['logprobs'][0, first_eos[0] + 1:] == 0).all()
  # The loop exits once every row is done (or runs to the end).
  assert out['steps'] == min(max(first_eos) + 1, NEW_TOKENS)


def test_samples_are_reproducible_differ_and_score_as_the_full_forward(reference):
  _, config, params = reference
  batch = make_batch(TEXT_ROWS)
  kwargs = dict(max_new_tokens=8, temperature=0.8, num_samples=3, eos_token_ids=(),
                pad_token_id=PAD)
  out = gen.generate(config, params, batch, seed=0, **kwargs)
  again = gen.generate(config, params, batch, seed=0, **kwargs)
  other = gen.generate(config, params, batch, seed=1, **kwargs)
  assert out['tokens'].shape == (6, 8)
  np.testing.assert_array_equal(out['tokens'], again['tokens'])
  assert (out['tokens'] != other['tokens']).any()
  for prompt in range(2):
    samples = out['tokens'][3 * prompt:3 * prompt + 3]
    assert len({tuple(s) for s in samples}) > 1
  # Row b * 3 + j continues prompt b: the full forward (no cache) over prompt + sample gives
  # the log-probs recorded while decoding.
  full = dict(batch)
  full['input_ids'] = np.concatenate([np.repeat(batch['input_ids'], 3, 0), out['tokens']], 1)
  full['attention_mask'] = np.concatenate([np.repeat(batch['attention_mask'], 3, 0),
                                           np.ones_like(out['tokens'])], 1)
  logits = np.asarray(thinker_logits(config, params, full))
  prompt_len = batch['input_ids'].shape[1]
  step_logits = logits[:, prompt_len - 1:-1]
  log_softmax = step_logits - np.log(np.exp(step_logits).sum(-1, keepdims=True))
  want = np.take_along_axis(log_softmax, out['tokens'][..., None], -1)[..., 0]
  np.testing.assert_allclose(out['logprobs'], want, atol=1e-4, rtol=0)


@pytest.mark.parametrize('sampling', [dict(temperature=0.8, top_k=1),
                                      dict(temperature=1e-4)])
def test_top_k_one_and_vanishing_temperature_are_greedy(reference, text_greedy, sampling):
  _, config, params = reference
  batch, (want_tokens, _) = text_greedy
  out = gen.generate(config, params, batch, max_new_tokens=NEW_TOKENS, num_samples=2,
                     eos_token_ids=(), pad_token_id=PAD, seed=3, **sampling)
  np.testing.assert_array_equal(out['tokens'], np.repeat(want_tokens, 2, axis=0))


@pytest.mark.parametrize('temperature, top_k, top_p', [
    (0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.8, 10, 0.9), (1.0, 0, 0.05), (1.0, 500, 0.5)])
def test_filter_logits_equals_transformers_warpers(temperature, top_k, top_p):
  logits = np.random.default_rng(0).standard_normal((6, 50)).astype(np.float32) * 3
  want = torch.as_tensor(logits)
  for warper, used in ((TemperatureLogitsWarper(temperature), True),
                       (TopKLogitsWarper(max(top_k, 1)), top_k > 0),
                       (TopPLogitsWarper(top_p), top_p < 1)):
    if used:
      want = warper(None, want)
  want = want.numpy()
  got = np.asarray(gen.filter_logits(logits, temperature, top_k, top_p))
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  assert np.isinf(got).any() == (top_k > 0 and top_k < 50 or top_p < 1)
  np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6)


def test_top_k_keeps_every_id_tied_with_the_kth_as_transformers():
  logits = np.array([[3., 1., 2., 2., 0., 2.]], np.float32)
  want = TopKLogitsWarper(2)(None, torch.as_tensor(logits)).numpy()
  got = np.asarray(gen.filter_logits(logits, 1.0, top_k=2))
  np.testing.assert_array_equal(got, want)
  assert np.isfinite(got).sum() == 4


def test_categorical_draws_from_the_softmax_and_never_a_masked_id():
  # 10 ids in blocks of 4 (the last block padded); ids 1 and 6 are masked out.
  logits = np.log(np.array([4., 1., 2., 1., 3., 1., 1., 5., 2., 1.], np.float32))
  logits[[1, 6]] = -np.inf
  probs = np.exp(logits) / np.exp(logits).sum()
  draws = np.asarray(gen.categorical(jax.random.key(0), np.tile(logits, (40000, 1)), block=4))
  freq = np.bincount(draws, minlength=10) / len(draws)
  assert freq[1] == 0 and freq[6] == 0
  np.testing.assert_allclose(freq, probs, atol=4 * np.sqrt(probs.max() / len(draws)))


def test_top_p_samples_only_the_nucleus():
  # probabilities 0.5, 0.3, 0.15, 0.05: the 0.7 nucleus is the first two ids (0.5 < 0.7).
  logits = np.log(np.array([[0.15, 0.5, 0.05, 0.3]], np.float32))
  draws = np.asarray(gen.sample_logits(jax.random.key(1), np.tile(logits, (20000, 1)),
                                       temperature=1.0, top_p=0.7))
  freq = np.bincount(draws, minlength=4) / len(draws)
  assert freq[0] == 0 and freq[2] == 0
  np.testing.assert_allclose(freq[[1, 3]], [0.625, 0.375], atol=0.015)


def test_decode_responses_cuts_at_lengths():
  tokenizer = load_tokenizer()
  text = 'Visual evidence: a frown. 她皱眉。'
  ids = tokenizer.encode(text)
  tokens = np.full((2, len(ids) + 4), gen.PAD_TOKEN_ID, np.int32)
  tokens[0, :len(ids)] = ids
  tokens[0, len(ids)] = 151645                                  # <|im_end|>
  tokens[1, 0] = 151645
  assert gen.decode_responses(tokenizer, tokens, [len(ids), 0]) == [text, '']


def test_left_pad_moves_rows_and_rejects_holes():
  batch = dict(input_ids=np.array([[5, 6, 7, 0], [0, 0, 8, 9]]),
               attention_mask=np.array([[1, 1, 1, 0], [0, 0, 1, 1]]),
               position_ids=np.array([[[0, 1, 2, 1], [1, 1, 0, 1]]] * 3))
  out = collate.left_pad(batch, length=5, pad_id=0)
  np.testing.assert_array_equal(out['input_ids'], [[0, 0, 5, 6, 7], [0, 0, 0, 8, 9]])
  np.testing.assert_array_equal(out['attention_mask'], [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
  np.testing.assert_array_equal(out['position_ids'][0], [[1, 1, 0, 1, 2], [1, 1, 1, 0, 1]])
  np.testing.assert_array_equal(gen.first_new_positions(out['position_ids'],
                                                        out['attention_mask']), [3, 2])
  with pytest.raises(ValueError, match='row 0: attention_mask has padding between'):
    collate.left_pad(dict(input_ids=np.ones((1, 4)), attention_mask=np.array([[1, 0, 1, 1]])),
                     None, gen.PAD_TOKEN_ID)


def test_bad_settings_are_named(reference):
  _, config, params = reference
  batch = make_batch(TEXT_ROWS)
  with pytest.raises(ValueError, match=r'pad_token_id \(151643,\) outside the vocabulary of 99'):
    gen.generate(config, params, batch, max_new_tokens=2, eos_token_ids=())
  with pytest.raises(ValueError, match='top_p=1.5'):
    gen.generate(config, params, batch, max_new_tokens=2, eos_token_ids=(), pad_token_id=PAD,
                 temperature=1.0, top_p=1.5)


def test_sharded_generation_matches_one_device(reference, text_greedy):
  _, config, params = reference
  mesh = sharding.make_mesh((2, 2, 2))
  placed = jax.device_put(params, sharding.tree_shardings(abstract_params(config), mesh))
  batch, (want_tokens, _) = text_greedy
  batch = {k: np.tile(v, (2, 1)) for k, v in batch.items()}   # 4 rows over data x fsdp
  inputs = model_inputs(config, batch)
  first = gen.first_new_positions(inputs['position_ids'], inputs['attention_mask'])
  inputs = sharding.global_batch(dict(inputs, first=first), mesh)
  settings = gen.DecodeSettings(8, eos_token_ids=(), pad_token_id=PAD)
  out = gen.generate_inputs(config, settings, placed, {k: v for k, v in inputs.items()
                                                       if k != 'first'},
                            inputs['first'], jax.random.key(0))
  assert inputs['input_ids'].sharding.spec[0] == ('data', 'fsdp')
  np.testing.assert_array_equal(np.asarray(out['tokens']), np.tile(want_tokens[:, :8], (2, 1)))


def test_finished_rows_leave_the_decode_batch_without_changing_a_sample(reference):
  """With rows ending at different steps, the loop that halves its batch to the rows still
  going (16 -> 8 -> 4 -> 2 -> 1 slots, one while loop each in one program) gives every row
  the tokens, log-probs, length and end flag of the loop that keeps all 16 rows."""
  _, config, params = reference
  batch = make_batch(TEXT_ROWS)
  kw = dict(max_new_tokens=40, temperature=1.0, num_samples=8, eos_token_ids=(5, 6, 7, 8, 9),
            pad_token_id=PAD, seed=3)
  want = gen.generate(config, params, batch, compact_rows=False, **kw)
  got = gen.generate(config, params, batch, **kw)
  ends = want['lengths'][want['finished']]
  assert want['finished'].sum() >= 8 and len(set(ends.tolist())) >= 4   # rows end apart
  for key in ('tokens', 'lengths', 'finished', 'steps'):
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  np.testing.assert_allclose(got['logprobs'], want['logprobs'], atol=1e-6, rtol=0)
  assert gen.halvings(16, 1) == [16, 8, 4, 2, 1] and gen.halvings(16, 4) == [16, 8, 4]
  assert gen.halvings(12, 4) == [12]
  inputs = model_inputs(config, collate.left_pad(batch, None, PAD))
  first = gen.first_new_positions(inputs['position_ids'], inputs['attention_mask'])
  lowered = lambda compact: gen.generate_inputs.lower(
      config, gen.DecodeSettings(40, 1.0, num_samples=12, eos_token_ids=(5,), pad_token_id=PAD,
                                 compact_rows=compact),
      params, inputs, first, jax.random.key(0)).as_text()
  t = config.text
  cache = lambda rows: (f'tensor<{t.num_hidden_layers}x{rows}x{inputs["input_ids"].shape[1] + 40}x'
                        f'{t.num_key_value_heads}x{t.head_dim}xf32>')
  compacted, full = lowered(True), lowered(False)
  # 2 prompts x 12 samples: the loop's cache at 24 rows, then 12, 6 and 3 when compacting.
  assert all(cache(rows) in compacted and cache(rows) not in full for rows in (12, 6, 3))
