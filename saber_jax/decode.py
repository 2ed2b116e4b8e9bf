"""Batched sampling from the thinker with a KV cache (preference pairs, evaluation).

The prompts are prefilled once (media scattered in, as in training) into a KV cache
[layers, B, S, K, H] with S = prompt length + max_new_tokens, a fixed shape so the whole
generation compiles once per prompt bucket. For `num_samples` > 1 the cache is repeated,
not recomputed (CA-DPO draws k = 10 responses per clip at temperature 0.8). A
`lax.while_loop` then decodes one token per step for every row, under one jit with no
host round trip; as rows emit an end-of-sequence id the batch is halved to the rows still
going (so a finished row stops costing forwards), and it stops once every row has ended.

Prompts are left padded (right-padded batches are moved over on the host), so every row's
last prompt token is in the last prompt slot and every step writes the same cache slot;
each row keeps its own TMRoPE position (§3.5 of the thinker notes: valid tokens so far +
rope delta, on all three axes). The batch axis leads everywhere, so the rows shard over the
data axes as in training.
"""

import dataclasses
import functools
import math
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from saber_jax import sharding
from saber_jax.data.collate import left_pad
from saber_jax.data.prompt import OmniTokenIds
from saber_jax.models.config import ThinkerConfig
from saber_jax.models.text import KVCache, cache_attention_mask
from saber_jax.models.thinker import Thinker, model_inputs

# <|im_end|> and <|endoftext|> of the Qwen2.5 tokenizer.
EOS_TOKEN_IDS = (OmniTokenIds.im_end, OmniTokenIds.endoftext)
PAD_TOKEN_ID = OmniTokenIds.endoftext


# ------------------------------------------------------------------------------ sampling

def filter_logits(logits, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """fp32 logits [B, V] scaled by 1 / temperature, -inf outside the top_k ids and then
  outside the top_p nucleus: transformers' Temperature, TopK and TopP logits warpers, in
  that order and with their tie rules (top-k keeps every id tied with the k-th). top_p
  sorts the vocabulary: slow on CPU (~0.3 s for 10 rows of 152K ids), cheap on GPU/TPU."""
  logits = logits.astype(jnp.float32) / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    # As TopPLogitsWarper: in ascending order drop ids whose cumulative probability is
    # <= 1 - top_p, always keeping the most likely one; what is left is every id at or
    # above the first kept logit.
    ascending = jnp.sort(logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    dropped = jnp.sum(cumulative[..., :-1] <= 1 - top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(ascending, dropped, axis=-1)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def categorical(key, logits, block: int = 512):
  """One id per row drawn from softmax(logits [B, V]): the distribution of
  `jax.random.categorical`, drawn in two stages — a block of `block` ids by its total
  probability (log-sum-exp), then an id inside that block — so a row takes V / block +
  block Gumbel draws instead of V (on CPU the noise for a 152K vocabulary costs as much as
  the lm_head). Ids of -inf logit are never drawn."""
  rows, vocab = logits.shape
  blocks = jnp.pad(logits, ((0, 0), (0, -vocab % block)), constant_values=-jnp.inf)
  blocks = blocks.reshape(rows, -1, block)                              # [B, V / block, block]
  block_key, id_key = jax.random.split(key)
  which = jax.random.categorical(block_key, jax.nn.logsumexp(blocks, axis=-1), axis=-1)
  inside = jnp.take_along_axis(blocks, which[:, None, None], axis=1)[:, 0]   # [B, block]
  return which * block + jax.random.categorical(id_key, inside, axis=-1)


def sample_logits(key, logits, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
  """Next ids int32 [B] from logits [B, V]: argmax at temperature 0 (greedy), otherwise one
  independent draw per row from softmax(`filter_logits`). `key` is one PRNG key, or a key
  per row [B] (each row's draw then depends on its own key alone, not on the batch)."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits, temperature, top_k, top_p)
  if key.ndim:
    return jax.vmap(lambda k, row: categorical(k, row[None])[0])(key, logits).astype(jnp.int32)
  return categorical(key, logits).astype(jnp.int32)


def sample_keys(key, streams, num_samples: int):
  """PRNG keys [B * num_samples]: sample j of prompt b draws from fold_in(fold_in(key,
  streams[b]), j), so a sample depends on (key, its prompt's stream, j) only: not on the
  batch it shares, its row, the batch size or the number of devices."""
  prompt_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, streams)
  samples = jnp.arange(num_samples, dtype=jnp.uint32)
  per_sample = jax.vmap(lambda k: jax.vmap(jax.random.fold_in, (None, 0))(k, samples))
  return per_sample(prompt_keys).reshape(-1)


# ------------------------------------------------------------------------ host-side prep

def first_new_positions(position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
  """int32 [B]: the TMRoPE position of each row's first generated token, on all three
  axes. `rope_index` defines rope_delta = max position + 1 - valid tokens, so (valid tokens
  so far) + rope_delta is max position + 1 for the first new token, +1 per token after."""
  valid = np.asarray(attention_mask).astype(bool)[None]
  return (np.where(valid, np.asarray(position_ids), -1).max(axis=(0, 2)) + 1).astype(np.int32)


# -------------------------------------------------------------------------- the decoder

@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """The static part of a generation (one compilation per distinct value); see `generate`."""
  max_new_tokens: int
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  num_samples: int = 1
  eos_token_ids: tuple[int, ...] = EOS_TOKEN_IDS
  pad_token_id: int = PAD_TOKEN_ID
  compact_rows: bool = True     # halve the decode batch as rows end (False: for comparison)

  def __post_init__(self):
    if self.max_new_tokens < 1 or self.num_samples < 1:
      raise ValueError(f'max_new_tokens ({self.max_new_tokens}) and num_samples '
                       f'({self.num_samples}) must be positive')
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f'bad sampling settings: temperature={self.temperature}, '
                       f'top_k={self.top_k}, top_p={self.top_p}')

  def check_ids(self, vocab_size: int):
    for name, ids in (('eos_token_ids', self.eos_token_ids),
                      ('pad_token_id', (self.pad_token_id,))):
      if any(not 0 <= i < vocab_size for i in ids):
        raise ValueError(f'{name} {ids} outside the vocabulary of {vocab_size} ids')


def _rows_split(x, axis: int = 0):
  """x with its rows (`axis`) split over the batch axes of the mesh in context
  (`jax.set_mesh`), as the inputs are: without it XLA may compute the vocabulary projection
  on every device for all rows (hidden gathered, full logits all-reduced each step)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = [None] * x.ndim
  spec[axis] = sharding.mesh_spec((x.shape[axis],), ('batch',), mesh)[0]
  return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


class _State(NamedTuple):
  """The decode loop's state. Its live part holds R_k slots, R_k halving as rows end
  (`compact`): slot i decodes original row `rows[i]`. The outputs are kept for all R rows."""
  step: jax.Array          # int32 []: the index of the token drawn next
  rows: jax.Array          # int32 [R_k] the original row each slot decodes
  logits: jax.Array        # [R_k, V] the distribution of each slot's next token
  keys: jax.Array          # PRNG keys [R_k] of the slots' rows
  first_positions: jax.Array  # int32 [R_k]
  valid_slots: jax.Array   # bool [R_k, S] cache slots a slot's row attends to
  cache: KVCache           # [layers, R_k, S, K, H]
  tokens: jax.Array        # int32 [R, max_new_tokens], pad after each row's end
  logprobs: jax.Array      # f32 [R, max_new_tokens] log p(token) under the model, 0 after the end
  lengths: jax.Array       # int32 [R] tokens before the row's EOS (or all of them)
  finished: jax.Array      # bool [R] the row has emitted an EOS


def compact(state: _State, size: int) -> _State:
  """The state with its live part cut to `size` slots: the rows still decoding first (all
  of them: the caller compacts once at most `size` are left), then finished ones as filler.
  Rows keep their keys and positions, so their samples do not change."""
  keep = jnp.argsort(state.finished[state.rows], stable=True)[:size]
  take = lambda a, axis=0: _rows_split(jnp.take(a, keep, axis=axis), axis)
  return state._replace(rows=take(state.rows), logits=take(state.logits), keys=state.keys[keep],
                        first_positions=take(state.first_positions),
                        valid_slots=take(state.valid_slots),
                        cache=KVCache(*(take(c, axis=1) for c in state.cache)))


def halvings(rows: int, min_rows: int) -> list[int]:
  """Live-part sizes of the decode loop: rows, rows / 2, ... while each still splits evenly
  over the `min_rows` data-parallel devices."""
  sizes = [rows]
  while sizes[-1] % 2 == 0 and (sizes[-1] // 2) % min_rows == 0:
    sizes.append(sizes[-1] // 2)
  return sizes


def _batch_devices() -> int:
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else math.prod(
      mesh.shape[a] for a in ('data', 'fsdp') if a in mesh.shape)


@functools.partial(jax.jit, static_argnums=(0, 1))
def generate_inputs(config: ThinkerConfig, settings: DecodeSettings, params, inputs,
                    first_positions, key, streams=None) -> dict[str, jax.Array]:
  """The jitted generation over `model_inputs` arrays of a left-padded batch (global
  arrays sharded over the batch axes, or host arrays), for callers that place their own.

  first_positions int32 [B] (`first_new_positions`), key a PRNG key, streams uint32 [B]
  each prompt's random stream (`sample_keys`; default: its row). Returns what `generate`
  does, as device arrays.

  Rows that have ended stop costing forwards: the loop decodes R rows until at most R / 2
  are still going, then moves those into a half-size batch (`compact`: cache, logits and
  keys gathered) and goes on, halving again as rows end; each size is its own
  `while_loop` in this one program, so it still compiles once per bucket.
  """
  s = settings
  s.check_ids(config.text.vocab_size)
  model = Thinker(config)
  run = functools.partial(model.apply, {'params': params})
  text_decode = lambda m, *args: m.text.decode(*args)
  n = s.num_samples

  # Prefill: the whole prompt (media included) into slots [0, L).
  x = run(inputs, method=Thinker.embed)                              # [B, L, H]
  batch, prompt_len, _ = x.shape
  valid_slots = jnp.concatenate([inputs['attention_mask'].astype(bool),
                                 jnp.ones((batch, s.max_new_tokens), bool)], axis=1)
  cache = KVCache.zeros(config.text, batch, prompt_len + s.max_new_tokens, x.dtype)
  hidden, cache = run(x, inputs['position_ids'], cache_attention_mask(valid_slots, 0, prompt_len),
                      cache, 0, method=text_decode)
  logits = run(_rows_split(hidden[:, -1:]), method=Thinker.logits)[:, 0].astype(jnp.float32)

  # Every sample of a prompt continues from the same prefill.
  repeat = lambda a, axis=0: jnp.repeat(a, n, axis=axis)
  logits, valid_slots, first_positions = map(repeat, (logits, valid_slots, first_positions))
  cache = KVCache(*(repeat(c, axis=1) for c in cache))
  rows = batch * n
  eos = jnp.asarray(s.eos_token_ids, jnp.int32)
  streams = jnp.arange(batch, dtype=jnp.uint32) if streams is None else streams

  def next_token(state: _State) -> _State:
    t, live = state.step, state.rows
    step_keys = jax.vmap(jax.random.fold_in, (0, None))(state.keys, t)
    token = sample_logits(step_keys, state.logits, s.temperature, s.top_k, s.top_p)
    finished = state.finished[live]
    is_eos = jnp.isin(token, eos) & ~finished
    token = jnp.where(finished, s.pad_token_id, token)
    # Log-probability under the model itself (temperature 1, unfiltered), for the records.
    logprob = jnp.take_along_axis(jax.nn.log_softmax(state.logits), token[:, None], axis=-1)[:, 0]
    logprob = jnp.where(finished, 0.0, logprob)
    # Feed the token into slot L + t for the next step's distribution (after the last
    # token this forward is not needed: one step in max_new_tokens, for a simpler loop).
    slot = prompt_len + t
    positions = jnp.broadcast_to((state.first_positions + t)[None, :, None], (3, len(live), 1))
    hidden, cache = run(run(token[:, None], method=lambda m, ids: m.text.embed(ids)), positions,
                        cache_attention_mask(state.valid_slots, slot, 1), state.cache, slot,
                        method=text_decode)
    logits = run(_rows_split(hidden), method=Thinker.logits)[:, 0].astype(jnp.float32)
    return state._replace(
        step=t + 1, logits=logits, cache=cache,
        tokens=state.tokens.at[live, t].set(token),
        logprobs=state.logprobs.at[live, t].set(logprob),
        lengths=state.lengths.at[live].add((~finished & ~is_eos).astype(jnp.int32)),
        finished=state.finished.at[live].set(finished | is_eos))

  state = _State(jnp.int32(0), jnp.arange(rows, dtype=jnp.int32), _rows_split(logits),
                 sample_keys(key, streams, n), first_positions, valid_slots, cache,
                 *map(_rows_split, (jnp.full((rows, s.max_new_tokens), s.pad_token_id, jnp.int32),
                                    jnp.zeros((rows, s.max_new_tokens), jnp.float32),
                                    jnp.zeros(rows, jnp.int32), jnp.zeros(rows, bool))))
  sizes = halvings(rows, _batch_devices()) if s.compact_rows else [rows]
  for size, smaller in zip(sizes, sizes[1:] + [0]):
    going = lambda st, smaller=smaller: (st.step < s.max_new_tokens) & (
        jnp.sum(~st.finished[st.rows]) > smaller)
    state = jax.lax.while_loop(going, next_token, state)
    if smaller:
      state = compact(state, smaller)
  # Rows split as the prompts came in, so each process holds its own rows' results.
  return dict(tokens=_rows_split(state.tokens), logprobs=_rows_split(state.logprobs),
              lengths=_rows_split(state.lengths), finished=_rows_split(state.finished),
              steps=state.step)


def generate(config: ThinkerConfig, params, batch: Mapping[str, Any], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             num_samples: int = 1, eos_token_ids: Sequence[int] = EOS_TOKEN_IDS,
             pad_token_id: int = PAD_TOKEN_ID, seed: int = 0, prompt_length: int | None = None,
             compact_rows: bool = True, **bucket_sizes: int) -> dict[str, np.ndarray]:
  """Responses to a processor-style batch (numpy arrays keyed as the Qwen2.5-Omni processor
  output, optionally `position_ids` and `use_audio_in_video`; left or right padded).

  temperature 0 is greedy decoding; otherwise samples are drawn from the temperature-scaled
  distribution limited to the top_k ids (0: all) and the top_p nucleus (1.0: all).
  `num_samples` responses per prompt. A row stops at its first id in `eos_token_ids` and
  emits `pad_token_id` after it. `prompt_length` left-pads the prompts to a bucket and
  `bucket_sizes` (`num_audio_chunks`, `num_patches`, ...) pad the media (see `model_inputs`),
  so that batches of one bucket share a compilation. `compact_rows` False keeps every row in
  the decode batch to the end (see `generate_inputs`), for comparison.

  Returns numpy arrays, row b * num_samples + j being sample j of prompt b:
    tokens    int32 [B * num_samples, max_new_tokens], the EOS included, pad after it
    logprobs  float32 [B * num_samples, max_new_tokens], log p(token) under the model
              (temperature 1, no top-k/top-p), 0 after the EOS
    lengths   int32 [B * num_samples], tokens before the EOS (max_new_tokens if none)
    finished  bool [B * num_samples], an EOS was emitted
    steps     int32 [], decoding steps run (fewer than max_new_tokens when every row
              stopped early)
  """
  settings = DecodeSettings(max_new_tokens, float(temperature), int(top_k), float(top_p),
                            int(num_samples), tuple(int(i) for i in eos_token_ids),
                            int(pad_token_id), compact_rows)
  settings.check_ids(config.text.vocab_size)
  # Decoding attends through the KV cache's mask; the left-padded prompts need 'xla'.
  config = dataclasses.replace(config, attention='xla')
  batch = left_pad(batch, prompt_length, pad_token_id)
  inputs = model_inputs(config, batch, **bucket_sizes)
  out = generate_inputs(config, settings, nn.unbox(params), inputs,
                        first_new_positions(inputs['position_ids'], inputs['attention_mask']),
                        jax.random.key(seed))
  return jax.device_get(out)


def decode_responses(tokenizer, tokens, lengths) -> list[str]:
  """The text of each generated row: tokens [R, N] cut at lengths [R] (EOS not included)."""
  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  return [tokenizer.decode(row[:n].tolist()) for row, n in zip(tokens, lengths)]
