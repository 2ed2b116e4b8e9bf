"""Every field a run config has, with its default. The files in `configs/` start from
`base_config()` and override what they need; `--config.<field>=...` overrides on the
command line."""

import dataclasses

import ml_collections

from saber_jax.data import pipeline
from saber_jax.train import optim


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = 'sft'              # sft | ref_logps | dpo | pipeline | generate
  c.workdir = 'workdir'
  c.seed = 0
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

  c.optim = optim.default_config()
  c.optim.total_steps = 0     # 0: epochs x batches per epoch of the training data
  c.dpo = ml_collections.ConfigDict(dict(beta=0.1, label_smoothing=0.0, loss_type='sigmoid'))

  c.data = ml_collections.ConfigDict(dataclasses.asdict(pipeline.DataConfig()))
  c.data.num_epochs = 1
  c.sft_records = ''          # SFT ArrayRecord shards (files, or the shard prefix)
  c.pref_records = ''         # preference ArrayRecord shards

  # mode=generate: responses to the prompts of `records` (JSONL predictions in workdir);
  # num_samples 10 at temperature 0.8 gives the samples CA-DPO pairs are judged from.
  c.generate = ml_collections.ConfigDict(dict(
      records='', batch_size=8, max_new_tokens=512, temperature=0.0, top_p=1.0, top_k=0,
      num_samples=1, tokenizer=''))

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3))
  c.log_every = 10
  c.nonfinite = 'stop'        # stop | skip: what a non-finite loss or gradient does
  c.logps_chunk_size = 512    # sequence positions per chunk of the vocabulary projection
  return c


def sed_sft_config(model_name: str, trainable: str = 'full') -> ml_collections.ConfigDict:
  """The paper's SED fine-tuning: 2 epochs, batch 128 clips, lr 1e-4. On one host of 8
  GPUs: 16 clips per micro-step, 8 micro-steps per update, FSDP over every device."""
  c = base_config()
  c.mode = 'sft'
  c.workdir = f'workdir/sed_sft_{model_name}'
  c.model.name = model_name
  c.mesh = (1, -1, 1)
  c.trainable = trainable
  c.data.num_epochs = 2
  c.data.batch_size = 16            # per process; x grad_accum_steps x processes = 128
  c.optim.grad_accum_steps = 8
  c.optim.lr = 1e-4
  c.optim.warmup_ratio = 0.05
  return c


def ca_dpo_config(model_name: str, trainable: str = 'full') -> ml_collections.ConfigDict:
  """The paper's CA-DPO: 1 epoch, batch 64 pairs, lr 1e-5, sigmoid loss with beta 0.1,
  reference log-probs precomputed (mode=ref_logps) from the SED model."""
  c = base_config()
  c.mode = 'dpo'
  c.workdir = f'workdir/ca_dpo_{model_name}'
  c.model.name = model_name
  c.mesh = (1, -1, 1)
  c.trainable = trainable
  c.data.num_epochs = 1
  c.data.batch_size = 8             # pairs per process; x 8 micro-steps = 64
  c.optim.grad_accum_steps = 8
  c.optim.lr = 1e-5
  c.optim.warmup_ratio = 0.1
  c.optim.weight_decay = 0.0
  return c


# TPU slices the 7B configs are planned for (README, "TPU pods"): chips, and the rows each
# chip takes per micro-step at dry_run_seq_len tokens, from the dry runs.
TPU_SLICES = {
    'v5p': dict(topology='v5p-64', chips=32, rows_per_chip=1),
    'v6e': dict(topology='v6e-64', chips=64, rows_per_chip=1),
}
CHIPS_PER_HOST = 4


def on_tpu_slice(c: ml_collections.ConfigDict, name: str, examples_per_update: int):
  """`c` for a TPU slice of `TPU_SLICES`: FSDP over every chip, splash attention, one
  process per 4-chip host, and gradient accumulation up to the paper's batch."""
  if name not in TPU_SLICES:
    raise ValueError(f'unknown TPU slice {name!r}; expected one of {sorted(TPU_SLICES)}')
  tpu = TPU_SLICES[name]
  c.mesh = (1, -1, 1)
  c.model.attention = 'splash'
  c.data.batch_size = CHIPS_PER_HOST * tpu['rows_per_chip']     # per process (host)
  c.optim.grad_accum_steps = max(1, examples_per_update // (tpu['chips'] * tpu['rows_per_chip']))
  c.workdir += f'_{name}'
  return c

