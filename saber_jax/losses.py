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

Everything is computed in float32 (float64 stays float64) whatever the input dtype. Log-probs are computed
chunk by chunk over the sequence so no [B, L, V] float32 array (and no one-hot) is ever
built: Qwen's vocabulary has 152K entries.
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from saber_jax.data.sed import IGNORE_INDEX, SECTION_IDS

# `segments` values (see DESIGN.md, "Batches"); 0 is the prompt.
SEGMENT_NAMES = {segment_id: name for name, segment_id in SECTION_IDS.items()}
DPO_LOSS_TYPES = ('sigmoid', 'ipo', 'hinge', 'robust')
DEFAULT_CHUNK_SIZE = 512


# ---------------------------------------------------------------------------
# Token log-probs.

def _at_least_f32(dtype):
  """float32 for bf16/fp16/fp32 inputs; float64 stays float64 (finite-difference tests)."""
  return jnp.promote_types(dtype, jnp.float32)


def _next_token_targets(labels):
  """labels [B, L] -> targets [B, L]: the label each position predicts (t -> t+1);
  the last position predicts nothing and gets IGNORE_INDEX."""
  pad = jnp.full((labels.shape[0], 1), IGNORE_INDEX, labels.dtype)
  return jnp.concatenate([labels[:, 1:], pad], axis=1)


def _logps_of_targets(logits, targets):
  """logits [B, C, V] (any float dtype), targets [B, C] -> log p(target) [B, C] in
  float32, 0 where target == IGNORE_INDEX. The target logit is picked by a fused
  compare-and-sum rather than a gather, which also partitions cleanly when the
  vocabulary axis is sharded."""
  logits = logits.astype(_at_least_f32(logits.dtype))
  mask = targets != IGNORE_INDEX
  log_normaliser = jax.nn.logsumexp(logits, axis=-1)
  vocab_ids = jnp.arange(logits.shape[-1], dtype=targets.dtype)
  picked = jnp.sum(jnp.where(vocab_ids == targets[..., None], logits, 0.0), axis=-1)
  return jnp.where(mask, picked - log_normaliser, 0.0)


def _map_over_sequence(chunk_fn: Callable, seq_len: int, chunk_size: int, *arrays):
  """Applies `chunk_fn(*[a[:, s:s+C] for a in arrays]) -> [B, C]` over the sequence
  axis (axis 1) in chunks of C = chunk_size and concatenates to [B, seq_len].

  Full chunks go through `lax.map` with dynamic slices (no copy or pad of the big
  input); a shorter tail chunk is handled by one extra call. `chunk_fn` is wrapped in
  `jax.checkpoint`, so the backward pass recomputes each chunk's float32 logits instead
  of keeping all of them alive. The last array holds the targets: a chunk with no
  trained target (all prompt or padding) skips the vocabulary projection, forward and
  backward, and scores 0.
  """
  if chunk_size <= 0:
    raise ValueError(f'chunk_size must be positive, got {chunk_size}')
  chunk_size = min(chunk_size, seq_len)
  out_dtype = _at_least_f32(arrays[0].dtype)
  scored = chunk_fn

  @jax.checkpoint           # outside the cond, so the backward keeps only the inputs
  def chunk_fn(*chunks):
    targets = chunks[-1]
    return jax.lax.cond(jnp.any(targets != IGNORE_INDEX), scored,
                        lambda *_: jnp.zeros(targets.shape, out_dtype), *chunks)
  num_full = seq_len // chunk_size
  pieces = []
  if num_full:
    def one_chunk(index):
      start = index * chunk_size
      chunks = [jax.lax.dynamic_slice_in_dim(a, start, chunk_size, axis=1) for a in arrays]
      return chunk_fn(*chunks)
    stacked = jax.lax.map(one_chunk, jnp.arange(num_full))  # [N, B, C]
    batch = stacked.shape[1]
    pieces.append(jnp.swapaxes(stacked, 0, 1).reshape(batch, num_full * chunk_size))
  tail_start = num_full * chunk_size
  if tail_start < seq_len:
    pieces.append(chunk_fn(*[a[:, tail_start:] for a in arrays]))
  return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)


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
  per_token = _map_over_sequence(_logps_of_targets, labels.shape[1], chunk_size, logits, targets)
  return per_token[:, :-1]


def token_logps_from_hidden(hidden, head_kernel, labels, *, chunk_size: int = DEFAULT_CHUNK_SIZE):
  """`token_logps(hidden @ head_kernel, labels)` without ever building the full logits.

  The scored positions of each row are gathered to its front and projected through the LM
  head chunk by chunk (float32 accumulation); each chunk's logits are reduced to one
  log-prob per position and dropped. The backward pass recomputes a chunk's logits from
  the hidden states and the saved log-normalisers (`_head_logps`), so memory stays
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
  _check_head(hidden, head_kernel)
  return _head_logps(hidden, head_kernel, _next_token_targets(labels), chunk_size)[:, :-1]


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


def sequence_logps_from_hidden(hidden, head_kernel, labels, *,
                               chunk_size: int = DEFAULT_CHUNK_SIZE):
  """`sequence_logps` from hidden states and the LM head kernel."""
  return jnp.sum(token_logps_from_hidden(hidden, head_kernel, labels, chunk_size=chunk_size),
                 axis=-1)


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
  the log-probs (`_weighted_logp_sum`) and no chunk's logits are recomputed.
  """
  labels = jnp.asarray(labels)
  _check_labels('hidden', hidden, labels)
  _check_head(hidden, head_kernel)
  targets = _next_token_targets(labels)
  scored = targets != IGNORE_INDEX
  denominator = jnp.maximum(jnp.sum(scored), 1) if normalizer is None else normalizer
  weights = jnp.where(scored, 1.0, 0.0).astype(_at_least_f32(hidden.dtype)) / denominator
  total, per_token = _weighted_logp_sum(hidden, head_kernel, targets, weights, chunk_size)
  _, metrics = sed_loss_from_token_logps(jax.lax.stop_gradient(per_token)[:, :-1], labels,
                                         segments, normalizer=normalizer)
  return -total, metrics


# ---------------------------------------------------------------------------
# The chunked vocabulary projection behind the `*_from_hidden` functions.
#
# Scored positions (those with a target) are gathered to the front of each row, the rows
# are cut into chunks of C positions (padded to whole chunks) and chunks with no target
# are skipped, so the [H, V] projection runs about once per scored position, wherever the
# responses sit. For a chunk with logits z, log-normaliser n and target one-hot y,
# d log p(y) / dz = y - exp(z - n): the gradients follow from the chunk's logits without
# autodiff through the softmax.


def _check_head(hidden, head_kernel):
  if hidden.shape[-1] != head_kernel.shape[0]:
    raise ValueError(f'hidden {hidden.shape} does not match head_kernel {head_kernel.shape} [H, V]')


def _targets_first(targets):
  """Per row, the positions that have a target first (in order), then the rest:
  (order, inverse) [B, L] with `x[order]` compacted and `compacted[inverse]` back. Rows
  are never mixed, so a batch-sharded array stays local."""
  order = jnp.argsort(targets == IGNORE_INDEX, axis=1, stable=True)
  return order, jnp.argsort(order, axis=1)


def _take_positions(x, positions):
  """x [B, L, ...] at positions [B, L'] of each row -> [B, L', ...]."""
  return jnp.take_along_axis(x, positions.reshape(positions.shape + (1,) * (x.ndim - 2)), axis=1)


def _over_scored_chunks(body, carry, chunk_size: int, targets, *arrays):
  """Runs `body(carry, targets_chunk, *array_chunks) -> (carry, outputs)` over the scored
  chunks of rows compacted by `_targets_first`; a chunk with no target is skipped (zero
  outputs, carry unchanged). targets [B, L]; arrays [B, L, ...]. Returns (carry, outputs
  [B, L, ...] in the original position order)."""
  if chunk_size <= 0:
    raise ValueError(f'chunk_size must be positive, got {chunk_size}')
  batch, length = targets.shape
  size = min(chunk_size, length)
  num_chunks = -(-length // size)
  order, inverse = _targets_first(targets)
  pad = ((0, 0), (0, num_chunks * size - length))
  compact_targets = jnp.pad(_take_positions(targets, order), pad, constant_values=IGNORE_INDEX)
  compact = [_take_positions(x, jnp.pad(order, pad)) for x in arrays]   # padding: position 0

  def skip(carry, *chunk):
    outputs = jax.eval_shape(body, carry, *chunk)[1]
    return carry, jax.tree.map(lambda o: jnp.zeros(o.shape, o.dtype), outputs)

  def one_chunk(carry, index):
    chunk = [jax.lax.dynamic_slice_in_dim(x, index * size, size, axis=1)
             for x in (compact_targets, *compact)]
    return jax.lax.cond(jnp.any(chunk[0] != IGNORE_INDEX), body, skip, carry, *chunk)

  carry, outputs = jax.lax.scan(one_chunk, carry, jnp.arange(num_chunks))
  unchunk = lambda y: _take_positions(
      jnp.moveaxis(y, 0, 1).reshape(batch, num_chunks * size, *y.shape[3:]), inverse)
  return carry, jax.tree.map(unchunk, outputs)


def _column_index(targets):
  """Each target's column of the head; column 0 where ignored (weighted by 0 there)."""
  return jnp.where(targets == IGNORE_INDEX, 0, targets)


def _target_columns(head_kernel, targets):
  """The head's column of each target, [B, C, H] (column 0 where ignored)."""
  return jnp.take(head_kernel, _column_index(targets), axis=1).transpose(1, 2, 0)


def _chunk_logits(hidden, head_kernel):
  return jnp.einsum('bch,hv->bcv', hidden, head_kernel,
                    preferred_element_type=_at_least_f32(hidden.dtype))


def _chunk_scores(hidden, head_kernel, targets):
  """One chunk's logits [B, C, V] (float32 or wider), log-normaliser [B, C] and
  log p(target) [B, C] (0 where ignored)."""
  logits = _chunk_logits(hidden, head_kernel)
  log_normaliser = jax.nn.logsumexp(logits, axis=-1)
  # The target logit as h . W[:, target]: no [B, C, V] one-hot or select is built.
  picked = jnp.einsum('bch,bch->bc', hidden, _target_columns(head_kernel, targets),
                      preferred_element_type=logits.dtype)
  return logits, log_normaliser, jnp.where(targets != IGNORE_INDEX, picked - log_normaliser, 0.0)


def _chunk_grads(hidden, head_kernel, targets, logits, log_normaliser, scale, d_kernel):
  """Back through one chunk, given d loss / d log p(target) = scale [B, C] (0 where
  ignored and on padding): d_logits = scale * (one-hot - softmax). The softmax part goes
  through the two matmuls; the one-hot part is a gather (hidden gradient) and a
  scatter-add (kernel gradient) of the target columns.
  Returns (d_hidden [B, C, H], d_kernel plus this chunk's h^T d_logits)."""
  acc = logits.dtype
  scale = jnp.where(targets != IGNORE_INDEX, scale, 0.0).astype(acc)
  d_softmax = (-scale[..., None] * jnp.exp(logits - log_normaliser[..., None])
               ).astype(head_kernel.dtype)
  d_hidden = (jnp.einsum('bcv,hv->bch', d_softmax, head_kernel, preferred_element_type=acc)
              + scale[..., None] * _target_columns(head_kernel, targets).astype(acc))
  hidden = hidden.astype(head_kernel.dtype)
  d_kernel = d_kernel + jnp.einsum('bch,bcv->hv', hidden, d_softmax, preferred_element_type=acc)
  columns = _column_index(targets).reshape(-1)
  d_kernel = d_kernel.at[:, columns].add((scale[..., None] * hidden).reshape(-1, hidden.shape[-1]).T)
  return d_hidden, d_kernel


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _head_logps(hidden, head_kernel, targets, chunk_size):
  """log p(targets) [B, L] of hidden [B, L, H] through head_kernel [H, V]; 0 where
  targets is IGNORE_INDEX. The backward pass recomputes each chunk's logits: one
  projection forward, three backward (logits again, hidden and kernel gradients)."""
  return _head_logps_fwd(hidden, head_kernel, targets, chunk_size)[0]


def _head_logps_fwd(hidden, head_kernel, targets, chunk_size):
  def body(carry, t, h):
    _, log_normaliser, logps = _chunk_scores(h, head_kernel, t)
    return carry, (logps, log_normaliser)
  _, (logps, log_normaliser) = _over_scored_chunks(body, None, chunk_size, targets, hidden)
  return logps, (hidden, head_kernel, targets, log_normaliser)


def _head_logps_bwd(chunk_size, residuals, d_logps):
  hidden, head_kernel, targets, log_normaliser = residuals
  acc = _at_least_f32(hidden.dtype)

  def body(d_kernel, t, h, n, ct):
    d_h, d_kernel = _chunk_grads(h, head_kernel, t, _chunk_logits(h, head_kernel), n, ct, d_kernel)
    return d_kernel, d_h
  d_kernel, d_hidden = _over_scored_chunks(body, jnp.zeros(head_kernel.shape, acc), chunk_size,
                                           targets, hidden, log_normaliser, d_logps)
  return d_hidden.astype(hidden.dtype), d_kernel.astype(head_kernel.dtype), None


_head_logps.defvjp(_head_logps_fwd, _head_logps_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _weighted_logp_sum(hidden, head_kernel, targets, weights, chunk_size):
  """(sum_t weights_t * log p(targets_t), per-token log p [B, L]).

  hidden [B, L, H]; head_kernel [H, V]; targets [B, L] (IGNORE_INDEX: not scored); weights
  [B, L] float. The sum's gradients are built in the forward pass with the log-probs
  (three projections per chunk, no recompute). The per-token output is for metrics: it
  carries no gradient (its cotangent is dropped), so callers take it under stop_gradient.
  """
  per_token = _head_logps_fwd(hidden, head_kernel, targets, chunk_size)[0]
  return jnp.sum(weights * per_token), per_token


def _weighted_logp_sum_fwd(hidden, head_kernel, targets, weights, chunk_size):
  acc = _at_least_f32(hidden.dtype)

  def body(d_kernel, t, h, w):
    logits, log_normaliser, logps = _chunk_scores(h, head_kernel, t)
    d_h, d_kernel = _chunk_grads(h, head_kernel, t, logits, log_normaliser, w, d_kernel)
    return d_kernel, (logps, d_h)
  d_kernel, (per_token, d_hidden) = _over_scored_chunks(
      body, jnp.zeros(head_kernel.shape, acc), chunk_size, targets, hidden, weights)
  grads = (d_hidden.astype(hidden.dtype), d_kernel.astype(head_kernel.dtype))
  return (jnp.sum(weights * per_token), per_token), (grads, per_token)


def _weighted_logp_sum_bwd(chunk_size, residuals, cotangents):
  (d_hidden, d_kernel), per_token = residuals
  d_total, _ = cotangents
  return ((d_total * d_hidden).astype(d_hidden.dtype), (d_total * d_kernel).astype(d_kernel.dtype),
          None, (d_total * per_token).astype(per_token.dtype))


_weighted_logp_sum.defvjp(_weighted_logp_sum_fwd, _weighted_logp_sum_bwd)


# ---------------------------------------------------------------------------
# CA-DPO (Eq. 3).

def ca_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                ref_rejected_logps, beta: float = 0.1, label_smoothing: float = 0.0,
                loss_type: str = 'sigmoid', chosen_lengths=None, rejected_lengths=None,
                pair_mask=None):
  """The CA-DPO loss (Eq. 3) and TRL's DPO variants on summed sequence log-probs.

  With delta = (pi_c - ref_c) - (pi_r - ref_r) per pair ([B] each, summed over response
  tokens), the per-pair losses, averaged over the batch, are:
    sigmoid: -log sigmoid(beta * delta)  (Eq. 3). With label_smoothing eps > 0 this is
      conservative DPO, -(1-eps) log sig(beta*delta) - eps log sig(-beta*delta), as in
      TRL <= 0.28 and ms-swift (the paper's trainer); TRL >= 0.29 ignores eps here.
    ipo: (delta_len - 1 / (2 beta))^2 with delta_len = (pi_c - ref_c) / chosen_lengths
      - (pi_r - ref_r) / rejected_lengths: TRL divides each log-ratio by its number of
      response tokens (clamped to >= 1), so the lengths are required arguments here
      (`response_lengths(labels)` gives them).
    hinge: relu(1 - beta * delta).
    robust: [-(1-eps) log sig(beta*delta) + eps log sig(-beta*delta)] / (1 - 2 eps),
      eps = label_smoothing in [0, 0.5).

  Metrics (as TRL logs them): `rewards/chosen` = mean beta (pi_c - ref_c),
  `rewards/rejected` likewise, `rewards/margins` = mean of their difference,
  `rewards/accuracies` = mean(reward_c > reward_r), `logps/chosen` and
  `logps/rejected` = mean policy log-probs.

  `pair_mask` [B] (optional, bool) leaves padded pairs out of the loss and every metric.
  """
  if loss_type not in DPO_LOSS_TYPES:
    raise ValueError(f'unknown DPO loss_type {loss_type!r}; expected one of {list(DPO_LOSS_TYPES)}')
  if loss_type in ('sigmoid', 'robust') and not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f'label_smoothing must lie in [0, 0.5) for {loss_type!r}, got {label_smoothing}')
  as_f32 = lambda x: jnp.asarray(x, _at_least_f32(jnp.result_type(x)))
  pi_c, pi_r = as_f32(policy_chosen_logps), as_f32(policy_rejected_logps)
  ref_c, ref_r = as_f32(ref_chosen_logps), as_f32(ref_rejected_logps)
  chosen_logratios = pi_c - ref_c
  rejected_logratios = pi_r - ref_r
  scaled_delta = beta * (chosen_logratios - rejected_logratios)
  eps = label_smoothing

  if loss_type == 'sigmoid':
    per_pair = (-(1 - eps) * jax.nn.log_sigmoid(scaled_delta)
                - eps * jax.nn.log_sigmoid(-scaled_delta))
  elif loss_type == 'ipo':
    if chosen_lengths is None or rejected_lengths is None:
      raise ValueError("loss_type='ipo' normalises by response length: pass chosen_lengths and "
                       'rejected_lengths ([B] token counts, e.g. response_lengths(labels))')
    chosen_avg = chosen_logratios / jnp.maximum(as_f32(chosen_lengths), 1.0)
    rejected_avg = rejected_logratios / jnp.maximum(as_f32(rejected_lengths), 1.0)
    per_pair = (chosen_avg - rejected_avg - 1.0 / (2.0 * beta)) ** 2
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
  return mean(per_pair), metrics
