"""Compile a stage's train step for the configured mesh without materialising anything, and
read its per-device memory from XLA: does it fit the accelerator?

The example batch is the largest SABER clip: 30 s of video at 2 fps (40 frames at the
50176-pixel budget) with its audio interleaved, padded to `dry_run_seq_len` tokens.

With `dry_run_topology` (e.g. `v5p-64`) the step is compiled for that TPU slice from this
host, CPU or not: libtpu (`pip install 'saber_jax[tpu]'`) describes the slice's devices,
the config's mesh is laid over them, and the memory is set against the chip's HBM.
"""

import math
import re

import jax
import numpy as np

from saber_jax import batch as batch_lib
from saber_jax import sharding
from saber_jax.data.prompt import expand_placeholders
from saber_jax.models.config import ThinkerConfig
from saber_jax.models.thinker import model_inputs
from saber_jax.train import trainer

# Per TPU generation: HBM per chip in GiB (as Google's pages give it), torus dimensions, and
# what the number in a Cloud accelerator type counts (v4-N, v5p-N: TensorCores, 2 a chip).
TPUS = {
    'v4': dict(hbm_gib=32, dims=3, cores_in_name=2),
    'v5p': dict(hbm_gib=95, dims=3, cores_in_name=2),
    'v5e': dict(hbm_gib=16, dims=2, cores_in_name=1),
    'v6e': dict(hbm_gib=32, dims=2, cores_in_name=1),
}
ALIASES = {'v5litepod': 'v5e'}
MIN_CHIPS = 4                    # libtpu describes slices of whole 2x2 hosts

CLIP_SECONDS = 30
GRID = (20, 16, 16)                # 40 frames of 224 x 224 -> 20 x 16 x 16 patches


def example_inputs(model_config: ThinkerConfig, seq_len: int) -> dict:
  """One data shard's inputs: one row with the longest clip and its SED target."""
  mel_frames = CLIP_SECONDS * 100
  media = expand_placeholders(audio_lengths=[mel_frames], video_grids=[GRID],
                              video_second_per_grid=[1.0], use_audio_in_video=True)
  if len(media) >= seq_len:
    raise ValueError(f'dry_run_seq_len {seq_len} is shorter than the clip ({len(media)} tokens)')
  input_ids = np.full((1, seq_len), 100, np.int64)
  input_ids[0, 4:4 + len(media)] = media
  t, h, w = GRID
  v = model_config.vision
  batch = dict(
      input_ids=input_ids, attention_mask=np.ones_like(input_ids),
      input_features=np.zeros((1, model_config.audio.num_mel_bins, mel_frames), np.float32),
      feature_attention_mask=np.ones((1, mel_frames), np.int64),
      pixel_values_videos=np.zeros((t * h * w, v.patch_dim), np.float32),
      video_grid_thw=np.array([GRID]), video_second_per_grid=np.array([1.0]),
      use_audio_in_video=True)
  inputs = model_inputs(model_config, batch)
  labels = np.where(np.arange(seq_len) >= seq_len // 2, input_ids,
                    batch_lib.IGNORE_INDEX).astype(np.int32)
  return dict(inputs, labels=labels, segments=np.ones_like(labels))


def global_shapes(shard: dict, num_shards: int, rows_per_shard: int) -> dict:
  """ShapeDtypeStructs of a global batch made of `num_shards` copies of one shard."""
  def scale(path, x):
    x = np.asarray(x)
    key = getattr(path[0], 'key', None)
    # A dry-run shard holds one pair row: its per-pair keys scale with the shards too.
    per_shard = key in batch_lib.PER_SHARD_KEYS or key in batch_lib.PER_PAIR_KEYS
    factor = num_shards if per_shard else num_shards * rows_per_shard
    axis = batch_lib.split_axis(key)
    shape = list(x.shape)
    shape[axis] *= factor
    return jax.ShapeDtypeStruct(tuple(shape), x.dtype)
  return jax.tree_util.tree_map_with_path(scale, shard)


def libtpu_topology(name: str) -> tuple[str, int]:
  """A TPU slice by its Cloud accelerator type (`v5p-64`, `v6e-16`, `v5litepod-16`) or in
  libtpu's own form (`v5p:2x4x4`) -> (libtpu's name, number of chips)."""
  match = re.fullmatch(r'(v\w+?)(?:-(\d+)|:(\d+(?:x\d+)+))', name.strip())
  generation = match and ALIASES.get(match[1], match[1])
  if not match or generation not in TPUS:
    raise ValueError(f'unknown TPU topology {name!r}: expected e.g. v5p-64, v6e-16 or '
                     f'v5p:2x4x4, with one of {sorted(TPUS)}')
  tpu = TPUS[generation]
  if match[3]:
    return f'{generation}:{match[3]}', math.prod(int(d) for d in match[3].split('x'))
  count = int(match[2])
  chips = count // tpu['cores_in_name']
  if count % tpu['cores_in_name'] or chips < MIN_CHIPS or chips & (chips - 1):
    raise ValueError(f'TPU topology {name!r}: {count} is not {tpu["cores_in_name"]} x a power '
                     f'of two of at least {MIN_CHIPS} chips; give the shape, e.g. '
                     f'{generation}:{"x".join(["2"] * tpu["dims"])}')
  dims = [1] * tpu['dims']
  for _ in range(chips.bit_length() - 1):     # the most even torus: double the smallest side
    dims[dims.index(min(dims))] *= 2
  return f'{generation}:{"x".join(map(str, dims))}', chips


def tpu_devices(name: str) -> tuple[list, float]:
  """The devices of a TPU slice (compile-only, from libtpu) and the HBM of each in GiB."""
  libtpu_name, chips = libtpu_topology(name)
  try:
    from jax.experimental import topologies
    devices = topologies.get_topology_desc(platform='tpu', topology_name=libtpu_name).devices
  except Exception as e:           # no libtpu, or a shape libtpu rejects
    raise ValueError(f'TPU topology {name!r} ({libtpu_name}): libtpu could not describe it '
                     f"(is it installed? pip install 'saber_jax[tpu]'): {e}") from None
  hbm = TPUS[libtpu_name.split(':')[0]]['hbm_gib']
  return list(devices), hbm * chips / len(devices)     # v4 shows 2 devices per chip


def dry_run(config, stage: str = 'sft') -> float:
  """Lower and compile the step on the configured mesh (of this host's devices, or of the
  TPU slice `dry_run_topology`); returns and prints the per-device memory in GiB
  (arguments + outputs + temporaries, donated buffers counted once)."""
  topology = config.get('dry_run_topology', '')
  config = config.copy_and_resolve_references()
  if not config.optim.total_steps:        # no data to count steps from; memory is the same
    config.optim.total_steps = 100
  if topology:
    devices, hbm_gib = tpu_devices(topology)
    try:
      mesh = sharding.make_mesh(config.mesh, devices)
    except ValueError as e:
      raise ValueError(f'TPU topology {topology!r} has {len(devices)} devices: {e}') from None
    if config.model.attention == 'auto':  # what 'auto' picks on TPUs
      config.model.attention = 'splash'
  else:
    mesh = sharding.make_mesh(config.mesh)
  setup = trainer.plan(config, stage, mesh)
  num_shards = mesh.shape['data'] * mesh.shape['fsdp']
  shard = example_inputs(setup.model_config, config.dry_run_seq_len)
  if stage == 'dpo':
    # One pair row [prompt | chosen | rejected]: answers in the last two quarters.
    quarter = np.arange(config.dry_run_seq_len) * 4 // config.dry_run_seq_len
    shard = dict(shard, ref_chosen_logps=np.zeros(1, np.float32),
                 ref_rejected_logps=np.zeros(1, np.float32),
                 pair_segments=np.maximum(quarter, 1)[None].astype(np.int32))
  shapes = sharding.global_batch_shapes(global_shapes(shard, num_shards, 1), mesh)
  compiled = setup.step_fn.lower(setup.abstract_state, shapes).compile()
  memory = compiled.memory_analysis()
  used = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  gib = used / 2**30
  print(f'[dry run] {stage} trainable={config.trainable} mesh={dict(mesh.shape)} '
        f'seq_len={config.dry_run_seq_len}: arguments {memory.argument_size_in_bytes / 2**30:.2f}'
        f' GiB, temporaries {memory.temp_size_in_bytes / 2**30:.2f} GiB')
  print(f'per_device_memory_gib={gib:.2f}', flush=True)
  if topology:
    print(f'[dry run] {topology}: {len(mesh.devices.flat)} x {mesh.devices.flat[0].device_kind}, '
          f'{gib:.2f} of {hbm_gib:.0f} GiB HBM per device: '
          f'{"fits" if gib <= hbm_gib else "does NOT fit"}', flush=True)
  return gib
