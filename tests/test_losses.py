"""Tests for saber_jax/losses.py: the SED NLL (Eq. 2) and CA-DPO (Eq. 3) as pure functions,
checked against closed forms, float64 numpy references, transformers' ForCausalLMLoss
and TRL's DPOTrainer code path."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from saber_jax import losses
from saber_jax.batch import IGNORE_INDEX, SEGMENT_NAMES

IGNORE = IGNORE_INDEX


# ---------------------------------------------------------------------------
# Helpers: float64 numpy references.

def reference_token_logps(logits, labels):
  """Plain log_softmax + gather in float64, [B, L-1], 0 where the label is ignored."""
  logits = np.asarray(logits, np.float64)[:, :-1]
  targets = np.asarray(labels)[:, 1:]
  log_probs = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                     keepdims=True)) - logits.max(-1, keepdims=True)
  picked = np.take_along_axis(log_probs, np.maximum(targets, 0)[..., None], -1)[..., 0]
  return np.where(targets != IGNORE, picked, 0.0)


def random_batch(seed, batch=2, length=9, vocab=13, hidden=6, prompt_lengths=(3, 5)):
  """Random logits / hidden / head and labels with a prompt of -100 and a padded tail."""
  rng = np.random.default_rng(seed)
  hidden_states = rng.normal(size=(batch, length, hidden)).astype(np.float32)
  head = rng.normal(size=(hidden, vocab)).astype(np.float32)
  labels = rng.integers(0, vocab, size=(batch, length))
  for row, prompt in enumerate(prompt_lengths[:batch]):
    labels[row, :prompt] = IGNORE
  labels[0, -1] = IGNORE  # right padding
  return hidden_states, head, labels.astype(np.int32)


def log_sigmoid(x):
  return -np.logaddexp(0.0, -np.asarray(x, np.float64))


# ---------------------------------------------------------------------------
# Token / sequence log-probs.

def test_token_logps_closed_form_on_hand_made_logits():
  # Vocabulary of 3 with probabilities 1/8, 2/8, 5/8 at every position.
  row = np.log(np.array([1.0, 2.0, 5.0]))
  logits = jnp.asarray(np.tile(row, (1, 4, 1)), jnp.float32)  # [1, 4, 3]
  labels = jnp.array([[IGNORE, 2, 0, 1]])
  got = losses.token_logps(logits, labels)
  np.testing.assert_allclose(got, [[math.log(5 / 8), math.log(1 / 8), math.log(2 / 8)]],
                             rtol=1e-6)
  np.testing.assert_allclose(losses.sequence_logps(logits, labels), math.log(10 / 512), rtol=1e-6)
  # A prompt label in the middle scores exactly zero.
  labels = jnp.array([[IGNORE, 2, IGNORE, 1]])
  np.testing.assert_array_equal(losses.token_logps(logits, labels)[0, 1], 0.0)


def test_token_logps_matches_float64_log_softmax_gather():
  hidden, head, labels = random_batch(0)
  logits = hidden @ head
  got = losses.token_logps(jnp.asarray(logits), jnp.asarray(labels))
  assert got.shape == (2, 8) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, reference_token_logps(logits, labels), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('chunk_size', [1, 2, 3, 5, 7, 8, 9, 64])
def test_chunked_equals_unchunked(chunk_size):
  hidden, head, labels = random_batch(1, length=9)
  logits = jnp.asarray(hidden @ head)
  whole = losses.token_logps(logits, labels, chunk_size=1024)
  np.testing.assert_allclose(losses.token_logps(logits, labels, chunk_size=chunk_size), whole,
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
      losses.token_logps_from_hidden(hidden, head, labels, chunk_size=chunk_size), whole,
      rtol=1e-5, atol=1e-5)


def test_bf16_logits_are_scored_in_float32():
  hidden, head, labels = random_batch(2)
  logits = jnp.asarray(hidden @ head).astype(jnp.bfloat16)
  got = losses.token_logps(logits, labels, chunk_size=3)
  assert got.dtype == jnp.float32
  reference = reference_token_logps(np.asarray(logits.astype(jnp.float32)), labels)
  np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)


def test_prompt_tokens_contribute_nothing():
  hidden, head, labels = random_batch(3)
  logits = jnp.asarray(hidden @ head)
  segments = jnp.where(jnp.asarray(labels) == IGNORE, 0, 3)
  # Position t predicts labels[t+1]: positions whose next label is ignored are "prompt".
  unused = np.concatenate([labels[:, 1:] == IGNORE, np.ones((2, 1), bool)], axis=1)
  noise = np.random.default_rng(0).normal(scale=50.0, size=logits.shape)
  perturbed = jnp.where(unused[..., None], logits + noise, logits)

  np.testing.assert_array_equal(losses.sequence_logps(logits, labels),
                                losses.sequence_logps(perturbed, labels))
  loss, metrics = losses.sed_loss(logits, labels, segments)
  loss_p, metrics_p = losses.sed_loss(perturbed, labels, segments)
  assert loss == loss_p and metrics == metrics_p
  grad = jax.grad(lambda x: losses.sed_loss(x, labels, segments)[0])(logits)
  assert np.all(np.asarray(grad)[unused] == 0.0)
  assert np.all(np.any(np.asarray(grad)[~unused] != 0.0, axis=-1))


def test_from_hidden_equals_from_logits_values_and_grads():
  hidden, head, labels = random_batch(4, length=11)
  segments = np.where(labels == IGNORE, 0, np.arange(11) % 3 + 1).astype(np.int32)

  def via_logits(h, w):
    return losses.sed_loss(h @ w, labels, segments, chunk_size=4)[0]

  def via_hidden(h, w):
    return losses.sed_loss_from_hidden(h, w, labels, segments, chunk_size=4)[0]

  np.testing.assert_allclose(losses.token_logps_from_hidden(hidden, head, labels, chunk_size=4),
                             losses.token_logps(hidden @ head, labels), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(via_hidden(hidden, head), via_logits(hidden, head), rtol=1e-6)
  grads_logits = jax.jit(jax.grad(via_logits, argnums=(0, 1)))(hidden, head)
  grads_hidden = jax.jit(jax.grad(via_hidden, argnums=(0, 1)))(hidden, head)
  for a, b in zip(grads_hidden, grads_logits):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_grad_matches_finite_differences_in_float64():
  hidden, head, labels = random_batch(5, length=7)
  segments = np.where(labels == IGNORE, 0, 1).astype(np.int32)
  with jax.enable_x64(True):
    hidden64, head64 = jnp.asarray(hidden, jnp.float64), jnp.asarray(head, jnp.float64)
    logits64 = hidden64 @ head64
    check_grads(jax.jit(lambda x: losses.sed_loss(x, labels, segments, chunk_size=3)[0]),
                (logits64,),
                order=1, modes=['rev'], atol=1e-6, rtol=1e-6)
    seq_logps = lambda h, w: jnp.sum(losses.token_logps_from_hidden(h, w, labels, chunk_size=2),
                                     axis=-1)
    check_grads(jax.jit(lambda h, w: seq_logps(h, w).sum()),
                (hidden64, head64), order=1, modes=['rev'], atol=1e-6, rtol=1e-6)
    policy = jnp.array([-3.0, -5.0, -2.5], jnp.float64), jnp.array([-4.0, -4.5, -2.0], jnp.float64)
    ref = jnp.array([-3.5, -4.0, -3.0]), jnp.array([-3.8, -5.0, -2.2])
    lengths = jnp.array([3, 4, 2]), jnp.array([5, 1, 2])
    for loss_type in losses.DPO_LOSS_TYPES:
      def dpo(pi_c, pi_r, loss_type=loss_type):
        return losses.ca_dpo_loss(pi_c, pi_r, *ref, beta=0.7,
                                  label_smoothing=0.2 * (loss_type == 'robust'),
                                  loss_type=loss_type, chosen_lengths=lengths[0],
                                  rejected_lengths=lengths[1])[0]
      check_grads(jax.jit(dpo), policy, order=1, modes=['rev'], atol=1e-6, rtol=1e-6)


def test_from_hidden_never_materialises_full_logits():
  batch, length, vocab, hidden_size, chunk = 2, 256, 4096, 32, 32
  full_logits_bytes = batch * length * vocab * 4
  args = (jax.ShapeDtypeStruct((batch, length, hidden_size), jnp.float32),
          jax.ShapeDtypeStruct((hidden_size, vocab), jnp.float32),
          jax.ShapeDtypeStruct((batch, length), jnp.int32))

  def total(h, w, labels):
    return jnp.sum(losses.token_logps_from_hidden(h, w, labels, chunk_size=chunk), axis=-1).sum()

  for fn in (jax.jit(total), jax.jit(jax.grad(total, argnums=(0, 1)))):
    temp = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert temp < full_logits_bytes / 2, (temp, full_logits_bytes)


def test_token_logps_of_float32_logits_keeps_only_a_chunk_in_float32():
  batch, length, vocab = 2, 256, 4096
  args = (jax.ShapeDtypeStruct((batch, length, vocab), jnp.float32),
          jax.ShapeDtypeStruct((batch, length), jnp.int32))
  fn = jax.jit(lambda x, labels: losses.sequence_logps(x, labels, chunk_size=32).sum())
  temp = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
  assert temp < batch * length * vocab * 4 / 2


def test_mismatched_shapes_raise_clear_errors():
  with pytest.raises(ValueError, match='labels'):
    losses.token_logps(jnp.zeros((2, 5, 3)), jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(ValueError, match='head_kernel'):
    losses.token_logps_from_hidden(jnp.zeros((2, 5, 3)), jnp.zeros((4, 7)),
                                   jnp.zeros((2, 5), jnp.int32))
  with pytest.raises(ValueError, match='segments'):
    losses.sed_loss(jnp.zeros((2, 5, 3)), jnp.zeros((2, 5), jnp.int32),
                    jnp.zeros((2, 4), jnp.int32))


# ---------------------------------------------------------------------------
# SED (Eq. 2).

def test_sed_loss_equals_transformers_causal_lm_loss():
  torch = pytest.importorskip('torch')
  from transformers.loss.loss_utils import ForCausalLMLoss
  hidden, head, labels = random_batch(6, batch=3, length=10, prompt_lengths=(2, 4, 6))
  logits = hidden @ head
  segments = np.where(labels == IGNORE, 0, 1).astype(np.int32)
  expected = ForCausalLMLoss(torch.tensor(logits), torch.tensor(labels, dtype=torch.long),
                             vocab_size=logits.shape[-1]).item()
  loss, metrics = losses.sed_loss(logits, labels, segments, chunk_size=4)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert metrics['tokens'] == np.sum(labels[:, 1:] != IGNORE)
  # With transformers' num_items_in_batch the sum is divided by the given count.
  expected_sum = ForCausalLMLoss(torch.tensor(logits), torch.tensor(labels, dtype=torch.long),
                                 vocab_size=logits.shape[-1],
                                 num_items_in_batch=torch.tensor(40)).item()
  np.testing.assert_allclose(losses.sed_loss(logits, labels, segments, normalizer=40)[0],
                             expected_sum, rtol=1e-6)


def test_sed_segment_metrics_are_per_segment_token_means():
  hidden, head, labels = random_batch(7, batch=2, length=12, prompt_lengths=(3, 3))
  labels[0, -1] = 5  # no padding here: every position after the prompt is a response token
  segments = np.array([[0, 0, 0, 1, 1, 1, 1, 3, 3, 3, 3, 3],
                       [0, 0, 0, 1, 1, 3, 3, 3, 3, 3, 3, 3]], np.int32)
  logits = hidden @ head
  nll = -reference_token_logps(logits, labels)
  next_segment = segments[:, 1:]
  loss, metrics = losses.sed_loss(logits, labels, segments)
  np.testing.assert_allclose(loss, nll[labels[:, 1:] != IGNORE].mean(), rtol=1e-5)
  for segment_id, name in SEGMENT_NAMES.items():
    picked = nll[(next_segment == segment_id) & (labels[:, 1:] != IGNORE)]
    assert metrics[f'tokens/{name}'] == picked.size
    expected = picked.mean() if picked.size else 0.0  # empty segment: defined as 0
    np.testing.assert_allclose(metrics[f'nll/{name}'], expected, rtol=1e-5)
  assert metrics['tokens/acoustic'] == 0 and metrics['nll/acoustic'] == 0.0
  assert metrics['tokens/visual'] == 6 and metrics['tokens/reasoning'] == 12


def test_sed_loss_with_no_response_tokens_is_zero_not_nan():
  logits = jnp.ones((1, 4, 5))
  labels = jnp.full((1, 4), IGNORE)
  loss, metrics = losses.sed_loss(logits, labels, jnp.zeros((1, 4), jnp.int32))
  assert loss == 0.0 and metrics['tokens'] == 0
  grad = jax.grad(lambda x: losses.sed_loss(x, labels, labels * 0)[0])(logits)
  assert np.all(np.asarray(grad) == 0)


# ---------------------------------------------------------------------------
# CA-DPO (Eq. 3).

def test_dpo_loss_is_log2_and_gradient_favours_chosen_when_policy_equals_reference():
  chosen, rejected = jnp.array([-12.0, -7.5]), jnp.array([-9.0, -8.0])
  loss, metrics = losses.ca_dpo_loss(chosen, rejected, chosen, rejected, beta=0.1)
  np.testing.assert_allclose(loss, math.log(2), rtol=1e-7)
  assert metrics['rewards/margins'] == 0.0 and metrics['rewards/accuracies'] == 0.0
  grad_c, grad_r = jax.grad(
      lambda c, r: losses.ca_dpo_loss(c, r, chosen, rejected, beta=0.1)[0], argnums=(0, 1))(
          chosen, rejected)
  # d/d pi_c [-log sig(beta delta)] = -beta sig(0) / B; descent raises chosen, lowers rejected.
  np.testing.assert_allclose(grad_c, [-0.025, -0.025], rtol=1e-6)
  np.testing.assert_allclose(grad_r, [0.025, 0.025], rtol=1e-6)


def reference_dpo(pi_c, pi_r, ref_c, ref_r, beta, eps, loss_type, len_c, len_r):
  """TRL's per-pair formulas (dpo_trainer.py::_compute_loss), in float64 numpy."""
  pi_c, pi_r, ref_c, ref_r = (np.asarray(x, np.float64) for x in (pi_c, pi_r, ref_c, ref_r))
  chosen_ratio, rejected_ratio = pi_c - ref_c, pi_r - ref_r
  delta = chosen_ratio - rejected_ratio
  if loss_type == 'sigmoid':  # cDPO when eps > 0 (TRL <= 0.28, ms-swift)
    per_pair = -(1 - eps) * log_sigmoid(beta * delta) - eps * log_sigmoid(-beta * delta)
  elif loss_type == 'hinge':
    per_pair = np.maximum(0.0, 1 - beta * delta)
  elif loss_type == 'ipo':
    ipo_delta = chosen_ratio / np.maximum(len_c, 1) - rejected_ratio / np.maximum(len_r, 1)
    per_pair = (ipo_delta - 1 / (2 * beta)) ** 2
  else:
    per_pair = ((-(1 - eps) * log_sigmoid(beta * delta) + eps * log_sigmoid(-beta * delta))
                / (1 - 2 * eps))
  reward_c, reward_r = beta * chosen_ratio, beta * rejected_ratio
  return per_pair.mean(), {
      'rewards/chosen': reward_c.mean(), 'rewards/rejected': reward_r.mean(),
      'rewards/margins': (reward_c - reward_r).mean(),
      'rewards/accuracies': (reward_c > reward_r).mean(),
      'logps/chosen': pi_c.mean(), 'logps/rejected': pi_r.mean()}


@pytest.mark.parametrize('loss_type,beta,eps', [
    ('sigmoid', 0.1, 0.0), ('sigmoid', 0.5, 0.2), ('hinge', 0.1, 0.0), ('hinge', 2.0, 0.0),
    ('ipo', 0.1, 0.0), ('ipo', 0.5, 0.0), ('robust', 0.1, 0.1), ('robust', 0.3, 0.0)])
def test_dpo_losses_equal_trl_formulas(loss_type, beta, eps):
  rng = np.random.default_rng(8)
  pi_c, pi_r, ref_c, ref_r = (rng.normal(-30, 6, size=6).astype(np.float32) for _ in range(4))
  len_c, len_r = rng.integers(0, 40, size=6), rng.integers(1, 40, size=6)
  loss, metrics = losses.ca_dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=beta, label_smoothing=eps,
                                     loss_type=loss_type, chosen_lengths=len_c,
                                     rejected_lengths=len_r)
  expected_loss, expected_metrics = reference_dpo(pi_c, pi_r, ref_c, ref_r, beta, eps, loss_type,
                                                  len_c, len_r)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  assert metrics.keys() == expected_metrics.keys()
  for name, value in expected_metrics.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_dpo_rejects_unknown_loss_type_and_bad_arguments():
  x = jnp.zeros(2)
  with pytest.raises(ValueError, match=r"'sigmoid', 'sigmoid_norm', 'ipo', 'hinge', 'robust'"):
    losses.ca_dpo_loss(x, x, x, x, loss_type='kto')
  for loss_type in ('ipo', 'sigmoid_norm'):
    with pytest.raises(ValueError, match='chosen_lengths'):
      losses.ca_dpo_loss(x, x, x, x, loss_type=loss_type)
  with pytest.raises(ValueError, match='chosen_lengths'):
    losses.ca_dpo_loss(x, x, x, x, sft_weight=0.5)
  with pytest.raises(ValueError, match=r'\[0, 0.5\)'):
    losses.ca_dpo_loss(x, x, x, x, loss_type='robust', label_smoothing=0.5)


# ---------------------------------------------------------------------------
# Parity with TRL's own code: the fused LM head and DPOTrainer._compute_loss run on a
# tiny transformers Qwen2 model; ours runs on the same model's logits / hidden states.

@pytest.fixture(scope='module')
def trl_setup():
  torch = pytest.importorskip('torch')
  trl = pytest.importorskip('trl')
  import transformers
  from trl.trainer.utils import add_fused_lm_head
  config = transformers.Qwen2Config(vocab_size=40, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, max_position_embeddings=64)
  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(config).float().eval()
  with torch.no_grad():
    model.lm_head.weight.mul_(40.0)  # sharper distributions than the 0.02-std init
  add_fused_lm_head(model, outputs=('log_probs', 'entropy', 'mean_logits', 'is_top1'))

  pairs, length = 3, 10
  rng = np.random.default_rng(9)
  input_ids = torch.tensor(rng.integers(0, 40, (2 * pairs, length)))  # [chosen; rejected]
  attention_mask = torch.ones(2 * pairs, length, dtype=torch.long)
  attention_mask[0, -2:] = 0
  attention_mask[4, -3:] = 0
  completion_mask = torch.zeros_like(attention_mask)
  for row, prompt in enumerate([3, 4, 2, 5, 3, 6]):
    completion_mask[row, prompt:] = 1
  completion_mask *= attention_mask
  labels = input_ids.masked_fill(completion_mask == 0, IGNORE)
  with torch.no_grad():
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    trl_log_probs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                          fused_lm_head=True).log_probs
  inputs = {'input_ids': input_ids, 'attention_mask': attention_mask,
            'completion_mask': completion_mask,
            'ref_chosen_logps': torch.tensor(rng.normal(-40, 4, pairs), dtype=torch.float32),
            'ref_rejected_logps': torch.tensor(rng.normal(-40, 4, pairs), dtype=torch.float32)}
  return dict(torch=torch, trl=trl, model=model, inputs=inputs, labels=labels.numpy(),
              logits=logits.numpy(), hidden=hidden.numpy(),
              head=model.lm_head.weight.detach().numpy().T, trl_log_probs=trl_log_probs.numpy())


def test_token_logps_equal_trl_fused_lm_head(trl_setup):
  s = trl_setup
  np.testing.assert_allclose(losses.token_logps(s['logits'], s['labels'], chunk_size=4),
                             s['trl_log_probs'], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      losses.token_logps_from_hidden(s['hidden'], s['head'], s['labels'], chunk_size=3),
      s['trl_log_probs'], rtol=1e-5, atol=1e-5)


def run_trl_dpo_loss(s, loss_type, beta, label_smoothing, sft_weight=0.0):
  """TRL's DPOTrainer._compute_loss, called with the attributes it reads from the trainer
  (precomputed reference log-probs, single process); sft_weight > 0 adds TRL's 'sft' loss
  with that weight."""
  import collections
  import types
  import accelerate
  torch, trl = s['torch'], s['trl']
  trainer = types.SimpleNamespace(
      model=s['model'], accelerator=accelerate.Accelerator(cpu=True), aux_loss_enabled=False,
      ld_alpha=None, precompute_ref_logps=True, f_divergence_type='reverse_kl',
      loss_types=[loss_type] + ['sft'] * bool(sft_weight),
      loss_weights=[1.0] + [sft_weight] * bool(sft_weight), beta=beta,
      label_smoothing=label_smoothing,
      use_weighting=False, _total_train_tokens=0, _tp_size=1,
      _metrics={'train': collections.defaultdict(list), 'eval': collections.defaultdict(list)})
  with torch.no_grad():
    loss = trl.DPOTrainer._compute_loss(trainer, s['model'], s['inputs'], False)
  return loss.item(), {name: values[-1] for name, values in trainer._metrics['eval'].items()}


@pytest.mark.parametrize('loss_type,beta,eps,sft_weight', [
    ('sigmoid', 0.1, 0.0, 0.0), ('hinge', 0.1, 0.0, 0.0), ('ipo', 0.5, 0.0, 0.0),
    ('robust', 0.1, 0.1, 0.0), ('sigmoid_norm', 0.5, 0.0, 0.0), ('sigmoid', 0.1, 0.0, 0.7),
    ('sigmoid_norm', 0.5, 0.0, 1.5)])
def test_dpo_equals_trl_dpo_trainer_compute_loss(trl_setup, loss_type, beta, eps, sft_weight):
  s = trl_setup
  expected_loss, expected_metrics = run_trl_dpo_loss(s, loss_type, beta, eps, sft_weight)
  pairs = s['labels'].shape[0] // 2
  seq_logps = jnp.sum(losses.token_logps_from_hidden(s['hidden'], s['head'], s['labels'],
                                                     chunk_size=4), axis=-1)
  lengths = losses.response_lengths(s['labels'])
  loss, metrics = losses.ca_dpo_loss(
      seq_logps[:pairs], seq_logps[pairs:], s['inputs']['ref_chosen_logps'].numpy(),
      s['inputs']['ref_rejected_logps'].numpy(), beta=beta, label_smoothing=eps,
      loss_type=loss_type, chosen_lengths=lengths[:pairs], rejected_lengths=lengths[pairs:],
      sft_weight=sft_weight)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  for name, value in metrics.items():
    np.testing.assert_allclose(value, expected_metrics[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_dpo_pair_mask_leaves_padded_pairs_out():
  pc, pr = jnp.array([-3.0, -9.0, -1.0]), jnp.array([-5.0, -2.0, -4.0])
  rc, rr = jnp.array([-4.0, -8.0, -7.0]), jnp.array([-4.0, -3.0, -1.0])
  mask = jnp.array([True, False, True])
  masked, masked_metrics = losses.ca_dpo_loss(pc, pr, rc, rr, beta=0.5, pair_mask=mask)
  kept, kept_metrics = losses.ca_dpo_loss(pc[mask], pr[mask], rc[mask], rr[mask], beta=0.5)
  np.testing.assert_allclose(masked, kept, rtol=1e-6)
  for name, value in kept_metrics.items():
    np.testing.assert_allclose(masked_metrics[name], value, rtol=1e-6, err_msg=name)
