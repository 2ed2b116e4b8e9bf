"""Orbax checkpoints of the train state: restored onto another mesh and device count; a
damaged checkpoint is named and set aside; the data position saved by 2 processes restores
on 1. (The params directory: test_weights.py.)"""

import json
import os

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from hf_reference import tiny_hf_config
from saber_jax import sharding
from saber_jax.models import ThinkerConfig, abstract_params, init_params
from saber_jax.train import checkpoint, optim, steps
from train_batches import fresh_state


def _state(model_config, mesh):
  boxed = abstract_params(model_config)
  params = jax.device_put(nn.unbox(init_params(model_config, jax.random.key(0))),
                          sharding.tree_shardings(boxed, mesh))
  optimizer = optim.make_optimizer(ml_collections.ConfigDict(dict(total_steps=10)))
  trainable, frozen = steps.split_params(params, 'llm')
  boxed_trainable, boxed_frozen = steps.split_params(boxed, 'llm')
  state = fresh_state(trainable, frozen, optimizer)
  shardings = steps.TrainState(
      step=NamedSharding(mesh, PartitionSpec()),
      trainable=sharding.tree_shardings(boxed_trainable, mesh),
      frozen=sharding.tree_shardings(boxed_frozen, mesh),
      opt_state=sharding.tree_shardings(jax.eval_shape(optimizer.init, boxed_trainable), mesh))
  return state, shardings


def test_state_saved_on_one_device_restores_onto_eight(tmp_path):
  model_config = ThinkerConfig.from_hf(tiny_hf_config().to_dict())
  one = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  eight = sharding.make_mesh((2, 4, 1))
  state, _ = _state(model_config, one)
  state = state.replace(step=state.step + 7)
  mngr = checkpoint.manager(str(tmp_path), keep=2, every_steps=1)
  checkpoint.save(mngr, 7, state)
  mngr.wait_until_finished()
  target, shardings = _state(model_config, eight)
  restored = checkpoint.restore(mngr, sharding.abstract_like(target, shardings))
  mngr.close()
  assert int(restored.step) == 7
  kernel = restored.trainable['text']['layers']['mlp']['gate_proj']['kernel']
  assert len(kernel.sharding.device_set) == 8
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize('damaged_file', ['state/_METADATA',
                                          'state/manifest.ocdbt'])
def test_damaged_latest_checkpoint_is_named_and_the_newest_intact_one_restored(
    tmp_path, capsys, damaged_file):
  directory = tmp_path / 'checkpoints'
  mngr = checkpoint.manager(str(directory), keep=3, every_steps=1)
  for step in (1, 2):
    checkpoint.save(mngr, step, {'w': jnp.full((4,), float(step))})
  mngr.wait_until_finished()
  mngr.close()
  (directory / '2' / damaged_file).write_bytes(b'')
  mngr = checkpoint.manager(str(directory), keep=3, every_steps=1)
  abstract = {'w': jax.ShapeDtypeStruct((4,), jnp.float32,
                                         sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
  restored = checkpoint.restore(mngr, abstract)
  np.testing.assert_array_equal(restored['w'], np.full((4,), 1.0))
  assert f'checkpoint {directory / "2"} is damaged' in capsys.readouterr().err
  assert mngr.all_steps() == [1] and len(os.listdir(f'{directory}.damaged')) == 1
  # The run saves step 2 again where the damaged one was.
  checkpoint.save(mngr, 2, {'w': jnp.full((4,), 5.0)})
  mngr.wait_until_finished()
  np.testing.assert_array_equal(checkpoint.restore(mngr, abstract)['w'], np.full((4,), 5.0))
  mngr.close()


def test_every_checkpoint_damaged_raises_naming_the_latest(tmp_path):
  mngr = checkpoint.manager(str(tmp_path), keep=3, every_steps=1)
  checkpoint.save(mngr, 3, {'w': jnp.ones(2)})
  mngr.wait_until_finished()
  (tmp_path / '3' / 'state' / '_METADATA').write_text('{not json')
  abstract = {'w': jax.ShapeDtypeStruct((2,), jnp.float32,
                                         sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
  with pytest.raises(checkpoint.DamagedCheckpoint, match=f'checkpoint {tmp_path / "3"} is damaged'):
    checkpoint.restore(mngr, abstract)
  mngr.close()


def _batches():
  return iter(grain.MapDataset.range(40).batch(4).to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))


def test_data_position_of_two_processes_restores_on_one(tmp_path):
  """A global batch count saved by 2 processes (process_{0,1}-of-2.json) continues on 1."""
  for i in range(2):
    (tmp_path / f'process_{i}-of-2.json').write_text(json.dumps({'next_index': 3}))
  restored = checkpoint.DataPosition().restore(epath.Path(tmp_path), item=_batches())
  np.testing.assert_array_equal(next(restored), np.arange(12, 16))

  (tmp_path / 'process_1-of-2.json').write_text(json.dumps({'next_index': 2}))
  with pytest.raises(ValueError, match='not one global batch count'):
    checkpoint.DataPosition().restore(epath.Path(tmp_path), item=_batches())
