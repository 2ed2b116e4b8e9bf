"""Orbax checkpoints: train state and the Grain iterator state saved together, so a resumed
run continues with exactly the next batch.

Saves are asynchronous (the state is copied off the devices, then written in the
background) and atomic: a run killed mid-save leaves a temporary directory that restore
ignores, so the last complete checkpoint wins.

The data position is Grain's iterator state, one JSON file per process (`DataPosition`).
With the thread-based reader (`data.worker_count=0`) it is a count of global batches, the
same on every process, so a checkpoint written by N processes restores on M.
"""

import dataclasses
import json
import os
import sys
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from saber_jax import files


def manager(directory: str, *, keep: int, every_steps: int,
            async_save: bool = True) -> ocp.CheckpointManager:
  """`directory` may be local or a URL (`gs://...`): Orbax writes objects there directly."""
  return ocp.CheckpointManager(
      files.absolute(directory), item_names=('state', 'data'),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every_steps,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True))


class DataPosition(grain.checkpoint.CheckpointHandler):
  """Grain's iterator checkpoint (`process_<i>-of-<n>.json`), restorable on another number
  of processes when every process saved the same global batch count."""

  def restore(self, directory, item=None, args=None):
    item = item or args.item
    index, count = jax.process_index(), jax.process_count()
    if (directory / f'process_{index}-of-{count}.json').exists():
      return super().restore(directory, item=item, args=args)
    saved = sorted(directory.glob('process_*-of-*.json'))
    states = [json.loads(path.read_text()) for path in saved]
    if not states or any(set(s) != {'next_index'} for s in states) or len(
        {s['next_index'] for s in states}) != 1:
      raise ValueError(
          f'{directory}: the data position was saved by other processes '
          f'({[p.name for p in saved]}: {states}) and is not one global batch count that '
          f'{count} processes can continue from (it is, with data.worker_count=0)')
    item.set_state(states[0])
    item.start_prefetch()
    return item


@ocp.args.register_with_handler(DataPosition, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataPosition, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  item: Any


def save(mngr: ocp.CheckpointManager, step: int, state, data_iterator=None, *,
         force: bool = False) -> bool:
  """Save at `step` when the manager's interval says so (or `force`)."""
  items = {'state': ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items['data'] = DataSave(data_iterator)
  return mngr.save(step, args=ocp.args.Composite(**items), force=force)


class DamagedCheckpoint(RuntimeError):
  """A checkpoint directory that exists but cannot be read back."""


def _restore_step(mngr, step: int, abstract_state, data_iterator):
  items = {'state': ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items['data'] = DataRestore(data_iterator)
  try:
    return mngr.restore(step, args=ocp.args.Composite(**items))['state']
  except Exception as e:  # Orbax and tensorstore raise many kinds for a damaged file
    raise DamagedCheckpoint(f'checkpoint {os.path.join(os.fspath(mngr.directory), str(step))} is '
                            f'damaged: {type(e).__name__}: {e}') from e


def restore(mngr: ocp.CheckpointManager, abstract_state, data_iterator=None,
            step: int | None = None):
  """The state of the latest (or given) complete checkpoint placed by the shardings of
  `abstract_state` (ShapeDtypeStructs with `.sharding`, so a different mesh or device
  count works), and the data iterator moved to its saved position; None if none exists.

  Without a given step, a checkpoint that cannot be read (an emptied or corrupted file)
  is named, moved to `<directory>.damaged/` (so the run can save that step again) and the
  next older one is tried; when none can be read the latest's error is raised.
  """
  if step is not None:
    return _restore_step(mngr, step, abstract_state, data_iterator)
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None
  damaged = []
  for step in steps:
    try:
      state = _restore_step(mngr, step, abstract_state, data_iterator)
    except DamagedCheckpoint as e:
      print(f'{e}; trying an older checkpoint', file=sys.stderr, flush=True)
      damaged.append((step, e))
      continue
    _set_aside(mngr, [s for s, _ in damaged])
    return state
  raise damaged[0][1]


def _set_aside(mngr: ocp.CheckpointManager, steps) -> None:
  if not steps:
    return
  aside = os.fspath(mngr.directory) + '.damaged'
  if jax.process_index() == 0:
    epath.Path(aside).mkdir(parents=True, exist_ok=True)
    for step in steps:
      target = os.path.join(aside, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
      epath.Path(os.fspath(mngr.directory)).joinpath(str(step)).rename(target)
      print(f'moved damaged checkpoint {step} to {target}', file=sys.stderr, flush=True)
  multihost_utils.sync_global_devices('damaged checkpoints set aside')
  mngr.reload()
