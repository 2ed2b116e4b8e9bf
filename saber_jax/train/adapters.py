"""LoRA adapters on disk: the stage's own copy beside its merged params, and PEFT's format.

A LoRA stage's `final/` holds the merged params (what the next stage and `to-hf` read) and
`final/adapter/`: the LoRA tree (`train/lora.py` layout, Orbax) with `adapter.json` (rank,
alpha, targets, the base weights the run started from). `saber-convert-hf to-peft` writes it
as a PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`) that
`PeftModel.from_pretrained(Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(base),
adapter)` loads, and `--config.init_lora` reads a PEFT adapter back into a LoRA tree.

Layout change. Our kernel is [in, out] and the merge adds `(alpha / r) * a @ b`
(a [in, r], b [r, out]); PEFT adds `scaling * lora_B.weight @ lora_A.weight` to the torch
weight [out, in] with lora_A.weight [r, in], lora_B.weight [out, r] and scaling
`lora_alpha / r` (`lora_alpha / sqrt(r)` with `use_rslora`). So lora_A = a^T and
lora_B = b^T, one pair per layer, named after the module that carries the weight
(`base_model.model.<module>.lora_A.weight`, transformers 5's module tree).
"""

import math
import os
import tempfile

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from saber_jax import convert, files
from saber_jax.models import abstract_params
from saber_jax.models.config import ThinkerConfig
from saber_jax import weights
from saber_jax.train import lora as lora_lib

ADAPTER_DIR = 'adapter'            # inside a stage's final/
ADAPTER_FILE = 'adapter.json'
PEFT_CONFIG = 'adapter_config.json'
PEFT_WEIGHTS = 'adapter_model.safetensors'
PEFT_PREFIX = 'base_model.model.'
# Module paths of Qwen2_5OmniThinkerForConditionalGeneration in transformers 5, per tower.
MODULE_PREFIX = {'text': 'model.language_model.', 'audio': 'model.audio_tower.',
                 'vision': 'model.visual.'}


# --- the stage's own copy ---

def save_adapter(path: str, lora_params, *, rank: int, alpha: float, targets, base: str):
  """`lora_params` (global arrays, any sharding) and their settings under `path`."""
  path = files.absolute(path)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(path, 'lora'), lora_params, force=True)
  if jax.process_index() == 0:
    files.write_json(os.path.join(path, ADAPTER_FILE),
                     dict(rank=rank, alpha=alpha, targets=list(targets), base=base))


def _read_settings(path: str, missing: str) -> dict:
  """The JSON settings file of an adapter; FileNotFoundError(`missing`) where it is absent."""
  if not files.exists(path):
    raise FileNotFoundError(missing)
  return files.read_json(path)


def load_adapter(path: str, config: ThinkerConfig) -> tuple[dict, dict]:
  """(settings, LoRA tree in host memory) of an adapter written by `save_adapter`."""
  settings_path = os.path.join(path, ADAPTER_FILE)
  settings = _read_settings(settings_path, f'{settings_path} not found: {path} holds no LoRA '
                            'adapter (only stages trained with trainable=lora keep one)')
  abstract = jax.eval_shape(lambda: lora_lib.init_lora(
      jax.random.key(0), nn.unbox(abstract_params(config)), rank=settings['rank'],
      targets=tuple(settings['targets'])))
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.restore(os.path.join(files.absolute(path), 'lora'), abstract)
  return settings, jax.tree.map(np.asarray, tree)


# --- PEFT's format ---

def _module_template(tower: str, kernel_path: str) -> str:
  """('text', 'layers/self_attn/q_proj/kernel') ->
  'model.language_model.layers.{layer}.self_attn.q_proj'."""
  for pattern, path, _ in convert.TOWER_RULES[tower]:
    if path == kernel_path:
      template = convert._name_template(pattern).removesuffix('.weight')
      return template if template.startswith('lm_head') else MODULE_PREFIX[tower] + template
  raise ValueError(f'LoRA module {tower}/{kernel_path} has no checkpoint name')


def peft_tensors(lora_params) -> dict[str, np.ndarray]:
  """PEFT's tensors (name -> torch-layout array) of a LoRA tree, one pair per layer."""
  tensors = {}
  for names, factors in lora_lib._lora_modules(lora_params):
    template = _module_template(names[0], '/'.join(names[1:]) + '/kernel')
    a, b = np.asarray(factors['a'], np.float32), np.asarray(factors['b'], np.float32)
    for layer in range(a.shape[0]) if '{layer}' in template else [None]:
      module = PEFT_PREFIX + template.format(layer=layer)
      pick = (lambda x: x) if layer is None else (lambda x: x[layer])
      tensors[module + '.lora_A.weight'] = np.ascontiguousarray(pick(a).T)
      tensors[module + '.lora_B.weight'] = np.ascontiguousarray(pick(b).T)
  return tensors


def peft_config(*, rank: int, alpha: float, target_modules, base_model: str) -> dict:
  """`adapter_config.json`: plain LoRA, our scaling alpha / r (no rsLoRA)."""
  return dict(peft_type='LORA', r=rank, lora_alpha=alpha, use_rslora=False,
              target_modules=sorted(target_modules), base_model_name_or_path=base_model,
              bias='none', lora_dropout=0.0, fan_in_fan_out=False, init_lora_weights=True,
              modules_to_save=None, task_type=None, inference_mode=True,
              auto_mapping=dict(base_model_class='Qwen2_5OmniThinkerForConditionalGeneration',
                                parent_library='transformers'))


def save_peft(path: str, lora_params, *, rank: int, alpha: float, base_model: str):
  """Write a PEFT adapter directory; the target modules are the adapted modules' full names
  (PEFT matches a name or a suffix of it, so the full model's `thinker.` modules match too)."""
  if files.is_url(path):           # written locally, then uploaded file by file
    with tempfile.TemporaryDirectory(prefix='saber-peft-') as local:
      save_peft(local, lora_params, rank=rank, alpha=alpha, base_model=base_model)
      files.upload(local, path)
    return
  tensors = peft_tensors(lora_params)
  modules = {name.removeprefix(PEFT_PREFIX).rsplit('.lora_', 1)[0] for name in tensors}
  os.makedirs(path, exist_ok=True)
  convert.write_safetensors(os.path.join(path, PEFT_WEIGHTS), tensors)
  files.write_json(os.path.join(path, PEFT_CONFIG),
                   peft_config(rank=rank, alpha=alpha, target_modules=modules,
                               base_model=base_model))


def load_peft(path: str, abstract_lora, *, rank: int, alpha: float) -> dict:
  """The LoRA tree (float32, host memory) of the PEFT adapter in `path`, shaped like
  `abstract_lora` (`init_lora`'s tree for the run's targets). The adapter's rank and
  scaling must be the run's (`lora.rank`, `lora.alpha / lora.rank`), and its tensors exactly
  the run's target modules: anything else is an error naming the setting or tensor."""
  config_path = os.path.join(path, PEFT_CONFIG)
  settings = _read_settings(config_path, f'init_lora={path}: no {PEFT_CONFIG} (expected a PEFT '
                            'adapter directory)')
  unsupported = {k: settings.get(k) for k in ('use_dora', 'rank_pattern', 'alpha_pattern',
                                              'modules_to_save') if settings.get(k)}
  if settings.get('peft_type') != 'LORA' or settings.get('bias', 'none') != 'none':
    unsupported.update(peft_type=settings.get('peft_type'), bias=settings.get('bias'))
  if unsupported:
    raise ValueError(f'{config_path}: only plain LoRA adapters start a run; this one has '
                     f'{unsupported}')
  r, lora_alpha = settings['r'], settings['lora_alpha']
  scale = lora_alpha / (math.sqrt(r) if settings.get('use_rslora') else r)
  if r != rank or not math.isclose(scale, alpha / rank, rel_tol=1e-6):
    raise ValueError(f'{config_path}: r={r}, lora_alpha={lora_alpha}, use_rslora='
                     f'{settings.get("use_rslora", False)} (scaling {scale:g}) do not match '
                     f'the run: set --config.lora.rank={r} --config.lora.alpha={scale * r:g}')
  tensors = dict(convert.read_safetensors(os.path.join(path, PEFT_WEIGHTS)))
  leaves = {}                                  # (module path, factor) -> array being filled
  for names, factors in lora_lib._lora_modules(abstract_lora):
    for factor in ('a', 'b'):
      leaves[(names, factor)] = np.full(factors[factor].shape, np.nan, np.float32)
  by_kernel = {(names[0], '/'.join(names[1:]) + '/kernel'): names for names, _ in leaves}
  for name, array in tensors.items():
    module, _, kind = name.removeprefix(PEFT_PREFIX).rpartition('.lora_')
    factor = {'A.weight': 'a', 'B.weight': 'b'}.get(kind)
    routed = convert.route(module + '.weight') if factor else None
    try:
      kernel_path, layer, _ = convert.match_rule(convert.TOWER_RULES[routed[0]], routed[1])
      target = leaves[(by_kernel[(routed[0], kernel_path)], factor)]
    except (KeyError, TypeError):
      raise ValueError(f'{path}/{PEFT_WEIGHTS}: tensor {name!r} adapts no module the run '
                       f'targets (lora.targets)') from None
    value = np.asarray(array, np.float32).T
    place = target if layer is None else target[layer]
    if place.shape != value.shape:
      raise ValueError(f'{path}/{PEFT_WEIGHTS}: tensor {name!r} has shape {array.shape}; '
                       f'the run expects {place.shape[::-1]}')
    place[...] = value
  missing = ['/'.join(names) + '/' + factor for (names, factor), v in leaves.items()
             if np.isnan(v).any()]
  if missing:
    raise ValueError(f'{path}/{PEFT_WEIGHTS}: no (or not every layer of) {missing[:8]} for '
                     f'the run\'s targets; NaN or missing values')
  tree = {}
  for (names, factor), value in leaves.items():
    tree = lora_lib._set(tree, (*names, factor), value)
  return tree


def stage_adapter_to_peft(params_dir: str, out: str, base_model: str | None = None):
  """`saber-convert-hf to-peft`: the adapter kept in a LoRA stage's `final/` as PEFT files."""
  config = weights.params_config(params_dir)
  settings, tree = load_adapter(os.path.join(params_dir, ADAPTER_DIR), config)
  save_peft(out, tree, rank=settings['rank'], alpha=settings['alpha'],
            base_model=base_model or settings.get('base') or '')
