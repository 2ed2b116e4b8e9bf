"""The loss math of SABER-LLM (arXiv 2601.18321) as pure functions on plain arrays.

* SED (Eq. 2): supervised next-token NLL on the structured target, visual evidence ->
  acoustic evidence -> reasoning, averaged over response tokens.
* CA-DPO (Eq. 3): the DPO sigmoid loss on consistency-aware preference pairs,
  `-log sigmoid(beta * delta)` with
  `delta = (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))`.

Label convention (transformers): `labels` [B, L] is aligned with `input_ids` and holds
-100 (`IGNORE_INDEX`) wherever nothing is trained (prompt, media, padding). The
functions shift internally: the logits at position t score the label at t + 1. Per-token
outputs therefore have L - 1 positions, `[B, L-1]`, exactly as TRL's
`selective_log_softmax(logits[:, :-1], input_ids[:, 1:])`.

Everything is computed in float32 (float64 stays float64) whatever the input dtype.
Log-probs are computed chunk by chunk over the sequence (`saber_jax.lm_head`), so no
[B, L, V] float32 array (and no one-hot) is ever built: Qwen's vocabulary has 152K entries.
"""

import jax
import jax.numpy as jnp

from saber_jax import lm_head
from saber_jax.batch import CHOSEN, IGNORE_INDEX, REJECTED, SEGMENT_NAMES
from saber_jax.lm_head import DEFAULT_CHUNK_SIZE

DPO_LOSS_TYPES = ('sigmoid', 'sigmoid_norm', 'ipo', 'hinge', 'robust')


# ---------------------------------------------------------------------------
# Token log-probs.

def _next_token_targets(labels):
  """labels [B, L] -> targets [B, L]: the label each position predicts (t -> t+1);
  the last position predicts nothing and gets IGNORE_INDEX."""
  pad = jnp.full((labels.shape[0], 1), IGNORE_INDEX, labels.dtype)
  return jnp.concatenate([labels[:, 1:], pad], axis=1)


def _check_labels(name, array, labels):
  if array.shape[:2] != labels.shape:
    raise ValueError(f'{name} {array.shape} and labels {labels.shape} disagree on [B, L]')
  if labels.shape[1] < 2:
    raise ValueError(f'need at least 2 positions to score a next token, got labels {labels.shape}')


def token_logps(logits, labels, *, chunk_size: int = DEFAULT_CHUNK_SIZE):
  """log p(label_{t+1} | <= t) of every label token.

  Args:
    logits: [B, L, V], any float dtype (computed in float32 one chunk at a time).
    labels: [B, L] int, aligned with input_ids, IGNORE_INDEX where not trained.
    chunk_size: sequence positions per chunk; memory is O(B * chunk_size * V).
  Returns:
    [B, L-1] float32; column t scores labels[:, t+1]; 0 where that label is ignored.

  The training step should prefer `token_logps_from_hidden`: here the logits already
  exist, and their gradient is a full [B, L, V] array. (XLA:CPU also upcasts a bf16
  dynamic slice through a whole-array float32 copy; float32 logits stay bounded.)
  """
  labels = jnp.asarray(labels)
  _check_labels('logits', logits, labels)
  targets = _next_token_targets(labels)
  per_token = lm_head.map_over_sequence(lm_head.logps_of_targets, labels.shape[1], chunk_size,
                                        logits, targets)
  return per_token[:, :-1]


def token_logps_from_hidden(hidden, head_kernel, labels, *, chunk_size: int = DEFAULT_CHUNK_SIZE):
  """`token_logps(hidden @ head_kernel, labels)` without ever building the full logits.

  The scored positions of each row are gathered to its front and projected through the LM
  head chunk by chunk (float32 accumulation); each chunk's logits are reduced to one
  log-prob per position and dropped. The backward pass recomputes a chunk's logits from
  the hidden states and the saved log-normalisers (`lm_head.head_logps`), so memory stays
  O(B * chunk_size * V) both ways.

  Args:
    hidden: [B, L, H] final (normed) hidden states.
    head_kernel: [H, V] LM head kernel (for tied embeddings pass `embedding.T`).
    labels: [B, L] int, as in `token_logps`.
  Returns:
    [B, L-1] float32.
  """
  labels = jnp.asarray(labels)
  _check_labels('hidden', hidden, labels)
  lm_head.check_head(hidden, head_kernel)
  return lm_head.head_logps(hidden, head_kernel, _next_token_targets(labels), chunk_size)[:, :-1]


def response_mask(labels):
  """[B, L] labels -> [B, L-1] bool: which `token_logps` columns are trained."""
  return jnp.asarray(labels)[:, 1:] != IGNORE_INDEX


def response_lengths(labels):
  """[B, L] labels -> [B] int32: number of response (trained) tokens per sequence."""
  return jnp.sum(response_mask(labels), axis=-1, dtype=jnp.int32)


def sequence_logps(logits, labels, *, chunk_size: int = DEFAULT_CHUNK_SIZE):
  """[B] float32: log p(response | prompt), summed over response tokens (as TRL's
  DPOTrainer: summed, not averaged)."""
  return jnp.sum(token_logps(logits, labels, chunk_size=chunk_size), axis=-1)


def split_pairs(per_token, labels, pair_segments, num_pairs: int):
  """Per-token values [B, L-1] (e.g. `token_logps`) summed over each pair's chosen and
  over its rejected response tokens -> (chosen [P], rejected [P]).

  A preference batch holds its P pairs either one per row (B = P, the shared-prompt
  layout `[prompt | chosen | rejected]`) or in rows 2i and 2i + 1 (B = 2P); `pair_segments`
  [B, L] says which answer each token belongs to, whatever the layout.
  """
  scored = response_mask(labels)
  answer = jnp.asarray(pair_segments)[:, 1:]      # the answer of each column's target
  per_pair = lambda side: jnp.sum(jnp.where(scored & (answer == side), per_token, 0),
                                  axis=-1).reshape(num_pairs, -1).sum(-1)
  return per_pair(CHOSEN), per_pair(REJECTED)


# ---------------------------------------------------------------------------
# SED: Structured Evidence Decomposition SFT (Eq. 2).

def sed_loss_from_token_logps(per_token_logps, labels, segments, *, normalizer=None):
  """The shared core of `sed_loss` given `per_token_logps` [B, L-1] from `token_logps`.

  loss = -sum_t log p(y_t) / #response tokens over the whole batch (Eq. 2, the
  token-mean NLL of transformers' `ForCausalLMLoss`). `normalizer`, when given, replaces
  the token count as the denominator (transformers' `num_items_in_batch`: pass the
  response-token count of the whole accumulated batch to weight every token alike
  across micro-batches).

  Metrics:
    `tokens`: number of response tokens in the batch.
    `nll/{visual,acoustic,reasoning}`: token-mean NLL over the response tokens of that
      segment, and `tokens/{...}` their count. A segment with no tokens in the batch
      reports NLL 0 and count 0 (so averages over steps should weight by the count).
  """
  if segments.shape != labels.shape:
    raise ValueError(f'segments {segments.shape} must have the shape of labels {labels.shape}')
  mask = response_mask(labels)
  next_segment = segments[:, 1:]
  nll = -per_token_logps
  num_tokens = jnp.sum(mask)
  if normalizer is None:
    normalizer = jnp.maximum(num_tokens, 1)
  loss = jnp.sum(jnp.where(mask, nll, 0.0)) / normalizer
  metrics = {'tokens': num_tokens}
  for segment_id, name in SEGMENT_NAMES.items():
    in_segment = mask & (next_segment == segment_id)
    count = jnp.sum(in_segment)
    metrics[f'nll/{name}'] = jnp.sum(jnp.where(in_segment, nll, 0.0)) / jnp.maximum(count, 1)
    metrics[f'tokens/{name}'] = count
  return loss, metrics


def sed_loss(logits, labels, segments, *, chunk_size: int = DEFAULT_CHUNK_SIZE, normalizer=None):
  """SED loss (Eq. 2) from logits.

  Args:
    logits: [B, L, V].
    labels: [B, L] int, IGNORE_INDEX where not trained.
    segments: [B, L] int aligned with labels: 0 prompt, 1 visual evidence,
      2 acoustic evidence, 3 reasoning.
    normalizer: optional denominator, see `sed_loss_from_token_logps`.
  Returns:
    (scalar loss, metrics) as in `sed_loss_from_token_logps`.
  """
  return sed_loss_from_token_logps(token_logps(logits, labels, chunk_size=chunk_size),
                                   labels, segments, normalizer=normalizer)


def sed_loss_from_hidden(hidden, head_kernel, labels, segments, *,
                         chunk_size: int = DEFAULT_CHUNK_SIZE, normalizer=None):
  """SED loss (Eq. 2) from final hidden states [B, L, H] and the LM head [H, V].

  Same value, metrics and gradients as `sed_loss(hidden @ head_kernel, ...)`. The loss is
  linear in the token log-probs, so the head's gradients are formed in the same pass as
  the log-probs (`lm_head.weighted_logp_sum`) and no chunk's logits are recomputed.
  """
  labels = jnp.asarray(labels)
  _check_labels('hidden', hidden, labels)
  lm_head.check_head(hidden, head_kernel)
  targets = _next_token_targets(labels)
  scored = targets != IGNORE_INDEX
  denominator = jnp.maximum(jnp.sum(scored), 1) if normalizer is None else normalizer
  weights = jnp.where(scored, 1.0, 0.0).astype(lm_head.compute_dtype(hidden.dtype)) / denominator
  total, per_token = lm_head.weighted_logp_sum(hidden, head_kernel, targets, weights, chunk_size)
  _, metrics = sed_loss_from_token_logps(jax.lax.stop_gradient(per_token)[:, :-1], labels,
                                         segments, normalizer=normalizer)
  return -total, metrics




# ---------------------------------------------------------------------------
# CA-DPO (Eq. 3).

def ca_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                ref_rejected_logps, beta: float = 0.1, label_smoothing: float = 0.0,
                loss_type: str = 'sigmoid', chosen_lengths=None, rejected_lengths=None,
                pair_mask=None, sft_weight: float = 0.0):
  """The CA-DPO loss (Eq. 3) and TRL's DPO variants on summed sequence log-probs.

  With delta = (pi_c - ref_c) - (pi_r - ref_r) per pair ([B] each, summed over response
  tokens), the per-pair losses, averaged over the batch, are:
    sigmoid: -log sigmoid(beta * delta)  (Eq. 3). With label_smoothing eps > 0 this is
      conservative DPO, -(1-eps) log sig(beta*delta) - eps log sig(-beta*delta), as in
      TRL <= 0.28 and ms-swift (the paper's trainer); TRL >= 0.29 ignores eps here.
    sigmoid_norm: -log sigmoid(beta * delta_len), the length-normalised sigmoid, with
      delta_len = (pi_c - ref_c) / chosen_lengths - (pi_r - ref_r) / rejected_lengths:
      each log-ratio divided by its number of response tokens (clamped to >= 1), as TRL.
    ipo: (delta_len - 1 / (2 beta))^2, delta_len as for sigmoid_norm (TRL's IPO).
      Both need the lengths ([P] token counts, e.g. from `split_pairs`).
    hinge: relu(1 - beta * delta).
    robust: [-(1-eps) log sig(beta*delta) + eps log sig(-beta*delta)] / (1 - 2 eps),
      eps = label_smoothing in [0, 0.5).

  Metrics (as TRL logs them): `rewards/chosen` = mean beta (pi_c - ref_c),
  `rewards/rejected` likewise, `rewards/margins` = mean of their difference,
  `rewards/accuracies` = mean(reward_c > reward_r), `logps/chosen` and
  `logps/rejected` = mean policy log-probs.

  `sft_weight` alpha > 0 adds alpha * NLL(chosen), the token-mean NLL of the chosen
  responses of the batch (needs chosen_lengths): ms-swift's `rpo_alpha`, TRL's
  `loss_type=['<loss_type>', 'sft']` with `loss_weights=[1, alpha]`.

  `pair_mask` [B] (optional, bool) leaves padded pairs out of the loss and every metric.
  """
  if loss_type not in DPO_LOSS_TYPES:
    raise ValueError(f'unknown DPO loss_type {loss_type!r}; expected one of {list(DPO_LOSS_TYPES)}')
  if loss_type in ('sigmoid', 'robust') and not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f'label_smoothing must lie in [0, 0.5) for {loss_type!r}, got '
                     f'{label_smoothing}')
  as_f32 = lambda x: jnp.asarray(x, lm_head.compute_dtype(jnp.result_type(x)))
  pi_c, pi_r = as_f32(policy_chosen_logps), as_f32(policy_rejected_logps)
  ref_c, ref_r = as_f32(ref_chosen_logps), as_f32(ref_rejected_logps)
  chosen_logratios = pi_c - ref_c
  rejected_logratios = pi_r - ref_r
  scaled_delta = beta * (chosen_logratios - rejected_logratios)
  eps = label_smoothing

  if loss_type == 'sigmoid':
    per_pair = (-(1 - eps) * jax.nn.log_sigmoid(scaled_delta)
                - eps * jax.nn.log_sigmoid(-scaled_delta))
  elif loss_type in ('sigmoid_norm', 'ipo'):
    if chosen_lengths is None or rejected_lengths is None:
      raise ValueError(f'loss_type={loss_type!r} normalises by response length: pass '
                       'chosen_lengths and rejected_lengths ([B] token counts)')
    delta_len = (chosen_logratios / jnp.maximum(as_f32(chosen_lengths), 1.0)
                 - rejected_logratios / jnp.maximum(as_f32(rejected_lengths), 1.0))
    per_pair = (-jax.nn.log_sigmoid(beta * delta_len) if loss_type == 'sigmoid_norm'
                else (delta_len - 1.0 / (2.0 * beta)) ** 2)
  elif loss_type == 'hinge':
    per_pair = jax.nn.relu(1.0 - scaled_delta)
  else:  # robust
    per_pair = (-(1 - eps) * jax.nn.log_sigmoid(scaled_delta)
                + eps * jax.nn.log_sigmoid(-scaled_delta)) / (1 - 2 * eps)

  weights = (jnp.ones_like(per_pair) if pair_mask is None
             else jnp.asarray(pair_mask, per_pair.dtype))
  mean = lambda x: jnp.sum(weights * x) / jnp.maximum(jnp.sum(weights), 1.0)
  chosen_rewards = jax.lax.stop_gradient(beta * chosen_logratios)
  rejected_rewards = jax.lax.stop_gradient(beta * rejected_logratios)
  metrics = {
      'rewards/chosen': mean(chosen_rewards),
      'rewards/rejected': mean(rejected_rewards),
      'rewards/margins': mean(chosen_rewards - rejected_rewards),
      'rewards/accuracies': mean((chosen_rewards > rejected_rewards).astype(per_pair.dtype)),
      'logps/chosen': mean(jax.lax.stop_gradient(pi_c)),
      'logps/rejected': mean(jax.lax.stop_gradient(pi_r)),
  }
  loss = mean(per_pair)
  if sft_weight:
    if chosen_lengths is None:
      raise ValueError('sft_weight > 0 averages over chosen tokens: pass chosen_lengths')
    loss += sft_weight * -jnp.sum(weights * pi_c) / jnp.maximum(
        jnp.sum(weights * as_f32(chosen_lengths)), 1.0)
  return loss, metrics
