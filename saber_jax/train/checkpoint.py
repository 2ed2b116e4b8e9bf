"""Orbax checkpoints: train state and the Grain iterator state saved together, so a resumed
run continues with exactly the next batch.

Saves are asynchronous (the state is copied off the devices, then written in the
background) and atomic: a run killed mid-save leaves a temporary directory that restore
ignores, so the last complete checkpoint wins.
"""

import json
import os

import grain
import jax
import orbax.checkpoint as ocp

from saber_jax.models.config import ThinkerConfig


def manager(directory: str, *, keep: int, every_steps: int,
            async_save: bool = True) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(directory), item_names=('state', 'data'),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every_steps,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True))


def save(mngr: ocp.CheckpointManager, step: int, state, data_iterator=None, *,
         force: bool = False) -> bool:
  """Save at `step` when the manager's interval says so (or `force`)."""
  items = {'state': ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def restore(mngr: ocp.CheckpointManager, abstract_state, data_iterator=None,
            step: int | None = None):
  """The state of the latest (or given) complete checkpoint placed by the shardings of
  `abstract_state` (ShapeDtypeStructs with `.sharding`, so a different mesh or device
  count works), and the data iterator moved to its saved position; None if none exists."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None
  items = {'state': ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  return mngr.restore(step, args=ocp.args.Composite(**items))['state']


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree`'s leaves carrying the given shardings."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


CONFIG_FILE = 'thinker_config.json'


def save_params(path: str, params, model_config: ThinkerConfig):
  """The thinker params alone (LoRA merged) and their config, as the next stage's start
  and reference; `saber-convert-hf` exports them to Hugging Face format."""
  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(path, 'params'), params, force=True)
  if jax.process_index() == 0:
    with open(os.path.join(path, CONFIG_FILE), 'w') as f:
      json.dump(model_config.to_hf(), f, indent=2)


def params_config(path: str) -> ThinkerConfig:
  return ThinkerConfig.from_hf(os.path.join(path, CONFIG_FILE))


def load_params(path: str, abstract_params):
  """Params saved by `save_params`, placed by the shardings of `abstract_params`."""
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.join(os.path.abspath(path), 'params'), abstract_params)
