"""saber_jax.weights: the params directory a stage ends with reloads as the next stage's
start (with its config, onto a mesh, non-finite values refused), the run config's model
config and LoRA decision, and the initial params from each source."""

import os

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

from hf_reference import tiny_hf_config, tiny_hf_model
from saber_jax import files, sharding, weights
from saber_jax.models import ThinkerConfig, abstract_params, init_params
from saber_jax.train import config as config_lib


def test_final_params_reload_with_their_config(tmp_path):
  model_config = ThinkerConfig.from_hf(tiny_hf_config().to_dict())
  params = nn.unbox(init_params(model_config, jax.random.key(1)))
  weights.save_params(str(tmp_path / 'final'), params, model_config)
  config = weights.params_config(str(tmp_path / 'final'))
  assert config == model_config
  loaded = weights.load_params(str(tmp_path / 'final'), nn.unbox(abstract_params(config)))
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(got, want)


def test_nonfinite_saved_params_are_refused_naming_the_tensor(tmp_path):
  model_config = ThinkerConfig.from_hf(tiny_hf_config().to_dict())
  params = nn.unbox(init_params(model_config, jax.random.key(1)))
  kernel = params['text']['layers']['mlp']['up_proj']['kernel']
  params['text']['layers']['mlp']['up_proj']['kernel'] = kernel.at[1, 0, 0].set(jnp.nan)
  weights.save_params(str(tmp_path / 'final'), params, model_config)
  with pytest.raises(ValueError, match=r"text/layers/mlp/up_proj/kernel.*non-finite"):
    weights.load_params(str(tmp_path / 'final'), nn.unbox(abstract_params(model_config)))


def test_params_of_another_shape_name_the_tensor_both_shapes_and_the_directory(tmp_path):
  import orbax.checkpoint as ocp
  saved = {'audio': {'proj': {'kernel': np.zeros((4, 8), np.float32)}},
           'text': {'layers': {'mlp': {'down_proj': {'kernel': np.zeros((2, 16, 8), np.float32)},
                                       'up_proj': {'kernel': np.zeros((2, 8, 16), np.float32)}}}}}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(str(tmp_path / 'final' / 'params'), saved)
  shape = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.float32)
  wider = {'audio': {'proj': {'kernel': shape(4, 8)}},
           'text': {'layers': {'mlp': {'down_proj': {'kernel': shape(2, 24, 8)},
                                       'up_proj': {'kernel': shape(2, 8, 24)}}}}}
  with pytest.raises(weights.UserError) as error:
    weights.load_params(str(tmp_path / 'final'), wider)
  message = str(error.value)
  assert message.startswith(f"{tmp_path / 'final'}: param text/layers/mlp/down_proj/kernel is "
                            '[2, 16, 8] there, but the model config (config.model) has '
                            '[2, 24, 8]')
  assert 'strict' not in message
  extra = {**wider, 'vision': {'merger': {'kernel': shape(3, 3)}}}
  extra['text'] = saved['text']
  with pytest.raises(weights.UserError, match='param vision/merger/kernel is missing there, but '
                                              r'the model config \(config.model\) has \[3, 3\]'):
    weights.load_params(str(tmp_path / 'final'), extra)


def test_params_leaf_reader_reads_one_layer_at_a_time(tmp_path, monkeypatch):
  """save_params stores each layer stack one layer per chunk, no chunk above CHUNK_BYTES;
  the export's reader gives exactly the saved values layer by layer (a NaN named by param
  and layer), whole leaves through np.asarray, and still reads params saved before (one
  chunk per leaf)."""
  monkeypatch.setattr(weights, 'CHUNK_BYTES', 4096)   # several chunks per layer here
  model_config = ThinkerConfig.from_hf(tiny_hf_config().to_dict())
  params = jax.tree.map(np.asarray, nn.unbox(init_params(model_config, jax.random.key(1))))
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  kernel = params['text']['layers']['mlp']['up_proj']['kernel']
  kernel[1, 0, 0] = np.nan
  weights.save_params(str(tmp_path / 'final'), params, model_config)
  abstract = nn.unbox(abstract_params(model_config))
  with ocp.PyTreeCheckpointer() as checkpointer:
    saved = checkpointer.metadata(str(tmp_path / 'final' / 'params')).item_metadata.tree
  boxed = flax.traverse_util.flatten_dict(abstract_params(model_config), sep='/')
  for key, meta in flax.traverse_util.flatten_dict(saved, sep='/').items():
    stacked = boxed[key].names[0] == 'layers'
    chunk = meta.storage.chunk_shape
    assert np.prod(chunk) * 2 <= 4096 and (chunk[0] == 1 or not stacked), (key, chunk)
  embedding = saved['text']['embed_tokens']['embedding']       # read whole below
  assert np.prod(embedding.storage.chunk_shape) < np.prod(embedding.shape)

  leaf = weights.params_leaf_reader(str(tmp_path / 'final'), abstract)
  stack = leaf('text', 'layers/mlp/up_proj/kernel')
  assert isinstance(stack.data, ts.TensorStore) and stack.shape == kernel.shape
  got = stack[0]
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(got, kernel[0])
  with pytest.raises(ValueError, match=r'param text/layers/mlp/up_proj/kernel \(layer 1\) '
                                       r'holds non-finite'):
    stack[1]
  embedding = leaf('text', 'embed_tokens/embedding')
  np.testing.assert_array_equal(np.asarray(embedding), params['text']['embed_tokens']['embedding'])
  assert leaf('text', 'no/such/param') is None

  kernel[1, 0, 0] = 1.0                # saved whole, as save_params did before
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(str(tmp_path / 'old' / 'params'), params)
  stack = weights.params_leaf_reader(str(tmp_path / 'old'), abstract)(
      'text', 'layers/mlp/up_proj/kernel')
  for layer in range(kernel.shape[0]):
    np.testing.assert_array_equal(stack[layer], kernel[layer])
  assert isinstance(stack.data, np.ndarray)          # decoded once, not once per layer


def _run_config(tmp_path):
  tiny_hf_config().save_pretrained(tmp_path / 'model')
  c = config_lib.base_config()
  c.model.hf_config, c.model.dtype, c.model.remat = str(tmp_path / 'model' / 'config.json'), \
      'float32', 'none'
  return c


def test_run_config_names_the_model_and_whether_it_trains_lora(tmp_path):
  c = _run_config(tmp_path)
  model_config = weights.model_config_of(c)
  assert model_config.param_dtype == c.model.param_dtype and model_config.remat == 'none'
  assert model_config.text == ThinkerConfig.from_hf(c.model.hf_config).text
  c.trainable = 'full'
  assert weights.lora_config_of(c) is None
  c.trainable = 'lora'
  assert weights.lora_config_of(c) is c.lora


@pytest.mark.slow
def test_initial_params_from_saved_params_random_and_identity(tmp_path):
  c = _run_config(tmp_path)
  model_config = weights.model_config_of(c)
  mesh = sharding.make_mesh((1, 4, 2))
  random = weights.initial_params(c, model_config, mesh, None)
  kernel = random['text']['layers']['mlp']['up_proj']['kernel']
  assert len(kernel.sharding.device_set) == 8           # created on its sharding
  weights.save_params(str(tmp_path / 'final'), random, model_config)
  loaded = weights.initial_params(c, model_config, mesh, str(tmp_path / 'final'))
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(random)):
    assert got.sharding == want.sharding
    np.testing.assert_array_equal(got, want)
  identity = weights.weights_identity(c, str(tmp_path / 'final'))
  assert identity['model']['hf_config'] == c.model.hf_config
  assert {f['path'].rsplit('/', 1)[-1] for f in identity['init_from']} >= {weights.CONFIG_FILE}
  assert weights.weights_identity(c, None)['init_from'] is None


def test_hf_checkpoint_in_a_bucket_starts_a_stage_like_the_local_one(tmp_path, gcs):
  """`init_from=gs://...` naming an HF checkpoint: copied to a local temp dir (safetensors
  are memory-mapped), the same params and shardings as the local directory, an identity of
  its objects, and no local folder named `gs:`."""
  c = _run_config(tmp_path)
  tiny_hf_model().save_pretrained(tmp_path / 'hf')
  files.upload(str(tmp_path / 'hf'), 'gs://runs/hf')
  model_config = weights.model_config_of(c)
  mesh = sharding.make_mesh((1, 4, 2))
  local = weights.initial_params(c, model_config, mesh, str(tmp_path / 'hf'))
  remote = weights.initial_params(c, model_config, mesh, 'gs://runs/hf')
  for got, want in zip(jax.tree.leaves(remote), jax.tree.leaves(local), strict=True):
    assert got.sharding == want.sharding
    np.testing.assert_array_equal(got, want)
  identity = weights.weights_identity(c, 'gs://runs/hf')['init_from']
  assert {f['path'].rsplit('/', 1)[-1] for f in identity} >= {'model.safetensors', 'config.json'}
  assert not (tmp_path / 'gs:').exists() and not os.path.exists('gs:')
