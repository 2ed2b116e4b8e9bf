"""Grain datasets: ArrayRecord shards of records -> this process's batches, step by step.

  size index (records.load_sizes) -> batch plan (data.plan) -> this process's slots ->
  read + decode + patch the frames (data.examples) -> batches -> collate (data.collate)

Process p reads and decodes only examples [p * batch_size, (p + 1) * batch_size) of each
global batch. All stages after the plan are Grain `MapDataset`s, so batch k is a pure
function of (seed, k): output does not depend on the number of worker processes, and the
iterator state (`get_state` / `set_state`, saved by Orbax through `grain.checkpoint`) is
just a position, so a resumed run continues with exactly the next global batch.
"""

from typing import Any, Sequence

from absl import flags
import grain
import jax

from saber_jax.data import records
from saber_jax.data.collate import collate
from saber_jax.data.examples import DataConfig, Example, RecordLoader, data_options
from saber_jax.data.plan import BatchPlan, batch_plan
from saber_jax.models.config import ThinkerConfig


def resolve_paths(paths: str | Sequence[str]) -> list[str]:
  if isinstance(paths, str):
    return records.shard_paths(paths)
  paths = list(paths)
  if not paths:
    raise ValueError('no record files given')
  return paths


def _process(shard_index, shard_count):
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index {shard_index} is not in [0, {shard_count})')
  return shard_index, shard_count


def steps_per_epoch(num_records: int, data_config: Any, shard_count: int | None = None) -> int:
  """Batches each process yields per epoch of a training pipeline over `num_records`."""
  options = data_options(data_config)
  shard_count = jax.process_count() if shard_count is None else shard_count
  return num_records // (options.batch_size * shard_count)


def _iter_dataset(batches: grain.MapDataset, options: DataConfig) -> grain.IterDataset:
  ds = batches.to_iter_dataset(grain.ReadOptions(num_threads=options.read_threads,
                                                 prefetch_buffer_size=options.prefetch))
  if options.worker_count > 0:
    # Grain 0.2.18 reads an absl flag when starting workers and fails in programs that do
    # not parse absl flags (google/grain#1355, fixed after 0.2.18): use the defaults then.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=options.worker_count, per_worker_buffer_size=options.worker_buffer_size))
  return ds


class _PlanSlot:
  """Position i of this process's slots -> (global step, record position or -1)."""

  def __init__(self, plan: BatchPlan, shard_index: int, batch_size: int):
    self.plan, self.first, self.batch_size = plan, shard_index * batch_size, batch_size

  def __call__(self, i: int, _) -> tuple[int, int]:
    step, slot = divmod(int(i), self.batch_size)
    return step, int(self.plan.examples(step)[self.first + slot])


class _Load:
  def __init__(self, loader: RecordLoader):
    self.loader = loader

  def __call__(self, slot: tuple[int, int]) -> tuple[int, Example | None]:
    step, index = slot
    return step, self.loader(index)


class _Collate:
  """A process's examples of one global step -> its batch, in the plan's shapes."""

  def __init__(self, plan: BatchPlan, **kwargs):
    self.plan, self.kwargs = plan, kwargs

  def __call__(self, slots: Sequence[tuple[int, Example | None]]) -> dict[str, Any]:
    step = slots[0][0]
    return collate([e for _, e in slots], shapes=self.plan.shapes(step), **self.kwargs)


def _dataset(model_config, data_config, paths, kind, *, seed, shard_index, shard_count,
             reference=False, damaged_log=None) -> grain.IterDataset:
  options = data_options(data_config)
  shard_index, shard_count = _process(shard_index, shard_count)
  paths = resolve_paths(paths)
  repeats = records.repeated_records(paths, tolerate_damaged=damaged_log is not None)
  if repeats and shard_index == 0:   # two different records of one id raised above
    print(f'[data] warning: {len(repeats)} records repeat earlier ones byte for byte (a shard '
          'given twice?); they are used as often as they appear', flush=True)
  loader = RecordLoader(paths, kind, model_config, options,
                        require_reference=kind == records.PREFERENCE and not reference,
                        damaged_log=damaged_log)
  plan = batch_plan(model_config, options, paths, kind, seed=seed, shard_count=shard_count,
                    reference=reference, damaged_log=damaged_log)
  if len(plan.needs['length']) != len(loader):
    raise records.RecordError(f'{paths}: the size indexes list {len(plan.needs["length"])} '
                              f'records, the shards hold {len(loader)}')
  # One slot per example of this process and step; a MapDataset, so slot k is a pure
  # function of (seed, k) and the iterator state is a position.
  b = options.batch_size
  slots = grain.MapDataset.range(plan.steps_per_epoch * b)
  slots = slots.repeat(1 if reference else options.num_epochs)
  batches = slots.map_with_index(_PlanSlot(plan, shard_index, b)).map(_Load(loader)).batch(
      b, drop_remainder=True,
      batch_fn=_Collate(plan, model_config=model_config, options=options,
                        preference=kind == records.PREFERENCE, reference=reference))
  return _iter_dataset(batches, options)


def sft_dataset(model_config: ThinkerConfig, data_config: Any, paths: str | Sequence[str], *,
                seed: int, shard_index: int | None = None,
                shard_count: int | None = None) -> grain.IterDataset:
  """SFT batches of SFT records (`paths`: shard files, or the prefix `records.shard_paths`
  expands). shard_index / shard_count default to this JAX process and the process count."""
  return _dataset(model_config, data_config, paths, records.SFT, seed=seed,
                  shard_index=shard_index, shard_count=shard_count)


def preference_dataset(model_config: ThinkerConfig, data_config: Any,
                       paths: str | Sequence[str], *, seed: int, shard_index: int | None = None,
                       shard_count: int | None = None) -> grain.IterDataset:
  """CA-DPO batches of preference records (pairs laid out as `data.collate` says) with
  their reference log-probs. Every pair kept must have them (a NaN raises RecordError
  naming the record)."""
  return _dataset(model_config, data_config, paths, records.PREFERENCE, seed=seed,
                  shard_index=shard_index, shard_count=shard_count)


def reference_batches(model_config: ThinkerConfig, data_config: Any,
                      paths: str | Sequence[str], *, shard_index: int | None = None,
                      shard_count: int | None = None,
                      damaged_log: str | None = None) -> grain.DatasetIterator:
  """The reference pass: every pair once, in size order (one epoch), the last batch padded
  so all processes take the same number of steps. `pair_index` [P] says which pair each
  is (-1: padding; a pair dropped as too long has example_mask False), for
  `records.fill_reference_logps(..., key='index')`. With `damaged_log`, a record that
  cannot be read or decoded is logged there and dropped instead of stopping the pass."""
  return iter(_dataset(model_config, data_config, paths, records.PREFERENCE, seed=0,
                       shard_index=shard_index, shard_count=shard_count, reference=True,
                       damaged_log=damaged_log))
