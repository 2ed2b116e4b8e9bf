"""Every field a run config has, with its default, the paper's two recipes and the checks
run at start-up. The files in `configs/` start from `base_config()` (the families
`sed_sft.py` / `ca_dpo.py` from `paper_config`, their argument the variant) and override
what they need; `--config.<field>=...` overrides on the command line. Value sets are read
from the modules that use them, so a new attention kernel or loss is valid here at once."""

import copy
import dataclasses
import difflib
import importlib.util

import ml_collections
import numpy as np

from saber_jax import files, losses
from saber_jax.data import examples
from saber_jax.errors import UserError
from saber_jax.models.config import ThinkerConfig
from saber_jax.models import layers
from saber_jax.train import optim, steps

MODES = ('sft', 'ref_logps', 'dpo', 'pipeline', 'generate')
NONFINITE = ('stop', 'skip')     # what a non-finite loss or gradient does (train/trainer.py)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = 'sft'              # sft | ref_logps | dpo | pipeline | generate
  c.workdir = 'workdir'
  c.seed = 0
  c.overwrite = False         # True: a workdir stage made by other inputs/settings starts fresh
  c.compilation_cache = '~/.cache/saber_jax/xla'   # persistent XLA cache; '' to disable
  c.dry_run = False           # compile the step on the mesh and report per-device memory
  c.dry_run_seq_len = 4096
  c.dry_run_topology = ''     # compile for a TPU slice instead (v5p-64, v6e-16, v5p:2x4x4)

  c.model = ml_collections.ConfigDict(dict(
      name='qwen2_5_omni_7b',   # a ThinkerConfig factory, or
      hf_config='',             # a transformers config.json (or its directory)
      dtype='bfloat16', param_dtype='float32', remat='full',
      attention='auto'))        # decoder attention: xla, cudnn, splash; auto: cudnn on GPUs,
                                # splash on TPUs, else xla
  # Where the weights come from: an HF checkpoint directory, a saved-params directory of a
  # previous stage, or '' for random init.
  c.init_from = ''

  c.mesh = (-1, 1, 1)         # (data, fsdp, tensor); one -1 takes the remaining devices
  c.distributed = ml_collections.ConfigDict(dict(
      initialize='auto',        # auto (SLURM / coordinator env), always, never
      coordinator_address='', num_processes=0, process_id=-1))

  c.trainable = 'full'        # full | llm (towers frozen) | lora
  c.lora = ml_collections.ConfigDict(dict(
      rank=8, alpha=32.0, targets=(r'^text/.*(q_proj|k_proj|v_proj|o_proj)/kernel$',
                                   r'^text/.*(gate_proj|up_proj|down_proj)/kernel$')))
  c.init_lora = ''             # a PEFT adapter directory a LoRA stage starts from

  c.optim = optim.default_config()
  c.optim.total_steps = 0     # 0: epochs x batches per epoch of the training data
  # loss_type: sigmoid (Eq. 3) | sigmoid_norm | ipo | hinge | robust (losses.ca_dpo_loss);
  # sft_weight alpha adds alpha * NLL(chosen) (ms-swift's rpo_alpha, TRL's 'sft' loss).
  c.dpo = ml_collections.ConfigDict(dict(beta=0.1, label_smoothing=0.0, loss_type='sigmoid',
                                         sft_weight=0.0))

  c.data = ml_collections.ConfigDict(dataclasses.asdict(examples.DataConfig()))
  c.data.num_epochs = 1
  c.sft_records = ''          # SFT ArrayRecord shards (files, or the shard prefix)
  c.pref_records = ''         # preference ArrayRecord shards

  # mode=generate: responses to the prompts of `records` (JSONL predictions in workdir);
  # num_samples 10 at temperature 0.8 gives the samples CA-DPO pairs are judged from.
  # batch_size: prompts per process and batch; window_batches: prompts are sorted by size
  # within windows of this many batches (saber_jax/generate.py). max_new_tokens must cover
  # the SFT answers (a cut sample is never a chosen answer): 1024 is 1.7x the 600-token
  # answers planned for; the generate stage warns when the records' answers are longer.
  # upload_every: with a gs:// workdir each process uploads its new lines every this many
  # batches (and when it stops): what a SIGKILL can lose, against one object per upload.
  c.generate = ml_collections.ConfigDict(dict(
      records='', batch_size=8, max_new_tokens=1024, temperature=0.0, top_p=1.0, top_k=0,
      num_samples=1, tokenizer='', window_batches=32, upload_every=10))

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3))
  c.log_every = 10
  # Weights & Biases beside TensorBoard (the `wandb` extra): off while project is ''.
  # mode: '' (wandb's default / WANDB_MODE), 'online', 'offline' or 'disabled'.
  c.wandb = ml_collections.ConfigDict(dict(project='', entity='', name='', mode=''))
  c.nonfinite = 'stop'        # stop | skip: what a non-finite loss or gradient does
  c.logps_chunk_size = 512    # sequence positions per chunk of the vocabulary projection

  # Operating a long run (README, "Running for days"). eval: held-out metrics every
  # `every_steps` steps (0: off) and at the end, on the first `max_batches` batches of
  # `sft_records` (the sft stage) / `pref_records` (dpo), logged as eval/... . profile:
  # (first step, number of steps) to trace with jax.profiler into workdir/tensorboard/<stage>.
  c.eval = ml_collections.ConfigDict(dict(sft_records='', pref_records='', every_steps=0,
                                          max_batches=4))
  c.profile = (0, 0)
  return c


def with_overrides(config, overrides) -> ml_collections.ConfigDict:
  """A copy of `config` with the fields of the nested `overrides` (a dict or ConfigDict)
  replaced."""
  config = copy.deepcopy(config)

  def merge(node, changes):
    for key, value in changes.items():
      if hasattr(value, 'items'):
        merge(node[key], value)
      else:
        node[key] = value
  merge(config, overrides)
  return config


# ----------------------------------------------------------------------------- paper recipes

# The paper's two recipes, what each changes in `base_config()`. The batch is per process on
# one host of 8 GPUs (FSDP over every device); x grad_accum_steps it is the paper's batch.
RECIPES = {
    # SED fine-tuning: 2 epochs, batch 128 clips (16 x 8), lr 1e-4, warmup 5 %.
    'sed_sft': dict(mode='sft', data=dict(num_epochs=2, batch_size=16),
                    optim=dict(grad_accum_steps=8, lr=1e-4, warmup_ratio=0.05)),
    # CA-DPO: 1 epoch, batch 64 pairs (8 x 8), lr 1e-5, sigmoid loss with beta 0.1, the
    # reference log-probs precomputed (mode=ref_logps) from the SED model.
    'ca_dpo': dict(mode='dpo', data=dict(num_epochs=1, batch_size=8),
                   optim=dict(grad_accum_steps=8, lr=1e-5, warmup_ratio=0.1,
                              weight_decay=0.0),
                   dpo=dict(loss_type='sigmoid', beta=0.1)),
}
MODEL_SIZES = {'3b': 'qwen2_5_omni_3b', '7b': 'qwen2_5_omni_7b'}
# TPU slices the paper configs are planned for (README, "TPU pods"): chips, and the rows each
# chip takes per micro-step at dry_run_seq_len tokens, from the 7B dry runs.
TPU_SLICES = {
    'v5p': dict(topology='v5p-64', chips=32, rows_per_chip=1),
    'v6e': dict(topology='v6e-64', chips=64, rows_per_chip=1),
}
CHIPS_PER_HOST = 4
# A family config's argument: one word of each kind at most, in any order.
VARIANT_WORDS = {'model size': tuple(MODEL_SIZES), 'trainable mode': steps.TRAINABLE_MODES,
                 'TPU slice': tuple(TPU_SLICES)}
VARIANT_DEFAULTS = {'model size': '7b', 'trainable mode': 'full', 'TPU slice': None}


def variant(arg: str | None) -> dict[str, str | None]:
  """{kind: word} of a family config's argument ('7b,lora,v5p', 'lora', None), each kind
  of VARIANT_WORDS at its default when the argument names none."""
  words = [w.strip() for w in (arg or '').split(',') if w.strip()]
  picked = dict(VARIANT_DEFAULTS)
  seen = set()
  for word in words:
    kind = next((k for k, valid in VARIANT_WORDS.items() if word in valid), None)
    if kind is None:
      valid = '; '.join(f'{k}: {", ".join(v)}' for k, v in VARIANT_WORDS.items())
      raise ValueError(f'unknown config argument {word!r} in {arg!r}: expected comma-joined '
                       f'words of ({valid})')
    if kind in seen:
      raise ValueError(f'config argument {arg!r} names two of {kind} '
                       f'({", ".join(VARIANT_WORDS[kind])})')
    seen.add(kind)
    picked[kind] = word
  return picked


def paper_config(recipe: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The paper's `recipe` (a key of RECIPES) for the variant `arg` names (see `variant`):
  the model size, the trainable mode and, with a TPU slice, that slice's layout."""
  v = variant(arg)
  model_name = MODEL_SIZES[v['model size']]
  c = with_overrides(base_config(), RECIPES[recipe])
  c.workdir = f'workdir/{recipe}_{model_name}'
  c.model.name = model_name
  c.mesh = (1, -1, 1)
  c.trainable = v['trainable mode']
  if v['TPU slice']:
    on_tpu_slice(c, v['TPU slice'])
  return c


def on_tpu_slice(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """`c` (a one-host GPU recipe) for a TPU slice of `TPU_SLICES`: FSDP over every chip,
  splash attention, one process per 4-chip host, and gradient accumulation up to the
  recipe's batch."""
  if name not in TPU_SLICES:
    raise ValueError(f'unknown TPU slice {name!r}; expected one of {sorted(TPU_SLICES)}')
  tpu = TPU_SLICES[name]
  examples_per_update = c.data.batch_size * c.optim.grad_accum_steps
  c.mesh = (1, -1, 1)
  c.model.attention = 'splash'
  c.data.batch_size = CHIPS_PER_HOST * tpu['rows_per_chip']     # per process (host)
  c.optim.grad_accum_steps = max(1, examples_per_update // (tpu['chips'] * tpu['rows_per_chip']))
  c.workdir += f'_{name}'
  return c


# ----------------------------------------------------------------------------- validation


def field_names(config, prefix: str = '') -> list[str]:
  """Every dotted field of `config`, sections included ('optim', 'optim.lr', ...)."""
  names = []
  for key, value in config.items():
    name = f'{prefix}{key}'
    names.append(name)
    if isinstance(value, ml_collections.ConfigDict):
      names += field_names(value, name + '.')
  return names


def unknown_field(config, name: str) -> str | None:
  """None when `name` (dotted) is a field of `config`, else an error naming the nearest
  valid field."""
  names = field_names(config)
  if name in names:
    return None
  close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
  hint = f'; did you mean config.{close[0]}?' if close else ''
  return f'config.{name} is not a config field{hint}'


def check_overrides(argv: list[str], default_file: str) -> None:
  """Fails fast, naming the nearest valid field, on a `--config.<field>=` override whose
  field the `--config=<file>[:arg]` config does not have."""
  files = [a[len('--config='):] for a in argv if a.startswith('--config=')]
  overrides = [a[len('--config.'):].split('=', 1)[0] for a in argv if a.startswith('--config.')]
  if not overrides:
    return
  path, _, arg = (files[-1] if files else default_file).partition(':')
  spec = importlib.util.spec_from_file_location('_run_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  errors = [e for e in map(lambda name: unknown_field(config, name), overrides) if e]
  if errors:
    raise SystemExit('\n'.join(errors))


def _either(values) -> str:
  """'a', 'b' or 'c'."""
  quoted = [repr(v) for v in values]
  return ', '.join(quoted[:-1]) + ' or ' + quoted[-1] if len(quoted) > 1 else quoted[0]


# Modes that write records in the workdir (ArrayRecord needs a POSIX file): local or
# gcsfuse, not gs://.
LOCAL_WORKDIR_MODES = ('ref_logps', 'pipeline')


def validate(config) -> None:
  """Raises ValueError naming every field whose value makes no sense, before any work."""
  problems = []

  def need(ok: bool, field: str, expected: str):
    if not ok:
      value = config
      for key in field.split('.'):
        value = value.get(key) if isinstance(value, ml_collections.ConfigDict) else None
      problems.append(f'config.{field} = {value!r}: expected {expected}')

  def dtype_name(name):
    try:
      return np.dtype(name).kind == 'f' or name == 'bfloat16'
    except TypeError:
      return name == 'bfloat16'

  o, d, g = config.optim, config.data, config.generate
  need(config.mode in MODES, 'mode', f'one of {list(MODES)}')
  need(config.trainable in steps.TRAINABLE_MODES, 'trainable',
       f'one of {list(steps.TRAINABLE_MODES)}')
  need(config.nonfinite in NONFINITE, 'nonfinite', _either(NONFINITE))
  need(isinstance(config.seed, int), 'seed', 'an integer')
  need(config.model.remat in layers.REMAT_POLICIES, 'model.remat',
       _either(layers.REMAT_POLICIES))
  attention = ('auto',) + layers.ATTENTION_IMPLEMENTATIONS
  need(config.model.attention in attention, 'model.attention', _either(attention))
  for field in ('dtype', 'param_dtype'):
    need(dtype_name(config.model[field]), f'model.{field}', 'a float dtype name')
  mesh = tuple(config.mesh)
  need(len(mesh) == 3 and all(isinstance(n, int) and (n >= 1 or n == -1) for n in mesh)
       and mesh.count(-1) <= 1, 'mesh', '(data, fsdp, tensor) sizes >= 1, at most one -1')
  need(o.lr > 0, 'optim.lr', '> 0')
  need(o.total_steps >= 0, 'optim.total_steps', '>= 0 (0: from the data)')
  need(o.warmup_steps >= 0, 'optim.warmup_steps', '>= 0')
  need(not o.total_steps or o.warmup_steps < o.total_steps, 'optim.warmup_steps',
       f'< optim.total_steps ({o.total_steps}): the run would end before warm-up does')
  need(0 <= o.warmup_ratio < 1, 'optim.warmup_ratio', 'in [0, 1)')
  need(not (o.warmup_steps and o.warmup_ratio), 'optim.warmup_steps',
       'unset when optim.warmup_ratio is set (one of the two)')
  need(0 <= o.min_lr_ratio <= 1, 'optim.min_lr_ratio', 'in [0, 1]')
  need(o.weight_decay >= 0, 'optim.weight_decay', '>= 0')
  need(0 <= o.b1 < 1, 'optim.b1', 'in [0, 1)')
  need(0 <= o.b2 < 1, 'optim.b2', 'in [0, 1)')
  need(o.eps > 0, 'optim.eps', '> 0')
  need(o.grad_clip_norm is None or o.grad_clip_norm >= 0, 'optim.grad_clip_norm',
       '>= 0 (0 or None: off)')
  need(isinstance(o.grad_accum_steps, int) and o.grad_accum_steps >= 1,
       'optim.grad_accum_steps', 'an integer >= 1')
  need(config.lora.rank >= 1, 'lora.rank', '>= 1')
  need(config.lora.alpha > 0, 'lora.alpha', '> 0')
  need(len(tuple(config.lora.targets)) >= 1, 'lora.targets', 'at least one kernel regex')
  need(config.model.get('hf_config') or callable(getattr(ThinkerConfig, config.model.name, None)),
       'model.name', "a ThinkerConfig factory ('qwen2_5_omni_7b', 'qwen2_5_omni_3b', 'tiny') "
       'or model.hf_config set')
  need(not config.get('init_lora') or config.trainable == 'lora', 'init_lora',
       "'' unless trainable='lora' (a PEFT adapter starts a LoRA stage)")
  need(config.dpo.beta > 0, 'dpo.beta', '> 0')
  need(0 <= config.dpo.label_smoothing < 0.5, 'dpo.label_smoothing', 'in [0, 0.5)')
  need(config.dpo.get('sft_weight', 0.0) >= 0, 'dpo.sft_weight', '>= 0')
  need(config.dpo.loss_type in losses.DPO_LOSS_TYPES, 'dpo.loss_type',
       f'one of {list(losses.DPO_LOSS_TYPES)}')
  need(not (files.is_url(config.workdir) and config.mode in LOCAL_WORKDIR_MODES
           and not config.dry_run), 'workdir',
       f'a local directory or a gcsfuse mount of the bucket for mode={config.mode!r}, which '
       'writes ArrayRecord files there (mode sft, dpo and generate take a gs:// workdir)')
  need(d.batch_size >= 1, 'data.batch_size', '>= 1')
  need(d.num_data_shards >= 1 and d.batch_size % d.num_data_shards == 0, 'data.num_data_shards',
       f'>= 1 and a divisor of data.batch_size ({d.batch_size})')
  need(isinstance(d.shuffle, bool), 'data.shuffle', 'True or False')
  need(d.num_epochs is None or d.num_epochs >= 1, 'data.num_epochs', 'None (repeat) or >= 1')
  buckets = tuple(d.length_buckets)
  need(len(buckets) > 0 and all(b > 0 for b in buckets) and list(buckets) == sorted(set(buckets)),
       'data.length_buckets', 'increasing positive lengths')
  need(0 <= d.max_dropped_fraction <= 1, 'data.max_dropped_fraction', 'in [0, 1]')
  need(d.overlong in examples.OVERLONG_MODES, 'data.overlong', _either(examples.OVERLONG_MODES))
  for field in ('worker_count', 'group_batches', 'min_audio_chunks', 'min_patches',
                'min_vision_blocks', 'min_frame_len'):
    need(d[field] >= 0, f'data.{field}', '>= 0')
  for field in ('bucket_steps', 'read_threads', 'prefetch', 'worker_buffer_size'):
    need(d[field] >= 1, f'data.{field}', '>= 1')
  need(config.checkpoint.every_steps >= 1, 'checkpoint.every_steps', '>= 1')
  need(config.checkpoint.keep >= 1, 'checkpoint.keep', '>= 1')
  need(config.log_every >= 1, 'log_every', '>= 1')
  need(config.wandb.mode in ('', 'online', 'offline', 'disabled'), 'wandb.mode',
       "'', 'online', 'offline' or 'disabled'")
  need(config.logps_chunk_size >= 1, 'logps_chunk_size', '>= 1')
  need(config.dry_run_seq_len >= 1, 'dry_run_seq_len', '>= 1')
  need(config.eval.every_steps >= 0, 'eval.every_steps', '>= 0 (0: off)')
  need(config.eval.max_batches >= 1, 'eval.max_batches', '>= 1')
  profile = tuple(config.profile)
  need(len(profile) == 2 and all(isinstance(n, int) and n >= 0 for n in profile), 'profile',
       '(first step, number of steps), integers >= 0')
  need(g.batch_size >= 1, 'generate.batch_size', '>= 1')
  need(g.max_new_tokens >= 1, 'generate.max_new_tokens', '>= 1')
  need(g.temperature >= 0, 'generate.temperature', '>= 0 (0: greedy)')
  need(0 < g.top_p <= 1, 'generate.top_p', 'in (0, 1]')
  need(g.top_k >= 0, 'generate.top_k', '>= 0 (0: off)')
  need(g.num_samples >= 1, 'generate.num_samples', '>= 1')
  need(g.window_batches >= 1, 'generate.window_batches', '>= 1')
  need(g.upload_every >= 1, 'generate.upload_every', '>= 1')
  if problems:
    raise UserError('invalid config:\n  ' + '\n  '.join(problems))
