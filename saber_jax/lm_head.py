"""Log-probs of targets through the LM head, chunk by chunk over the sequence.

Qwen's vocabulary has 152K entries, so no [B, L, V] float32 array (and no one-hot) is ever
built: positions are projected through the [H, V] head a chunk at a time, each chunk's
logits are reduced to one log-prob per position and dropped, and the backward pass either
recomputes them (`head_logps`) or forms the gradients in the forward pass when the loss is
linear in the log-probs (`weighted_logp_sum`). `targets` [B, L] is aligned with the
positions that score them (already shifted); IGNORE_INDEX marks a position with nothing to
score. The losses in `saber_jax.losses` build on these.

Everything is computed in float32 (float64 stays float64) whatever the input dtype.
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from saber_jax.batch import IGNORE_INDEX

DEFAULT_CHUNK_SIZE = 512


def compute_dtype(dtype):
  """float32 for bf16/fp16/fp32 inputs; float64 stays float64 (finite-difference tests)."""
  return jnp.promote_types(dtype, jnp.float32)


def logps_of_targets(logits, targets):
  """logits [B, C, V] (any float dtype), targets [B, C] -> log p(target) [B, C] in
  float32, 0 where target == IGNORE_INDEX. The target logit is picked by a fused
  compare-and-sum rather than a gather, which also partitions cleanly when the
  vocabulary axis is sharded."""
  logits = logits.astype(compute_dtype(logits.dtype))
  mask = targets != IGNORE_INDEX
  log_normaliser = jax.nn.logsumexp(logits, axis=-1)
  vocab_ids = jnp.arange(logits.shape[-1], dtype=targets.dtype)
  picked = jnp.sum(jnp.where(vocab_ids == targets[..., None], logits, 0.0), axis=-1)
  return jnp.where(mask, picked - log_normaliser, 0.0)


def map_over_sequence(chunk_fn: Callable, seq_len: int, chunk_size: int, *arrays):
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
  out_dtype = compute_dtype(arrays[0].dtype)
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



# ---------------------------------------------------------------------------
# The chunked vocabulary projection of hidden states.
#
# Scored positions (those with a target) are gathered to the front of each row, the rows
# are cut into chunks of C positions (padded to whole chunks) and chunks with no target
# are skipped, so the [H, V] projection runs about once per scored position, wherever the
# responses sit. For a chunk with logits z, log-normaliser n and target one-hot y,
# d log p(y) / dz = y - exp(z - n): the gradients follow from the chunk's logits without
# autodiff through the softmax.


def check_head(hidden, head_kernel):
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
                    preferred_element_type=compute_dtype(hidden.dtype))


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
  scaled = (scale[..., None] * hidden).reshape(-1, hidden.shape[-1])
  d_kernel = d_kernel.at[:, columns].add(scaled.T)
  return d_hidden, d_kernel


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def head_logps(hidden, head_kernel, targets, chunk_size):
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
  acc = compute_dtype(hidden.dtype)

  def body(d_kernel, t, h, n, ct):
    d_h, d_kernel = _chunk_grads(h, head_kernel, t, _chunk_logits(h, head_kernel), n, ct, d_kernel)
    return d_kernel, d_h
  d_kernel, d_hidden = _over_scored_chunks(body, jnp.zeros(head_kernel.shape, acc), chunk_size,
                                           targets, hidden, log_normaliser, d_logps)
  return d_hidden.astype(hidden.dtype), d_kernel.astype(head_kernel.dtype), None


head_logps.defvjp(_head_logps_fwd, _head_logps_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def weighted_logp_sum(hidden, head_kernel, targets, weights, chunk_size):
  """(sum_t weights_t * log p(targets_t), per-token log p [B, L]).

  hidden [B, L, H]; head_kernel [H, V]; targets [B, L] (IGNORE_INDEX: not scored); weights
  [B, L] float. The sum's gradients are built in the forward pass with the log-probs
  (three projections per chunk, no recompute). The per-token output is for metrics: it
  carries no gradient (its cotangent is dropped), so callers take it under stop_gradient.
  """
  per_token = _head_logps_fwd(hidden, head_kernel, targets, chunk_size)[0]
  return jnp.sum(weights * per_token), per_token


def _weighted_logp_sum_fwd(hidden, head_kernel, targets, weights, chunk_size):
  acc = compute_dtype(hidden.dtype)

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


weighted_logp_sum.defvjp(_weighted_logp_sum_fwd, _weighted_logp_sum_bwd)
