"""The weights a run names and where they come from, in one place.

- `model_config_of(config)`: the ThinkerConfig of a run config (a factory or an HF
  config.json, with the run's dtypes, remat and attention); `lora_config_of`: whether the
  run trains LoRA factors (their config) or not (None).
- `initial_params`: the params a stage starts from, placed on the mesh: an HF checkpoint
  directory (streamed, `convert.load_hf`; from a `gs://` URL through a local copy), a
  params directory a stage saved (local or `gs://`: Orbax reads it), or random.
- `weights_identity`: what those weights are, for fingerprints.
- The params directory (a stage's `final/`, `saber-convert-hf to-params`' output):
  `params/` (Orbax) and `thinker_config.json`; `save_params`, `load_params`,
  `params_config`.
"""

import dataclasses
import os

import flax.linen as nn
import flax.traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from saber_jax import convert, files, fingerprint, sharding
from saber_jax.errors import UserError
from saber_jax.models.config import ThinkerConfig
from saber_jax.models.thinker import abstract_params, init_params

CONFIG_FILE = 'thinker_config.json'


def model_config_of(config) -> ThinkerConfig:
  """The ThinkerConfig a run config names: a factory (`model.name`) or an HF config.json."""
  m = config.model
  base = (ThinkerConfig.from_hf(m.hf_config) if m.get('hf_config')
          else getattr(ThinkerConfig, m.name)())
  attention = m.attention
  if attention == 'auto':
    attention = {'gpu': 'cudnn', 'tpu': 'splash'}.get(jax.default_backend(), 'xla')
  return dataclasses.replace(base, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                             attention=attention)


def lora_config_of(config):
  """`config.lora` when the run trains LoRA factors (`trainable='lora'`), else None."""
  return config.lora if config.trainable == 'lora' else None


def initial_params(config, model_config: ThinkerConfig, mesh: Mesh, init_from: str | None):
  """Params on the mesh: from an HF checkpoint dir, a saved-params dir, or random init
  (seeded by `config.seed`). Each leaf is created directly on its sharding."""
  boxed = abstract_params(model_config)
  shardings = sharding.tree_shardings(boxed, mesh)
  if init_from and convert.is_hf_checkpoint(init_from):
    with files.local_copy(init_from) as local:   # safetensors are memory-mapped
      _, params = convert.load_hf(local, model_config.param_dtype, mesh)
    return params
  if init_from:
    return load_params(init_from, sharding.abstract_like(nn.unbox(boxed), shardings))
  init = jax.jit(lambda key: nn.unbox(init_params(model_config, key)), out_shardings=shardings)
  return init(jax.random.key(config.seed))


def weights_identity(config, init_from: str | None) -> dict:
  """What a run's starting weights are, for fingerprints: the model and `init_from`'s files."""
  return {'model': {k: config.model.get(k) for k in ('name', 'hf_config', 'dtype', 'param_dtype')},
          'init_from': fingerprint.tree_identity(init_from) if init_from else None}


# ------------------------------------------------------------------- the params directory

def save_params(path: str, params, model_config: ThinkerConfig) -> None:
  """The thinker params alone (LoRA merged) and their config, as the next stage's start
  and reference; `saber-convert-hf` exports them to Hugging Face format."""
  path = files.absolute(path)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(path, 'params'), params, force=True)
  if jax.process_index() == 0:
    files.write_json(os.path.join(path, CONFIG_FILE), model_config.to_hf())


def params_config(path: str) -> ThinkerConfig:
  return ThinkerConfig.from_hf(files.read_json(os.path.join(path, CONFIG_FILE)))


def check_saved_shapes(path: str, metadata, abstract) -> None:
  """UserError naming the first param whose saved shape differs from the model's (both
  shapes and the directory), or that one side lacks: Orbax's own error names neither."""
  tree = getattr(metadata, 'item_metadata', metadata)
  saved = flax.traverse_util.flatten_dict(getattr(tree, 'tree', tree), sep='/')
  wanted = flax.traverse_util.flatten_dict(abstract, sep='/')
  for key in sorted(set(saved) | set(wanted)):
    have, want = (tuple(getattr(t.get(key), 'shape', ())) if key in t else None
                  for t in (saved, wanted))
    if have != want:
      raise UserError(
          f'{path}: param {key} is ' + (f'{list(have)}' if have is not None else 'missing')
          + ' there, but the model config (config.model) has '
          + (f'{list(want)}' if want is not None else 'no such param')
          + ': these weights were saved for another model; point init_from at weights of '
          'this model, or set config.model to the one they were trained with')


def load_params(path: str, abstract):
  """Params saved by `save_params`, placed by the shardings of `abstract` (a tree of
  ShapeDtypeStructs; plain arrays' shapes when it has none). Non-finite values are an
  error naming the param."""
  directory = os.path.join(files.absolute(path), 'params')
  with ocp.StandardCheckpointer() as checkpointer:
    check_saved_shapes(path, checkpointer.metadata(directory), abstract)
    params = checkpointer.restore(directory, abstract)
  bad = convert.nonfinite_paths(params)
  if bad:
    raise ValueError(f'{path}: params {bad} hold non-finite values (NaN or inf)')
  return params


def params_leaf_reader(path: str, abstract_params):
  """A `convert.streamed_hf_tensors` reader of the params saved by `save_params`: each call
  restores one leaf (a whole layer stack) into host memory, so an export holds one leaf at a
  time instead of the model. `abstract_params` (unboxed) names the leaves there are."""
  directory = os.path.join(files.absolute(path), 'params')
  flat = flax.traverse_util.flatten_dict(abstract_params, sep='/')

  def leaf(tower: str, inner: str):
    key = f'{tower}/{inner}'
    if key not in flat:
      return None
    item = flax.traverse_util.unflatten_dict({key: flat[key]}, sep='/')
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    with ocp.PyTreeCheckpointer() as checkpointer:
      restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))
    value = flax.traverse_util.flatten_dict(restored, sep='/')[key]
    if not all(np.isfinite(part).all() for part in (value if value.ndim > 1 else [value])):
      raise ValueError(f'{path}: param {key} holds non-finite values (NaN or inf)')
    return value
  return leaf
