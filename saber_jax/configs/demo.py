"""The whole two-stage pipeline on a tiny model and generated clips, on a laptop CPU:
demo data -> records -> SED fine-tuning -> offline preference pairs -> reference
log-probs -> CA-DPO. No downloads, a few minutes.

  python -m saber_jax.main --config=configs/demo.py

With a stage as its argument (sft, ref_logps, dpo or generate) it is that stage alone, with
the settings the pipeline runs it with (`c.pipeline.<settings>` below, the one definition)
and the demo workdir's records and weights filled in, to rerun one stage by hand after
the pipeline (the same fingerprint: a finished stage is found finished, an interrupted one
resumes). `generate` answers the SFT records' prompts with the CA-DPO model.

  python -m saber_jax.main --config=configs/demo.py:dpo --config.overwrite=True
"""

import ml_collections

from saber_jax.train.config import base_config, with_overrides

# Each stage alone: which of c.pipeline's settings it runs with (the pipeline's reference
# pass runs with the CA-DPO settings; generation with the shared ones), and the workdir
# paths of its inputs.
STAGES = {
    'sft': dict(settings='sft', records=('sft_records', 'data/sft/sft'), init_from=None),
    'ref_logps': dict(settings='dpo', records=('pref_records', 'data/pref/pref'),
                      init_from='sft/final'),
    'dpo': dict(settings='dpo', records=('pref_records', 'ref_logps/pref'),
                init_from='sft/final'),
    'generate': dict(settings=None, records=('generate.records', 'data/sft/sft'),
                     init_from='dpo/final'),
}


def pipeline_config() -> ml_collections.ConfigDict:
  c = base_config()
  c.mode = 'pipeline'
  c.workdir = 'workdir/demo'
  c.model.name = 'tiny'
  c.model.dtype = 'float32'
  c.model.remat = 'none'
  c.mesh = (-1, 1, 1)
  c.data.batch_size = 4
  # One shape per stage, so each compiles once: the demo clips fit these sizes.
  c.data.length_buckets = (512,)
  c.data.min_audio_chunks = 16
  c.data.min_patches = 3072
  c.data.min_vision_blocks = 128
  c.data.min_frame_len = 128
  c.data.num_epochs = None            # repeat; the steps below bound each stage
  c.checkpoint.every_steps = 20
  c.log_every = 4
  c.logps_chunk_size = 128
  c.optim.weight_decay = 0.0
  c.generate.max_new_tokens = 256     # the demo's SED answers: 134-160 tokens; 1.6x margin
  c.generate.batch_size = 1
  c.pipeline = ml_collections.ConfigDict(dict(
      num_clips=32,
      eval_clips=8,           # held out: the eval sets of both stages (2 batches each)
      # Each stage's changes to the fields above.
      sft=dict(optim=dict(lr=3e-3, total_steps=40, warmup_steps=4), eval=dict(every_steps=8)),
      dpo=dict(optim=dict(lr=1e-4, total_steps=16, warmup_steps=2), eval=dict(every_steps=4))))
  c.eval.max_batches = 2
  return c


def stage_config(c: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
  """`stage` of the pipeline config `c` alone; its paths follow `--config.workdir`."""
  if stage not in STAGES:
    raise ValueError(f'unknown config argument {stage!r}: configs/demo.py takes no argument '
                     f'(the whole pipeline) or one stage of {", ".join(STAGES)}')
  spec = STAGES[stage]
  if spec['settings']:
    c = with_overrides(c, c.pipeline[spec['settings']])
  del c.pipeline
  c.mode = stage
  workdir = c.get_ref('workdir')
  field, path = spec['records']
  section, _, key = field.rpartition('.')
  (c[section] if section else c)[key] = workdir + f'/{path}'
  c.init_from = workdir + f'/{spec["init_from"]}' if spec['init_from'] else c.init_from
  return c


def get_config(arg=None):
  c = pipeline_config()
  return stage_config(c, arg) if arg else c
