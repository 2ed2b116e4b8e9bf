"""LoRA as a pure transform of the param tree: the model code never knows about it.

`init_lora` builds a small tree of low-rank factors for the kernels whose path matches
`targets`; `merge_lora` returns params with `W + (alpha / rank) * a @ b` in their place.
The training step differentiates w.r.t. the LoRA tree only and merges inside the loss
function, so the forward pass is the ordinary model on merged weights; export writes the
merged kernels to Hugging Face format.

Layout. Params are the Flax linen `params` collection (nested dicts). Kernels are
[in, out], or [layers, in, out] for layers stacked by `nn.scan`. For the kernel at
`text/layers/self_attn/q_proj/kernel` the LoRA tree holds
`lora['text']['layers']['self_attn']['q_proj'] = {'a': [..., in, rank], 'b': [..., rank, out]}`
with the leading (layer) axes of the kernel kept, as PEFT's lora_A / lora_B per module.
"""

import re
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from saber_jax.errors import UserError

# Regexes searched (`re.search`) in the '/'-joined path of each leaf named 'kernel'.
DEFAULT_TARGETS = (
    r'^text/.*(q_proj|k_proj|v_proj|o_proj)/kernel$',
    r'^text/.*(gate_proj|up_proj|down_proj)/kernel$',
)


def target_kernel_paths(params, targets: Sequence[str] = DEFAULT_TARGETS) -> list[tuple[str, ...]]:
  """Paths (tuples of keys, ending in 'kernel') of the kernels LoRA adapts, in tree order."""
  if isinstance(targets, str):
    targets = (targets,)
  patterns = [re.compile(t) for t in targets]
  paths = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(path, simple=True, separator='/')
    if not name.endswith('/kernel') or not any(p.search(name) for p in patterns):
      continue
    if leaf.ndim < 2:
      raise ValueError(f'LoRA target {name} has shape {leaf.shape}; expected [..., in, out]')
    paths.append(tuple(name.split('/')))
  if not paths:
    examples = [jax.tree_util.keystr(p, simple=True, separator='/')
                for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    raise ValueError(f'LoRA targets {list(targets)} matched no kernel; param paths include '
                     f'{examples[:8]}')
  return paths


def _get(tree, names):
  for name in names:
    tree = tree[name]
  return tree


def _set(tree, names, value):
  """A copy of nested dict `tree` with `value` at `names` (only the path is copied)."""
  if not names:
    return value
  head, *rest = names
  new = dict(tree)
  new[head] = _set(tree.get(head, {}), rest, value)
  return new


def init_lora(key, params, *, rank: int, targets: Sequence[str] = DEFAULT_TARGETS,
              dtype=jnp.float32):
  """LoRA factors for every target kernel of `params` (arrays or ShapeDtypeStructs).

  `a` [..., in, rank] ~ U(-1/sqrt(in), 1/sqrt(in)) -- PEFT's default, kaiming_uniform
  with a = sqrt(5) on lora_A -- and `b` [..., rank, out] = 0, so the merged model starts
  equal to the base model. Leading axes (the scanned layer axis) are kept: each layer
  gets its own factors. Factors are kept in `dtype` (float32) whatever the base dtype.
  """
  if rank <= 0:
    raise ValueError(f'LoRA rank must be positive, got {rank}')
  paths = target_kernel_paths(params, targets)
  widths = {names: _get(params, names).shape[-2:] for names in paths}
  narrowest = min(widths, key=lambda names: min(widths[names]))
  if rank > min(widths[narrowest]):   # a factor wider than the kernel it adapts
    raise UserError(f'config.lora.rank = {rank}: expected <= {min(widths[narrowest])}, the '
                    f"narrowest width of the adapted kernels ({'/'.join(narrowest)} is "
                    f'[in {widths[narrowest][0]}, out {widths[narrowest][1]}])')
  lora = {}
  for index, names in enumerate(paths):
    kernel = _get(params, names)
    *lead, fan_in, fan_out = kernel.shape
    bound = 1.0 / fan_in ** 0.5
    a = jax.random.uniform(jax.random.fold_in(key, index), (*lead, fan_in, rank), dtype,
                           -bound, bound)
    b = jnp.zeros((*lead, rank, fan_out), dtype)
    lora = _set(lora, names[:-1], {'a': a, 'b': b})
  return lora


def _lora_modules(lora_params):
  """(module path, {'a', 'b'}) for every adapted module of a LoRA tree."""
  found = []

  def walk(tree, names):
    if isinstance(tree, dict) and set(tree) == {'a', 'b'} and not isinstance(tree['a'], dict):
      found.append((names, tree))
    elif isinstance(tree, dict):
      for name, sub in tree.items():
        walk(sub, (*names, name))
    else:
      raise ValueError(f"LoRA tree leaf at {'/'.join(names)} is not under an {{'a', 'b'}} pair")
  walk(lora_params, ())
  return found


def merge_lora(params, lora_params, *, rank: int, alpha: float):
  """params with each adapted kernel replaced by W + (alpha / rank) * a @ b.

  The product is batched over leading (layer) axes, computed in float32 and cast back to
  the kernel's dtype; every other leaf is returned as is. Pure, jit-able and
  differentiable w.r.t. `lora_params` (and `params`).
  """
  scale = alpha / rank
  merged = params
  for names, factors in _lora_modules(lora_params):
    kernel_path = (*names, 'kernel')
    try:
      kernel = _get(params, kernel_path)
    except (KeyError, TypeError):
      raise ValueError(f"LoRA module {'/'.join(names)} has no kernel in params") from None
    a, b = factors['a'], factors['b']
    lead = kernel.shape[:-2]
    if (a.shape != (*lead, kernel.shape[-2], rank) or b.shape != (*lead, rank, kernel.shape[-1])):
      raise ValueError(f"LoRA factors at {'/'.join(names)}: a {a.shape}, b {b.shape} do not fit "
                       f'kernel {kernel.shape} with rank {rank}')
    delta = jnp.einsum('...ir,...ro->...io', a, b, preferred_element_type=jnp.float32)
    new_kernel = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
    merged = _set(merged, kernel_path, new_kernel)
  return merged


def lora_logical_axes(params_axes, lora_params):
  """PartitionSpecs (logical axis names) for the LoRA tree, from the base params' specs.

  `params_axes` is the tree `nn.get_partition_spec(abstract_params)` returns. For a
  kernel named (*lead, in_axis, out_axis), `a` gets (*lead, in_axis, None) and `b` gets
  (*lead, None, out_axis): the rank axis is small and replicated. A kernel without
  logical names gives replicated factors.
  """
  def factor_specs(names, factors):
    ndim = factors['a'].ndim
    try:
      spec = _get(params_axes, (*names, 'kernel'))
    except (KeyError, TypeError):
      raise ValueError(f"no logical axes for {'/'.join(names)}/kernel in params_axes") from None
    axes = tuple(spec) if spec is not None else ()
    axes = axes + (None,) * (ndim - len(axes))
    if len(axes) != ndim:
      raise ValueError(f"logical axes {spec} of {'/'.join(names)}/kernel do not match "
                       f'its rank {ndim}')
    return {'a': PartitionSpec(*axes[:-1], None), 'b': PartitionSpec(*axes[:-2], None, axes[-1])}

  specs = {}
  for names, factors in _lora_modules(lora_params):
    specs = _set(specs, names, factor_specs(names, factors))
  return specs
