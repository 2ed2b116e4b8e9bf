"""Hugging Face safetensors <-> saber_jax param pytree, both ways.

Each tower declares its checkpoint names next to its model as `CHECKPOINT_RULES`: a list of
`(pattern, path, perm)` where `pattern` is a regex over the tensor name inside the tower
(a `(?P<layer>\\d+)` group marks a layer of an `nn.scan` stack), `path` the '/'-joined
param path inside the tower's params and `perm` the axis permutation from the torch
layout to ours (None: same layout). Loading streams tensor by tensor into buffers of the
final shape (placed on their sharding when a mesh is given), so a 7B is never held twice.
"""

import functools
import itertools
import json
import math
import os
import re
import shutil
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
  """A directory (local, or a URL `files` opens) holding safetensors."""
  return any(n.endswith(('.safetensors', '.safetensors.index.json')) for n in files.listdir(path))


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
      raise KeyError(f'checkpoint tensor {source!r} maps to {path!r}, '
                     'which the model does not have')
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
      np.ascontiguousarray(array).tofile(f)     # no bytes copy of the tensor


def _name_template(pattern: str) -> str:
  """'layers\\.(?P<layer>\\d+)\\.fc1\\.weight' -> 'layers.{layer}.fc1.weight'."""
  template = pattern.replace(r'(?P<layer>\d+)', '{layer}').replace('\\.', '.')
  if re.search(r'[\\()\[\]*+?|^$]', template):
    raise ValueError(f'checkpoint rule {pattern!r} is not a plain name template')
  return template


def hf_tensors(params: dict, prefix: str = '') -> Iterator[tuple[str, np.ndarray]]:
  """(checkpoint name, torch-layout array) of every tensor, one layer at a time."""
  return streamed_hf_tensors(params_leaf(params), prefix)


def streamed_hf_tensors(leaf, prefix: str = '', dtype=None) -> Iterator[tuple[str, np.ndarray]]:
  """`hf_tensors` of params read one leaf at a time: `leaf(tower, path)` gives the array
  at '/'-joined `path` inside `tower`'s params, or None when the model has none (e.g. no
  lm_head when tied to the embedding). The array may be one read lazily (`.shape`, `[layer]`
  and `np.asarray`, as `weights.params_leaf_reader`'s): only the layer being yielded is
  then read and held. Tensors are cast to `dtype` (None: as stored) before the transpose."""
  for tower, rules in TOWER_RULES.items():
    for pattern, path, perm in rules:
      value = leaf(tower, path)
      if value is None:
        continue
      template = _name_template(pattern)
      hf_prefix = '' if template.startswith('lm_head.') else _HF_PREFIX[tower]
      inverse = None if perm is None else tuple(np.argsort(perm))
      layers = range(value.shape[0]) if '{layer}' in template else [None]
      for layer in layers:
        array = np.asarray(value if layer is None else value[layer])
        if dtype is not None:
          array = array.astype(dtype, copy=False)
        if inverse is not None:         # (the untransposed array is not held while yielded)
          array = np.ascontiguousarray(np.transpose(array, inverse))
        yield prefix + hf_prefix + template.format(layer=layer), array
      del value


def save_hf(config: ThinkerConfig, params: dict, path: str, *, prefix: str = '',
            max_shard_bytes: int = 4 << 30, progress: bool = False):
  """Write `config.json` and safetensors that transformers loads back
  (`Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained`). `prefix='thinker.'` gives
  the hub's layout. Files above `max_shard_bytes` are split, with an index.

  An earlier export in `path` is replaced whole (`files.replace_dir`): no stale shard or
  index is left beside the new weights and a killed export leaves the old one intact. Files
  there that are not weights or config (a tokenizer, a README) are carried over."""
  def write(tmp):
    files.write_json(os.path.join(tmp, 'config.json'), config.to_hf())
    write_shards(tmp, hf_tensors(params, prefix), max_shard_bytes, progress)
  files.replace_dir(path, write, carry_over=lambda name: not _is_export_file(name))


def _is_export_file(name: str) -> bool:
  return (name == 'config.json' or name.endswith(('.safetensors', '.safetensors.index.json'))
          or (name.startswith('pytorch_model') and name.endswith(('.bin', '.bin.index.json'))))


def write_shards(path: str, tensors: Iterable[tuple[str, np.ndarray]], max_shard_bytes: int,
                 progress: bool = False) -> dict[str, str]:
  """Write (name, array) pairs as `model.safetensors`, or as `model-0000i-of-0000n` shards of
  at most `max_shard_bytes` (a bigger tensor gets a shard of its own) with the hub's
  `model.safetensors.index.json`. Each shard is written as soon as it is full, so the host
  holds one shard at a time. Returns the weight map (tensor name -> file)."""
  parts, current, size, total = [], {}, 0, 0
  names = set()

  def flush():
    part = os.path.join(path, f'part-{len(parts):05d}.safetensors')
    write_safetensors(part, current)
    parts.append((part, list(current)))

  for name, array in tqdm.tqdm(tensors, desc='saving', unit=' tensors', disable=not progress):
    if name in names:
      raise ValueError(f'tensor {name!r} is written twice')
    names.add(name)
    if current and size + array.nbytes > max_shard_bytes:
      flush()
      current, size = {}, 0
    current[name] = array
    size += array.nbytes
    total += array.nbytes
  flush()
  current = None
  if len(parts) == 1:
    os.replace(parts[0][0], os.path.join(path, 'model.safetensors'))
    return dict.fromkeys(parts[0][1], 'model.safetensors')
  weight_map = {}
  for i, (part, shard_names) in enumerate(parts):
    file = f'model-{i + 1:05d}-of-{len(parts):05d}.safetensors'
    os.replace(part, os.path.join(path, file))
    weight_map.update(dict.fromkeys(shard_names, file))
  files.write_json(os.path.join(path, 'model.safetensors.index.json'),
                   dict(metadata=dict(total_size=total), weight_map=weight_map))
  return weight_map


# --- the full Omni model: the run's thinker beside the base's talker and token2wav ---

def save_full_hf(config: ThinkerConfig, leaf, base: str, path: str, *,
                 max_shard_bytes: int = 4 << 30, dtype: str | None = None,
                 progress: bool = False) -> dict[str, str]:
  """A complete Qwen2.5-Omni checkpoint (`Qwen2_5OmniForConditionalGeneration`) in `path`:
  the thinker from `leaf` (`streamed_hf_tensors`' reader; `params_leaf(params)` for params
  in memory) under `thinker.`, the talker and token2wav tensors of the full checkpoint
  `base` copied as they are, `base`'s config with the thinker part changed only where
  `config` differs from it, and every other file of `base` (spk_dict.pt, tokenizer,
  processor, chat template, generation config) copied.

  Streamed: base tensors are memory-mapped and written shard by shard, thinker params read
  one layer at a time (`weights.params_leaf_reader`), so the host holds about one shard and
  one layer. The thinker tensors written must be exactly those of `base` (by name),
  or nothing is replaced. The export is atomic like `save_hf`'s. The thinker tensors are
  cast to `dtype` (None: the dtype of `base`'s thinker tensors, e.g. bf16 for the released
  models, whatever the params' storage dtype). Returns the weight map.
  """
  base = os.fspath(base)
  base_config_path = os.path.join(base, 'config.json')
  if not os.path.exists(base_config_path):
    raise FileNotFoundError(f'--base {base}: no config.json (expected a full Qwen2.5-Omni '
                            'checkpoint directory)')
  with open(base_config_path) as f:
    base_config = json.load(f)
  if 'thinker_config' not in base_config or 'talker_config' not in base_config:
    raise ValueError(f'{base_config_path}: not a full Qwen2.5-Omni config (no thinker_config '
                     f'and talker_config; model_type {base_config.get("model_type")!r})')
  base_thinker, base_others = {}, []
  for file in checkpoint_files(base):
    for name, array in read_safetensors(file):
      routed = route(name)
      if routed is None:
        base_others.append((file, name))
      else:
        base_thinker[routed] = name
        dtype = dtype or array.dtype
  written = []

  def thinker():
    for name, array in streamed_hf_tensors(leaf, 'thinker.', dtype):
      written.append(name)
      yield name, array

  def others():
    opened = {}
    for file, name in base_others:
      if file not in opened:
        opened.clear()             # one memory-mapped file at a time
        opened[file] = dict(read_safetensors(file))
      yield name, opened[file][name]

  def write(tmp):
    files.write_json(os.path.join(tmp, 'config.json'), full_config(base_config, config))
    weight_map = write_shards(tmp, itertools.chain(thinker(), others()), max_shard_bytes,
                              progress)
    ours = {route(name): name for name in written}
    missing = sorted(base_thinker[k] for k in set(base_thinker) - set(ours))
    extra = sorted(ours[k] for k in set(ours) - set(base_thinker))
    if missing or extra:
      raise ValueError(f'the params do not fit --base {base}: tensors of the base the params '
                       f'lack: {missing[:8]}; tensors the base lacks: {extra[:8]}')
    for name in os.listdir(base):
      if not _is_export_file(name) and not name.startswith('.'):
        source = os.path.join(base, name)
        copy = shutil.copytree if os.path.isdir(source) else shutil.copy2
        copy(source, os.path.join(tmp, name))
    return weight_map

  result = {}
  files.replace_dir(path, lambda tmp: result.update(write(tmp)))
  return result


def params_leaf(params: dict):
  """A `streamed_hf_tensors` reader of params held in memory."""
  def leaf(tower, path):
    value = params[tower]
    for key in path.split('/'):
      value = value.get(key) if isinstance(value, dict) else None
    return value
  return leaf


def full_config(base_config: dict, config: ThinkerConfig) -> dict:
  """`base_config` (a full Omni config.json) with its thinker_config changed only where
  `config` differs from what `base_config` says, so fields we do not model stay as they are."""
  merged = json.loads(json.dumps(base_config))
  before = ThinkerConfig.from_hf(base_config).to_hf()

  def update(target, old, new):
    for key, value in new.items():
      if isinstance(value, dict):
        sub = target.setdefault(key, {})
        update(sub, old.get(key) or {}, value)
      elif old.get(key) != value:
        target[key] = value
  update(merged['thinker_config'], before, config.to_hf())
  return merged
