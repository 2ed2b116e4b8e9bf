"""`mode=pipeline`: every stage of SABER-LLM in order, each printing the command-line
tool it runs so the same steps can be run by hand at scale. It sits beside main.py, above
the stages (train/), the generate stage (generate.py) and the tools (cli/) it calls.

  1. saber-make-demo-data   generated clips (mp4 with audio, wav) and annotations (en, zh)
  2. saber-preprocess       SFT records (log-mel, frames, SED target tokens)
  3. SED fine-tuning
  4. saber-make-pairs       offline preference pairs (gold answer vs a perturbed one)
     saber-make-preference-records   pairs joined with the prompts and media of the SFT records
  5. reference log-probs of the SED model
  6. CA-DPO
After each training stage the model's answer for one clip is printed. The last
`pipeline.eval_clips` clips are held out: their SFT and preference records (with their
own reference pass) are the eval sets both stages log `eval/...` on, and the pipeline
ends by drawing the curves into `workdir/curves.png`.

A stage whose output exists is skipped, so an interrupted pipeline resumes.
"""

import os

import jax
from jax.experimental import multihost_utils

from saber_jax import files, generate, weights
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
  answers = generate.generate_stage(config, sft_records, params_dir, out, limit=1)
  if answers and jax.process_index() == 0:
    print(f'--- {answers[0]["id"]} after {stage} ---\n{answers[0]["response"]}\n---',
          flush=True)


def split_manifest(manifest: str, held_out: int) -> tuple[str, str]:
  """(training, held-out) manifests: the last `held_out` clips of `manifest` held out."""
  with open(manifest, encoding='utf-8') as f:
    lines = [line for line in f if line.strip()]
  if not 0 < held_out < len(lines):
    raise ValueError(f'pipeline.eval_clips={held_out}: expected 1 to {len(lines) - 1} of the '
                     f'{len(lines)} clips of {manifest}')
  parts = []
  for name, part in (('train', lines[:-held_out]), ('heldout', lines[-held_out:])):
    path = os.path.join(os.path.dirname(manifest), f'clips_{name}.jsonl')
    files.write_text(path, ''.join(part))
    parts.append(path)
  return parts[0], parts[1]


def plot_curves(metrics_path: str, out: str) -> None:
  """SFT train/held-out loss, CA-DPO reward accuracy and margins (train and held-out)
  against the step, from metrics.jsonl, as a PNG."""
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  rows = list(files.read_jsonl(metrics_path))
  panels = [('sft', 'loss', 'SED loss'), ('dpo', 'rewards/accuracies', 'reward accuracy'),
            ('dpo', 'rewards/margins', 'reward margin')]
  figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
  for ax, (stage, key, title) in zip(axes, panels):
    for name, label in ((key, 'train'), (f'eval/{key}', 'held out')):
      points = [(r['step'], r[name]) for r in rows if r['stage'] == stage and name in r]
      if points:
        ax.plot(*zip(*points), marker='.', label=label)
    ax.set(title=f'{stage}: {title}', xlabel='step')
    ax.legend()
  figure.tight_layout()
  figure.savefig(out, dpi=100)
  plt.close(figure)


def run_pipeline(config) -> None:
  data = os.path.join(config.workdir, 'data')
  raw, sft_dir = os.path.join(data, 'raw'), os.path.join(data, 'sft')
  heldout_dir = os.path.join(data, 'heldout')
  pairs_dir, pref_dir = os.path.join(data, 'pairs'), os.path.join(data, 'pref')
  if not _done(os.path.join(raw, 'annotations.jsonl')):
    run_tool(make_demo_data, '--out', raw, '--n', config.pipeline.num_clips,
             '--seed', config.seed)
  annotations = os.path.join(raw, 'annotations.jsonl')
  manifests = split_manifest(os.path.join(raw, 'clips.jsonl'), config.pipeline.eval_clips)
  for manifest, out in zip(manifests, (sft_dir, heldout_dir)):
    run_tool(preprocess, '--manifest', manifest, '--annotations', annotations, '--out', out,
             '--quiet')
  sft_records, heldout_records = os.path.join(sft_dir, 'sft'), os.path.join(heldout_dir, 'sft')
  sft_config = with_overrides(config, config.pipeline.sft)
  sft_config.eval.sft_records = heldout_records
  sft_final = os.path.join(stages.stage_dir(config, 'sft'), 'final')
  if not _done(os.path.join(sft_final, weights.CONFIG_FILE)):
    stages.train_stage(sft_config, 'sft', sft_records, config.init_from)
    show_answer(config, 'sft', sft_records, sft_final)
  if not _done(os.path.join(pairs_dir, 'pairs.jsonl')):
    run_tool(make_pairs, '--strategy', 'perturb', '--annotations', annotations,
             '--out', pairs_dir, '--seed', config.seed)
  heldout_pref_dir = os.path.join(data, 'pref_heldout')
  for records_prefix, out in ((sft_records, pref_dir), (heldout_records, heldout_pref_dir)):
    run_tool(make_preference_records, '--pairs', os.path.join(pairs_dir, 'pairs.jsonl'),
             '--sft-records', records_prefix, '--out', out)
  dpo_config = with_overrides(config, config.pipeline.dpo)
  # The held-out pairs get their own reference pass, under workdir/heldout/.
  heldout_config = with_overrides(dpo_config, {'workdir': os.path.join(config.workdir, 'heldout')})
  ref_dir, heldout_ref_dir = (stages.stage_dir(c, 'ref_logps')
                              for c in (dpo_config, heldout_config))
  for c, pref, ref in ((dpo_config, pref_dir, ref_dir),
                       (heldout_config, heldout_pref_dir, heldout_ref_dir)):
    if not _done(os.path.join(ref, stages.DONE)):
      stages.ref_logps_stage(c, os.path.join(pref, 'pref'), sft_final)
  dpo_config.eval.pref_records = os.path.join(heldout_ref_dir, 'pref')
  dpo_final = os.path.join(stages.stage_dir(config, 'dpo'), 'final')
  if not _done(os.path.join(dpo_final, weights.CONFIG_FILE)):
    stages.train_stage(dpo_config, 'dpo', os.path.join(ref_dir, 'pref'), sft_final)
    show_answer(config, 'dpo', sft_records, dpo_final)
  if jax.process_index() == 0:
    curves = os.path.join(config.workdir, 'curves.png')
    plot_curves(os.path.join(config.workdir, 'metrics.jsonl'), curves)
    print(f'pipeline done: metrics in {os.path.join(config.workdir, "metrics.jsonl")} '
          f'(curves: {curves}), final params in {dpo_final}', flush=True)
