"""`mode=pipeline`: every stage of SABER-LLM in order, each printing the command-line
tool it runs so the same steps can be run by hand at scale. It sits beside main.py, above
the stages (train/), the generate stage (sampling.py) and the tools (cli/) it calls.

  1. saber-make-demo-data   generated clips (mp4 with audio, wav) and annotations (en, zh)
  2. saber-preprocess       SFT records (log-mel, frames, SED target tokens)
  3. SED fine-tuning
  4. saber-make-pairs       offline preference pairs (gold answer vs a perturbed one)
     saber-make-preference-records   pairs joined with the prompts and media of the SFT records
  5. reference log-probs of the SED model
  6. CA-DPO
After each training stage the model's answer for one clip is printed.

A stage whose output exists is skipped, so an interrupted pipeline resumes.
"""

import os

import jax
from jax.experimental import multihost_utils

from saber_jax import sampling, weights
from saber_jax.cli import make_demo_data, make_pairs, make_preference_records, preprocess
from saber_jax.train import stages
from saber_jax.train.config import with_overrides


def run_tool(tool, *args) -> None:
  """Run a data tool's `main` on process 0 (the data tools are single-host programs), echoing
  the command that does the same by hand; every process waits for it."""
  args = [str(a) for a in args]
  if jax.process_index() == 0:
    name = tool.__name__.rsplit('.', 1)[-1].replace('_', '-')
    print(f'$ saber-{name} ' + ' '.join(args), flush=True)
    tool.main(args)
  multihost_utils.sync_global_devices(f'demo: {tool.__name__} done')


def _done(path: str) -> bool:
  return os.path.exists(path)


def show_answer(config, stage: str, sft_records: str, params_dir: str) -> None:
  """Print the model's greedy answer for the first clip, to see what a stage changed."""
  out = os.path.join(config.workdir, f'answers_after_{stage}.jsonl')
  answers = sampling.generate_stage(config, sft_records, params_dir, out, limit=1)
  if answers and jax.process_index() == 0:
    print(f'--- {answers[0]["id"]} after {stage} ---\n{answers[0]["response"]}\n---',
          flush=True)


def run_pipeline(config) -> None:
  data = os.path.join(config.workdir, 'data')
  raw, sft_dir = os.path.join(data, 'raw'), os.path.join(data, 'sft')
  pairs_dir, pref_dir = os.path.join(data, 'pairs'), os.path.join(data, 'pref')
  if not _done(os.path.join(raw, 'annotations.jsonl')):
    run_tool(make_demo_data, '--out', raw, '--n', config.pipeline.num_clips,
             '--seed', config.seed)
  run_tool(preprocess, '--manifest', os.path.join(raw, 'clips.jsonl'),
           '--annotations', os.path.join(raw, 'annotations.jsonl'), '--out', sft_dir,
           '--quiet')
  sft_records = os.path.join(sft_dir, 'sft')
  sft_config = with_overrides(config, config.pipeline.sft)
  sft_final = os.path.join(stages.stage_dir(config, 'sft'), 'final')
  if not _done(os.path.join(sft_final, weights.CONFIG_FILE)):
    stages.train_stage(sft_config, 'sft', sft_records, config.init_from)
    show_answer(config, 'sft', sft_records, sft_final)
  if not _done(os.path.join(pairs_dir, 'pairs.jsonl')):
    run_tool(make_pairs, '--strategy', 'perturb', '--annotations',
             os.path.join(raw, 'annotations.jsonl'), '--out', pairs_dir, '--seed', config.seed)
  run_tool(make_preference_records, '--pairs', os.path.join(pairs_dir, 'pairs.jsonl'),
           '--sft-records', sft_records, '--out', pref_dir)
  dpo_config = with_overrides(config, config.pipeline.dpo)
  ref_dir = stages.stage_dir(config, 'ref_logps')
  if not _done(os.path.join(ref_dir, stages.DONE)):
    stages.ref_logps_stage(dpo_config, os.path.join(pref_dir, 'pref'), sft_final)
  dpo_final = os.path.join(stages.stage_dir(config, 'dpo'), 'final')
  if not _done(os.path.join(dpo_final, weights.CONFIG_FILE)):
    stages.train_stage(dpo_config, 'dpo', os.path.join(ref_dir, 'pref'), sft_final)
    show_answer(config, 'dpo', sft_records, dpo_final)
  if jax.process_index() == 0:
    print(f'pipeline done: metrics in {os.path.join(config.workdir, "metrics.jsonl")}, '
          f'final params in {os.path.join(stages.stage_dir(config, "dpo"), "final")}',
          flush=True)
