"""The optimizer: AdamW with linear warmup + cosine decay, global-norm clipping and gradient
accumulation. It sees only the trainable params (`steps.split_params`), so frozen ones get
neither updates nor optimizer state.

The optimizer section of a config (`config.optim`, an `ml_collections.ConfigDict`):

  lr              peak learning rate (the paper: 1e-4 SFT, 1e-5 DPO).
  total_steps     optimizer updates in the run (micro-batches / grad_accum_steps).
  warmup_steps    linear warmup from 0 to `lr`, in optimizer updates; or
  warmup_ratio    the same as a fraction of `total_steps` (rounded up, as transformers).
                  Set at most one of the two.
  min_lr_ratio    the cosine decays to `lr * min_lr_ratio` at `total_steps` (0: to zero).
  weight_decay    decoupled AdamW decay (torch.optim.AdamW / optax.adamw semantics).
  b1, b2, eps     Adam moments and denominator epsilon.
  grad_clip_norm  clip the global norm of the (accumulated) gradient; 0 or None: off.
  grad_accum_steps  micro-steps per update (optax.MultiSteps, gradient mean).
  mu_dtype        dtype of Adam's first moment (None: the parameter dtype).

The schedule counts optimizer updates: with accumulation the lr at micro-step s is
`learning_rate_schedule(config)(s // grad_accum_steps)`; this matches the lr that
transformers' cosine schedule with warmup uses for that update (lr(0) = 0 when there is
warmup).
"""

import math
import re

import jax
import ml_collections
import optax

# Leaves exempt from weight decay: biases and norm scales (Flax names them `bias` and
# `scale`), and anything under a norm module, as transformers' get_decay_parameter_names.
_NO_DECAY_LEAF_NAMES = ('bias', 'scale')
_NORM_MODULE = re.compile(r'norm', re.IGNORECASE)


def default_config() -> ml_collections.ConfigDict:
  """The optimizer fields with their defaults (every field `make_optimizer` reads)."""
  return ml_collections.ConfigDict({
      'lr': 1e-4,
      'total_steps': 1000,
      'warmup_steps': 0,
      'warmup_ratio': 0.0,
      'min_lr_ratio': 0.0,
      'weight_decay': 0.1,
      'b1': 0.9,
      'b2': 0.999,
      'eps': 1e-8,
      'grad_clip_norm': 1.0,
      'grad_accum_steps': 1,
      'mu_dtype': None,
  })


def _resolve(config) -> ml_collections.ConfigDict:
  """Defaults overlaid with `config`; unknown or inconsistent fields raise ValueError."""
  resolved = default_config()
  known = set(resolved.keys())
  given = dict(config.items()) if config is not None else {}
  unknown = sorted(set(given) - known)
  if unknown:
    raise ValueError(f'unknown optimizer config field(s) {unknown}; known fields: {sorted(known)}')
  with resolved.ignore_type():
    for key, value in given.items():
      resolved[key] = value
  if resolved.total_steps <= 0:
    raise ValueError(f'optim.total_steps must be positive, got {resolved.total_steps}')
  if resolved.warmup_steps and resolved.warmup_ratio:
    raise ValueError('set optim.warmup_steps or optim.warmup_ratio, not both '
                     f'(got {resolved.warmup_steps} and {resolved.warmup_ratio})')
  if resolved.grad_accum_steps < 1:
    raise ValueError(f'optim.grad_accum_steps must be >= 1, got {resolved.grad_accum_steps}')
  return resolved


def warmup_steps(config) -> int:
  """The number of warmup updates, from `warmup_steps` or `ceil(warmup_ratio * total)`."""
  config = _resolve(config)
  if config.warmup_ratio:
    return math.ceil(config.warmup_ratio * config.total_steps)
  return int(config.warmup_steps)


def learning_rate_schedule(config) -> optax.Schedule:
  """update index -> lr: linear 0 -> lr over the warmup, then cosine down to
  lr * min_lr_ratio at `total_steps` (constant after). Same values as transformers'
  get_cosine_with_min_lr_schedule_with_warmup(num_cycles=0.5, min_lr_rate=min_lr_ratio)."""
  config = _resolve(config)
  warmup = warmup_steps(config)
  if warmup > config.total_steps:
    raise ValueError(f'warmup ({warmup} updates) is longer than optim.total_steps '
                     f'({config.total_steps})')
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.lr, warmup_steps=warmup,
      decay_steps=config.total_steps, end_value=config.lr * config.min_lr_ratio)


def weight_decay_mask(params):
  """True where weight decay applies: every leaf except those named `bias` or `scale`
  and those under a module whose name contains 'norm'. Decided by name, not ndim,
  because scanned layers stack biases and norm scales into 2-D [layers, features]
  arrays. Embeddings, kernels and LoRA `a`/`b` decay, as in transformers/PEFT."""
  def decays(path, _):
    names = jax.tree_util.keystr(path, simple=True, separator='/').split('/')
    return not (names[-1] in _NO_DECAY_LEAF_NAMES
                or any(_NORM_MODULE.search(n) for n in names[:-1]))
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW + warmup/cosine + global-norm clipping + accumulation of the trainable params.

  Layout: MultiSteps(chain(clip, adamw)). Clipping sees the mean gradient of the
  accumulated micro-steps (as torch's clip_grad_norm_ after accumulation). Updates on
  non-final micro-steps are zero.
  """
  config = _resolve(config)
  adamw = optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2,
                      eps=config.eps, weight_decay=config.weight_decay,
                      mask=weight_decay_mask, mu_dtype=config.mu_dtype)
  clip = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm else []
  optimizer = optax.chain(*clip, adamw)
  if config.grad_accum_steps > 1:
    optimizer = optax.MultiSteps(optimizer, every_k_schedule=config.grad_accum_steps
                                 ).gradient_transformation()
  return optimizer
