"""The device mesh and the logical-axis rules that place params, optimizer state and batches.

Every param carries logical axis names (`nn.with_logical_partitioning`); `AXIS_RULES` maps
each name to mesh axes. A dimension that the mesh axes do not divide evenly stays
replicated (e.g. the vision MLP's 3420 over 8 devices), so one rule table serves every
mesh shape. The mesh uses `AxisType.Auto`: shardings are declared on params and batches
and XLA propagates them through the step.
"""

import functools
import hashlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from saber_jax.batch import split_axis

MESH_AXES = ('data', 'fsdp', 'tensor')

# logical axis -> mesh axes (a name, a tuple of names, or None for replicated).
AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', ('data', 'fsdp')),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('audio_embed', 'fsdp'),
    ('audio_heads', 'tensor'),
    ('audio_mlp', 'tensor'),
    ('vision_embed', 'fsdp'),
    ('vision_heads', 'tensor'),
    ('vision_mlp', 'tensor'),
    ('vision_merge', 'fsdp'),
    ('layers', None),
    ('norm', None),
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None,
              axis_names: Sequence[str] = MESH_AXES) -> Mesh:
  """A mesh over `devices` (default: all) with one -1 entry absorbing the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f'mesh shape {shape} has more than one -1')
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    shape[shape.index(-1)] = len(devices) // rest
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f'mesh shape {shape} does not use exactly the {len(devices)} devices')
  return jax.make_mesh(tuple(shape), tuple(axis_names), devices=devices,
                       axis_types=(AxisType.Auto,) * len(shape))


def on_mesh(fn, mesh: Mesh):
  """`fn` tracing with `mesh` as the context mesh, for use inside `jax.jit`: the model's
  `shard_map` kernels (splash attention) find the mesh there; jit's shardings alone do not
  set it."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return traced


def mesh_spec(shape: Sequence[int], logical: Sequence[str | None], mesh: Mesh,
              rules: Sequence[tuple[str, Any]] = AXIS_RULES) -> PartitionSpec:
  """The PartitionSpec of an array with these logical axis names.

  A mesh axis is used at most once per array, and only where it divides the dimension.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for size, name in zip(shape, logical):
    if name is not None and name not in table:
      raise KeyError(f'no sharding rule for logical axis {name!r}')
    axes = table.get(name) if name is not None else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    if axes and size % int(np.prod([mesh.shape[a] for a in axes])) == 0:
      used.update(axes)
      spec.append(axes[0] if len(axes) == 1 else axes)
    else:
      spec.append(None)
  return PartitionSpec(*spec)


def tree_shardings(boxed_tree, mesh: Mesh, rules: Sequence[tuple[str, Any]] = AXIS_RULES):
  """NamedShardings for a tree whose leaves are `nn.LogicallyPartitioned` (abstract or real);
  unboxed leaves are replicated."""
  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return NamedSharding(mesh, mesh_spec(leaf.value.shape, leaf.names, mesh, rules))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree`'s leaves carrying the given shardings (what a restore
  places arrays by, and what AOT compiles against)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _batch_axis(path) -> int:
  return split_axis(getattr(path[-1], 'key', None))   # see saber_jax.batch


def global_batch(batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy batch -> global arrays, rows (and media shards) split over the
  batch axes ('data', 'fsdp') when they divide them, replicated otherwise. With several
  processes every one brings the same shapes (the batch plan gives them alike)."""
  if jax.process_count() > 1:
    shapes = [(jax.tree_util.keystr(p), np.shape(x)) for p, x in
              jax.tree_util.tree_leaves_with_path(batch)]
    signature = np.frombuffer(hashlib.sha256(repr(shapes).encode()).digest(), np.uint8)
    try:
      multihost_utils.assert_equal(signature)
    except AssertionError:
      raise ValueError(f'process {jax.process_index()} has batch shapes {shapes} unlike '
                       'another process: their batch plans differ (other seeds, data '
                       'configs or record files?)') from None

  def place(path, x):
    x = np.asarray(x)
    axis = _batch_axis(path)
    spec = [None] * x.ndim
    spec[axis] = mesh_spec((x.shape[axis] * jax.process_count(),), ('batch',), mesh)[0]
    return jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec(*spec)), x)
  return jax.tree_util.tree_map_with_path(place, batch)


def global_batch_shapes(batch_shapes: dict, mesh: Mesh) -> dict:
  """ShapeDtypeStructs with the shardings `global_batch` gives (for AOT compilation)."""
  def spec(path, x):
    axis = _batch_axis(path)
    s = [None] * len(x.shape)
    s[axis] = mesh_spec((x.shape[axis],), ('batch',), mesh)[0]
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, PartitionSpec(*s)))
  return jax.tree_util.tree_map_with_path(spec, batch_shapes)
