"""Hugging Face safetensors <-> saber_jax param pytree, both ways.

Each tower declares its checkpoint names next to its model as `CHECKPOINT_RULES`: a list of
`(pattern, path, perm)` where `pattern` is a regex over the tensor name inside the tower
(a `(?P<layer>\\d+)` group marks a layer of an `nn.scan` stack), `path` the '/'-joined
param path inside the tower's params and `perm` the axis permutation from the torch
layout to ours (None: same layout). Loading streams tensor by tensor into buffers of the
final shape (placed on their sharding when a mesh is given), so a 7B is never held twice.
"""

import functools
import json
import math
import os
import re
from typing import Iterable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import tqdm
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, NamedSharding

from saber_jax import files
from saber_jax import sharding as sharding_lib
from saber_jax.models import audio, layers, text, vision
from saber_jax.models.config import ThinkerConfig
from saber_jax.models.thinker import abstract_params

Rule = layers.Rule


def match_rule(rules: Sequence[Rule], name: str) -> tuple[str, int | None, tuple[int, ...] | None]:
  """The (param path, layer index or None, permutation) of a tensor name, or KeyError."""
  for pattern, path, perm in rules:
    m = re.fullmatch(pattern, name)
    if m:
      layer = m.groupdict().get('layer')
      return path, None if layer is None else int(layer), perm
  raise KeyError(name)


# --- safetensors files, read through a memory map (numpy alone has no bfloat16 reader) ---

_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
           'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
           'BOOL': np.bool_}


def read_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  """(name, array) of each tensor in a .safetensors file, without loading the file. A
  truncated or malformed file is a ValueError naming the file (and the tensor)."""
  data = np.memmap(path, np.uint8, mode='r') if os.path.getsize(path) else np.zeros(0, np.uint8)
  if data.size < 8:
    raise ValueError(f'{path}: not a safetensors file ({data.size} bytes, no header)')
  header_size = int(data[:8].view('<u8')[0])
  base = 8 + header_size
  if base > data.size:
    raise ValueError(f'{path}: truncated: the header claims {header_size} bytes, the file '
                     f'has {data.size}')
  try:
    header = json.loads(bytes(data[8:base]))
  except ValueError as e:
    raise ValueError(f'{path}: the safetensors header is not JSON ({e})') from None
  for name, info in header.items():
    if name == '__metadata__':
      continue
    try:
      dtype, shape = np.dtype(_DTYPES[info['dtype']]), info['shape']
      start, end = info['data_offsets']
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f'{path}: tensor {name!r} has a malformed header entry {info!r}') from e
    if end - start != dtype.itemsize * math.prod(shape):
      raise ValueError(f'{path}: tensor {name!r} of {info["dtype"]} {shape} spans '
                       f'{end - start} bytes')
    if base + end > data.size:
      raise ValueError(f'{path}: truncated: tensor {name!r} ends at byte {base + end}, the '
                       f'file has {data.size}')
    yield name, data[base + start:base + end].view(dtype).reshape(shape)


def nonfinite_paths(params) -> list[str]:
  """The '/'-joined paths of the float leaves holding NaN or inf (one device round trip)."""
  flat = [('/'.join(str(getattr(k, 'key', k)) for k in path), x)
          for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
          if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
  finite = jax.device_get(_all_finite([x for _, x in flat]))
  return [name for (name, _), ok in zip(flat, finite) if not ok]


@jax.jit
def _all_finite(leaves):
  return [jnp.isfinite(x).all() for x in leaves]


def is_hf_checkpoint(path: str) -> bool:
  return os.path.isdir(path) and any(n.endswith(('.safetensors', '.safetensors.index.json'))
                                     for n in os.listdir(path))


def checkpoint_files(path: str) -> list[str]:
  """The safetensors files of a checkpoint directory (through its index when there is one)."""
  index = os.path.join(path, 'model.safetensors.index.json')
  if os.path.exists(index):
    with open(index) as f:
      names = sorted(set(json.load(f)['weight_map'].values()))
  else:
    names = sorted(n for n in os.listdir(path) if n.endswith('.safetensors'))
  if not names:
    raise FileNotFoundError(f'no .safetensors files in {path}')
  return [os.path.join(path, n) for n in names]


# --- names: checkpoint tensor -> (tower, name inside the tower) ---

TOWER_RULES = {'audio': audio.CHECKPOINT_RULES, 'vision': vision.CHECKPOINT_RULES,
               'text': text.CHECKPOINT_RULES}
# Layouts in the wild: hub files ('thinker.' + legacy names), `save_pretrained` of a thinker
# (legacy names) and transformers 5 module names.
_ALIASES = (('model.language_model.', 'model.'), ('model.audio_tower.', 'audio_tower.'),
            ('model.visual.', 'visual.'))
_TOWER_PREFIXES = (('audio_tower.', 'audio'), ('visual.', 'vision'), ('model.', 'text'))
_IGNORED_PREFIXES = ('talker.', 'token2wav.')


def route(name: str) -> tuple[str, str] | None:
  """(tower, name inside the tower) of a checkpoint tensor, None for the talker/token2wav."""
  if name.startswith(_IGNORED_PREFIXES):
    return None
  name = name.removeprefix('thinker.')
  for alias, canonical in _ALIASES:
    if name.startswith(alias):
      name = canonical + name[len(alias):]
  for prefix, tower in _TOWER_PREFIXES:
    if name.startswith(prefix):
      return tower, name[len(prefix):]
  if name.startswith('lm_head.'):
    return 'text', name
  raise KeyError(f'checkpoint tensor {name!r} belongs to no thinker tower')


# --- loading ---

@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked, value, layer):
  return jax.lax.dynamic_update_index_in_dim(stacked, value, layer, 0)


class _ParamBuffers:
  """Params of known shapes filled tensor by tensor: in host memory, or straight into
  sharded device buffers when shardings are given (stacked layers updated in place)."""

  def __init__(self, abstract: dict, dtype, shardings: dict | None):
    self.shapes = {p: tuple(v.shape) for p, v in flatten_dict(abstract, sep='/').items()}
    self.shardings = None if shardings is None else flatten_dict(shardings, sep='/')
    self.dtype = jnp.dtype(dtype)
    self.buffers, self.filled = {}, {}

  def put(self, path: str, layer: int | None, value: np.ndarray, source: str):
    if path not in self.shapes:
      raise KeyError(f'checkpoint tensor {source!r} maps to {path!r}, which the model does not have')
    shape = self.shapes[path]
    target = shape[1:] if layer is not None else shape
    if value.shape != target:
      raise ValueError(f'checkpoint tensor {source!r} has shape {value.shape} after layout '
                       f'change; {path!r} expects {target}')
    if layer is not None and not 0 <= layer < shape[0]:
      raise KeyError(f'checkpoint tensor {source!r} is for layer {layer} of {path!r}; the '
                     f'config has {shape[0]} layers')
    value = np.asarray(value, self.dtype)
    if not np.isfinite(value).all():
      raise ValueError(f'checkpoint tensor {source!r} holds non-finite values (NaN or inf)')
    sharding = None if self.shardings is None else self.shardings[path]
    if layer is None:
      self.buffers[path] = value if sharding is None else jax.device_put(value, sharding)
      self.filled[path] = {None}
      return
    if path not in self.buffers:
      self.buffers[path] = (np.empty(shape, self.dtype) if sharding is None else
                            jax.jit(lambda: jnp.zeros(shape, self.dtype), out_shardings=sharding)())
      self.filled[path] = set()
    if sharding is None:
      self.buffers[path][layer] = value
    else:
      layer_sharding = NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
      self.buffers[path] = _set_layer(self.buffers[path], jax.device_put(value, layer_sharding),
                                      layer)
    self.filled[path].add(layer)

  def result(self) -> dict:
    problems = []
    for path, shape in self.shapes.items():
      done = self.filled.get(path, set())
      if not done:
        problems.append(path)
      elif None not in done and len(done) != shape[0]:
        problems.append(f'{path} (layers {sorted(set(range(shape[0])) - done)})')
    if problems:
      raise KeyError(f'checkpoint is missing parameters: {problems}')
    return unflatten_dict(self.buffers, sep='/')


def _put_tensor(buffers: _ParamBuffers, rules: Sequence[Rule], prefix: str, name: str,
                array: np.ndarray, source: str):
  try:
    path, layer, perm = match_rule(rules, name)
  except KeyError:
    raise KeyError(f'checkpoint tensor {source!r} matches no parameter') from None
  value = array if perm is None else np.transpose(array, perm)
  buffers.put(prefix + path, layer, value, source)


def params_from_state_dict(rules: Sequence[Rule], tensors: Iterable[tuple[str, np.ndarray]],
                           abstract: dict, dtype=np.float32) -> dict:
  """Params of one tower from its (name, torch-layout array) pairs, in host memory.

  `abstract` (e.g. the unboxed `jax.eval_shape` of the module's init) gives every target
  shape; an unknown tensor, a shape mismatch or an unfilled param is an error naming it.
  """
  buffers = _ParamBuffers(abstract, dtype, None)
  for name, array in tensors:
    _put_tensor(buffers, rules, '', name, np.asarray(array), name)
  return buffers.result()


def load_hf(path: str, dtype: str = 'float32', mesh: Mesh | None = None,
            axis_rules=sharding_lib.AXIS_RULES, progress: bool = False
            ) -> tuple[ThinkerConfig, dict]:
  """(config, params) of a transformers checkpoint directory.

  Reads `config.json` and one or many `*.safetensors` (with or without an index), of the
  full Qwen2.5-Omni model (thinker kept; talker and token2wav ignored) or a thinker saved
  on its own. Tensors stream one at a time; with a mesh, each goes straight onto its
  sharding, so the host never holds the model.
  """
  config = ThinkerConfig.from_hf(path, param_dtype=dtype)
  boxed = abstract_params(config)
  shardings = None if mesh is None else sharding_lib.tree_shardings(boxed, mesh, axis_rules)
  buffers = _ParamBuffers(nn.unbox(boxed), dtype, shardings)
  tensors = ((file, name, array) for file in checkpoint_files(path)
             for name, array in read_safetensors(file))
  for file, name, array in tqdm.tqdm(tensors, desc='loading', unit=' tensors',
                                     disable=not progress):
    routed = route(name)
    if routed is not None:
      tower, inner = routed
      _put_tensor(buffers, TOWER_RULES[tower], tower + '/', inner, array,
                  f'{name} in {os.path.basename(file)}')
  params = buffers.result()
  if mesh is None:
    params = jax.tree.map(jnp.asarray, params)
  return config, params


# --- saving ---

_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_HF_PREFIX = {'audio': 'audio_tower.', 'vision': 'visual.', 'text': 'model.'}


def write_safetensors(path: str, tensors: dict[str, np.ndarray]):
  """Write a .safetensors file (any numpy dtype of the format, bfloat16 included)."""
  header, offset = {}, 0
  for name, array in tensors.items():
    header[name] = dict(dtype=_NAMES[array.dtype], shape=list(array.shape),
                        data_offsets=[offset, offset + array.nbytes])
    offset += array.nbytes
  header_bytes = json.dumps(header, separators=(',', ':')).encode()
  header_bytes += b' ' * (-len(header_bytes) % 8)
  with open(path, 'wb') as f:
    f.write(np.uint64(len(header_bytes)).tobytes())
    f.write(header_bytes)
    for array in tensors.values():
      f.write(np.ascontiguousarray(array).tobytes())


def _name_template(pattern: str) -> str:
  """'layers\\.(?P<layer>\\d+)\\.fc1\\.weight' -> 'layers.{layer}.fc1.weight'."""
  template = pattern.replace(r'(?P<layer>\d+)', '{layer}').replace('\\.', '.')
  if re.search(r'[\\()\[\]*+?|^$]', template):
    raise ValueError(f'checkpoint rule {pattern!r} is not a plain name template')
  return template


def hf_tensors(params: dict, prefix: str = '') -> Iterator[tuple[str, np.ndarray]]:
  """(checkpoint name, torch-layout array) of every tensor, one layer at a time."""
  for tower, rules in TOWER_RULES.items():
    for pattern, path, perm in rules:
      value = params[tower]
      for key in path.split('/'):
        value = value.get(key) if isinstance(value, dict) else None
      if value is None:
        continue                       # e.g. no lm_head when tied to the embedding
      template = _name_template(pattern)
      hf_prefix = '' if template.startswith('lm_head.') else _HF_PREFIX[tower]
      inverse = None if perm is None else tuple(np.argsort(perm))
      layers = range(value.shape[0]) if '{layer}' in template else [None]
      for layer in layers:
        array = np.asarray(value if layer is None else value[layer])
        yield (prefix + hf_prefix + template.format(layer=layer),
               array if inverse is None else np.ascontiguousarray(np.transpose(array, inverse)))


def save_hf(config: ThinkerConfig, params: dict, path: str, *, prefix: str = '',
            max_shard_bytes: int = 4 << 30, progress: bool = False):
  """Write `config.json` and safetensors that transformers loads back
  (`Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained`). `prefix='thinker.'` gives
  the hub's layout. Files above `max_shard_bytes` are split, with an index.

  An earlier export in `path` is replaced whole: the new one is written to a sibling
  temporary directory that then takes the folder's place, so no stale shard or index is
  left beside the new weights and a killed export leaves the old one intact. Files there
  that are not weights or config (a tokenizer, a README) are carried over."""
  files.replace_dir(path, lambda tmp: _write_hf(config, params, tmp, prefix, max_shard_bytes,
                                                progress),
                    carry_over=lambda name: not _is_export_file(name))


def _is_export_file(name: str) -> bool:
  return (name == 'config.json' or name.endswith(('.safetensors', '.safetensors.index.json'))
          or (name.startswith('pytorch_model') and name.endswith(('.bin', '.bin.index.json'))))


def _write_hf(config, params, path, prefix, max_shard_bytes, progress):
  files.write_json(os.path.join(path, 'config.json'), config.to_hf())
  shards, current, size = [], {}, 0
  for name, array in tqdm.tqdm(hf_tensors(params, prefix), desc='saving', unit=' tensors',
                               disable=not progress):
    if current and size + array.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = array
    size += array.nbytes
  shards.append(current)
  if len(shards) == 1:
    write_safetensors(os.path.join(path, 'model.safetensors'), shards[0])
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    file = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    write_safetensors(os.path.join(path, file), shard)
    weight_map.update(dict.fromkeys(shard, file))
  total = sum(a.nbytes for shard in shards for a in shard.values())
  files.write_json(os.path.join(path, 'model.safetensors.index.json'),
                   dict(metadata=dict(total_size=total), weight_map=weight_map))
