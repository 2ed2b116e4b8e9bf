"""The weights a run names and where they come from, in one place.

- `model_config_of(config)`: the ThinkerConfig of a run config (a factory or an HF
  config.json, with the run's dtypes, remat and attention); `lora_config_of`: whether the
  run trains LoRA factors (their config) or not (None).
- `initial_params`: the params a stage starts from, placed on the mesh: an HF checkpoint
  directory (streamed, `convert.load_hf`; from a `gs://` URL through a local copy), a
  params directory a stage saved (local or `gs://`: Orbax reads it), or random.
- `weights_identity`: what those weights are, for fingerprints.
- The params directory (a stage's `final/`, `saber-convert-hf to-params`' output):
  `params/` (Orbax, stored in chunks of one layer or less) and `thinker_config.json`;
  `save_params`, `load_params`, `params_config`, and `params_leaf_reader`, which reads
  it one layer at a time for the export.
"""

import dataclasses
import os

import flax.linen as nn
import flax.traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
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

# The params are stored in chunks of at most this size, each layer stack one layer per chunk:
# a chunk is decoded whole (into a buffer of its own), so the export then reads a layer, or a
# whole embedding, without decoding more than one layer or chunk beside it.
CHUNK_BYTES = 64 << 20


def save_params(path: str, params, model_config: ThinkerConfig) -> None:
  """The thinker params alone (LoRA merged) and their config, as the next stage's start
  and reference; `saber-convert-hf` exports them to Hugging Face format (reading them one
  layer at a time: `params_leaf_reader`)."""
  path = files.absolute(path)
  stacked = {key for key, box in flax.traverse_util.flatten_dict(
      abstract_params(model_config), sep='/').items() if box.names[:1] == ('layers',)}
  save_args = flax.traverse_util.unflatten_dict(
      {key: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES, shard_axes=(0,) if key in stacked else ())
       for key in flax.traverse_util.flatten_dict(params, sep='/')}, sep='/')
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(path, 'params'), params, save_args=save_args, force=True)
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
  """A `convert.streamed_hf_tensors` reader of the params saved by `save_params`: each
  leaf comes back as a `StoredLeaf` that reads from disk only what is indexed (one layer of
  a layer stack), so an export holds one layer at a time instead of the model.
  `abstract_params` (unboxed) names the leaves there are and their shapes."""
  directory = os.path.join(files.absolute(path), 'params')
  flat = flax.traverse_util.flatten_dict(abstract_params, sep='/')
  with ocp.PyTreeCheckpointer() as checkpointer:
    saved = checkpointer.metadata(directory).item_metadata
  stored = flax.traverse_util.flatten_dict(saved.tree, sep='/')
  context = ocp.type_handlers.get_ts_context(use_ocdbt=True)

  def leaf(tower: str, inner: str):
    key = f'{tower}/{inner}'
    if key not in flat:
      return None
    if key not in stored:
      raise KeyError(f'{path}: the saved params have no {key}')
    meta = stored[key]
    if tuple(meta.shape) != tuple(flat[key].shape):
      raise ValueError(f'{path}: param {key} is saved with shape {tuple(meta.shape)}; the '
                       f'config ({CONFIG_FILE}) gives {tuple(flat[key].shape)}')
    info = ocp.type_handlers.ParamInfo(name=meta.name, parent_dir=meta.directory,
                                       use_zarr3=saved.use_zarr3, ts_context=context)
    spec = ocp.type_handlers.get_json_tspec_read(
        info, use_ocdbt=ocp.type_handlers.is_ocdbt_checkpoint(meta.directory))
    return StoredLeaf(ts.open(spec, context=context, read=True).result(), f'{path}: param {key}')
  return leaf


class StoredLeaf:
  """One saved param read lazily, like a memory-mapped array: `leaf[i]` reads layer i of a
  layer stack, `np.asarray(leaf)` the whole param. What is read is checked finite (the
  error names the param and the layer)."""

  def __init__(self, store: ts.TensorStore, name: str):
    self.data, self.name, self.shape = store, name, tuple(store.shape)
    # A stack saved as one chunk (as save_params did before CHUNK_BYTES) is decoded whole to
    # read any of its layers: read it whole once, at the first layer, not once per layer.
    self.whole_at_first_layer = store.chunk_layout.read_chunk.shape[0] > 1

  def __getitem__(self, layer: int) -> np.ndarray:
    if self.whole_at_first_layer:
      self.data, self.whole_at_first_layer = self.data.read().result(), False
    return _finite(np.asarray(self.data[layer]), f'{self.name} (layer {layer})')

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    return _finite(np.asarray(self.data, dtype), self.name)


def _finite(array: np.ndarray, name: str) -> np.ndarray:
  # min and max are NaN when any value is (and +-inf when one is): no full-size bool mask
  if not (np.isfinite(array.min()) and np.isfinite(array.max())):
    raise ValueError(f'{name} holds non-finite values (NaN or inf)')
  return array
