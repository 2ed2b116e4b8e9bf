"""The train state and the pure step functions of both stages.

The params are split in two trees by `config.trainable`: `trainable` (what the optimizer
updates and holds moments for) and `frozen` (kept as is). For LoRA the trainable tree is
the adapters and the frozen tree the base; the forward merges them.

Batches are dicts of arrays keyed as `saber_jax.batch` lists them: the thinker reads
`batch.MODEL_KEYS`, the losses `labels`, `segments` and, for DPO, `pair_segments` and the
reference log-probs of P pairs, in one of two layouts told apart by the row count: one
row `[prompt | chosen | rejected]` per pair (B = P; the prompt and media are computed
once, the answers attend to the prompt and to themselves only), or chosen and rejected
of pair i in rows 2i and 2i + 1 (B = 2P).
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from saber_jax import lm_head, losses
from saber_jax.batch import MODEL_KEYS
from saber_jax.models.config import ThinkerConfig
from saber_jax.models.thinker import Thinker
from saber_jax.train import lora

TRAINABLE_MODES = ('full', 'llm', 'lora')


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array          # optimizer micro-steps taken
  trainable: Any
  frozen: Any
  opt_state: optax.OptState


def split_params(params: dict, mode: str, lora_params: dict | None = None):
  """(trainable, frozen) trees of the thinker params for a trainable mode.

  full: everything trains. llm: the decoder ('text') trains, the audio and vision towers
  stay frozen. lora: only `lora_params` train; all thinker params are frozen.
  """
  if mode == 'full':
    return params, {}
  if mode == 'llm':
    return {'text': params['text']}, {k: v for k, v in params.items() if k != 'text'}
  if mode == 'lora':
    if lora_params is None:
      raise ValueError("trainable='lora' needs lora_params")
    return {'lora': lora_params}, params
  raise ValueError(f'trainable must be one of {TRAINABLE_MODES}, got {mode!r}')


def join_params(trainable: dict, frozen: dict, lora_config=None) -> dict:
  """The thinker params that the forward uses (LoRA adapters merged into the base)."""
  if 'lora' in trainable:
    return lora.merge_lora(frozen, trainable['lora'], rank=lora_config.rank,
                           alpha=lora_config.alpha)
  return {**frozen, **trainable}


def head_kernel(params: dict, config: ThinkerConfig):
  """The LM head as [H, V] (the embedding transposed when tied)."""
  text = params['text']
  if config.text.tie_word_embeddings:
    return text['embed_tokens']['embedding'].T
  return text['lm_head']['kernel']


def _hidden(config: ThinkerConfig, params: dict, batch: dict):
  inputs = {k: batch[k] for k in MODEL_KEYS if k in batch}
  return Thinker(config).apply({'params': params}, inputs)


def _head(config: ThinkerConfig, params: dict):
  return head_kernel(params, config).astype(jnp.dtype(config.dtype))


def sft_loss(trainable, frozen, batch, *, model_config: ThinkerConfig, lora_config=None,
             chunk_size: int = lm_head.DEFAULT_CHUNK_SIZE):
  """SED loss (Eq. 2) and its metrics; full logits are never materialised."""
  params = join_params(trainable, frozen, lora_config)
  hidden = _hidden(model_config, params, batch)
  return losses.sed_loss_from_hidden(hidden, _head(model_config, params), batch['labels'],
                                     batch['segments'], chunk_size=chunk_size)


def _num_pairs(batch) -> int:
  return batch['ref_chosen_logps'].shape[0]


def pair_logps(params, batch, *, model_config: ThinkerConfig,
               chunk_size: int = lm_head.DEFAULT_CHUNK_SIZE):
  """Summed response log-probs (chosen [P], rejected [P]) of the pairs of a DPO batch."""
  num_pairs = _num_pairs(batch)
  if batch['input_ids'].shape[0] == num_pairs:          # one row per pair
    batch = dict(batch, attention_segments=batch['pair_segments'])
  hidden = _hidden(model_config, params, batch)
  per_token = losses.token_logps_from_hidden(hidden, _head(model_config, params),
                                             batch['labels'], chunk_size=chunk_size)
  return losses.split_pairs(per_token, batch['labels'], batch['pair_segments'], num_pairs)


def dpo_loss(trainable, frozen, batch, *, model_config: ThinkerConfig, dpo_config,
             lora_config=None, chunk_size: int = lm_head.DEFAULT_CHUNK_SIZE):
  """CA-DPO loss (Eq. 3) and its options (`dpo_config`: beta, label_smoothing, loss_type,
  sft_weight); the reference log-probs come precomputed with the batch."""
  params = join_params(trainable, frozen, lora_config)
  chosen, rejected = pair_logps(params, batch, model_config=model_config, chunk_size=chunk_size)
  num_pairs = _num_pairs(batch)
  ones = jnp.ones(batch['labels'][:, 1:].shape, jnp.int32)
  chosen_lengths, rejected_lengths = losses.split_pairs(ones, batch['labels'],
                                                        batch['pair_segments'], num_pairs)
  pair_mask = None
  if 'example_mask' in batch:                # per row; the rows of a pair agree
    pair_mask = batch['example_mask'].reshape(num_pairs, -1)[:, 0]
  return losses.ca_dpo_loss(
      chosen, rejected, batch['ref_chosen_logps'], batch['ref_rejected_logps'],
      beta=dpo_config.beta, label_smoothing=dpo_config.label_smoothing,
      loss_type=dpo_config.loss_type, chosen_lengths=chosen_lengths,
      rejected_lengths=rejected_lengths, pair_mask=pair_mask,
      sft_weight=dpo_config.get('sft_weight', 0.0))


def apply_gradients(state: TrainState, grads, loss, optimizer: optax.GradientTransformation,
                    skip_nonfinite: bool) -> tuple[TrainState, dict]:
  """One optimizer update. A non-finite loss or gradient either still applies (the loop
  then stops, naming the step) or, with `skip_nonfinite`, leaves the state untouched."""
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  new = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
  if skip_nonfinite:
    # The step still counts (its batch was consumed), so a resumed loop and the state
    # agree on where they are.
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state).replace(step=new.step)
  return new, {'grad_norm': grad_norm, 'finite': finite}


def train_step(state: TrainState, batch: dict, *, loss_fn, optimizer, skip_nonfinite: bool):
  """Forward, backward and update of one batch: (new state, metrics)."""
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.trainable, state.frozen, batch)
  state, update_metrics = apply_gradients(state, grads, loss, optimizer, skip_nonfinite)
  return state, {'loss': loss, **metrics, **update_metrics}

