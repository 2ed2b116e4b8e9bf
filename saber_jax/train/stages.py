"""The stages a run config's `mode` selects, from records on disk to params on disk.

Each stage writes under `config.workdir/<stage>/`: `checkpoints/` (Orbax, for resume) and
`final/` (the thinker params, LoRA merged, the next stage's `init_from`; a LoRA stage's
adapter too, in `final/adapter/`). The reference
pass writes the preference records with `ref_chosen_logps` / `ref_rejected_logps`
filled into `ref_logps/`; stopped (SIGTERM / SIGINT) it keeps the log-probs of the batches
done in `ref_logps/progress.json` and a restart carries on from there.
"""

import copy
import itertools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from saber_jax import files, fingerprint, sharding, weights
from saber_jax.batch import FILL, PAIR_INDEX
from saber_jax.data import datasets, records
from saber_jax.errors import UserError
from saber_jax.train import adapters, preemption, steps, trainer


DONE = 'DONE'                # written last by the reference pass
PROGRESS = 'progress.json'   # the reference pass's batches done, when it was stopped
ERRORS = 'errors.jsonl'      # the reference pass's damaged records
DEGENERATE = 'degenerate.jsonl'   # pairs the reference pass left out, with the reason


def stage_dir(config, stage: str) -> str:
  return os.path.join(config.workdir, stage)


def data_config(config, mesh):
  """`config.data` with one data shard per data-parallel device of this process."""
  data = copy.deepcopy(config.data)
  batch_devices = mesh.shape['data'] * mesh.shape['fsdp']
  data.num_data_shards = max(batch_devices // jax.process_count(), 1)
  return data


def train_stage(config, stage: str, record_paths, init_from: str) -> str:
  """Train `stage` ('sft' or 'dpo') on the records; returns the final params directory."""
  mesh = sharding.make_mesh(config.mesh)
  config = copy.deepcopy(config)
  data = data_config(config, mesh)
  paths = datasets.resolve_paths(record_paths)
  accum = config.optim.grad_accum_steps
  if config.optim.total_steps:
    micro_steps = config.optim.total_steps * accum
  else:
    micro_steps = (datasets.steps_per_epoch(records.count_records(paths), data)
                   * config.data.num_epochs) // accum * accum
    config.optim.total_steps = micro_steps // accum
  if micro_steps <= 0:
    raise UserError(f'{stage}: {records.count_records(paths)} records make no optimizer step '
                    f'of batch {data.batch_size} x {accum} accumulation')
  setup = trainer.plan(config, stage, mesh)    # after total_steps: the schedule reads it
  make = datasets.sft_dataset if stage == 'sft' else datasets.preference_dataset
  iterator = iter(make(setup.model_config, data, paths, seed=config.seed))
  workdir = stage_dir(config, stage)
  trainer.claim_workdir(config, workdir, stage, paths, init_from)
  evaluation = None
  eval_records = config.eval.get('sft_records' if stage == 'sft' else 'pref_records')
  if config.eval.every_steps and eval_records:
    evaluation = trainer.plan_evaluation(config, stage, setup, eval_batches(
        config, make, setup.model_config, data, eval_records))
  setup = trainer.train(config, setup, iterator, iterator, workdir, stage, micro_steps,
                        init_from=init_from, evaluation=evaluation)
  final = os.path.join(workdir, 'final')
  save_final(config, setup, final, init_from)
  return final


def save_final(config, setup: trainer.Setup, final: str, init_from: str):
  """The merged params in `final/`; a LoRA run also keeps its adapter in `final/adapter/`
  (`saber-convert-hf to-peft` exports it for PEFT)."""
  lora_config = weights.lora_config_of(config)
  weights.save_params(final, trainer.final_params(setup, lora_config), setup.model_config)
  if lora_config is not None:
    adapters.save_adapter(os.path.join(final, adapters.ADAPTER_DIR),
                          setup.state.trainable['lora'], rank=lora_config.rank,
                          alpha=lora_config.alpha, targets=tuple(lora_config.targets),
                          base=init_from or '')


def claim_ref_output(config, out: str, paths, init_from: str | None) -> None:
  """The reference pass's output belongs to its records and weights (`fingerprint.json`
  as a training stage's): a rerun from other weights or records is an error naming what
  differs, or, with `config.overwrite`, the old output is deleted first."""
  produced_by = {'stage': 'ref_logps', 'records': fingerprint.files_identity(paths),
                 **weights.weights_identity(config, init_from),
                 'data': trainer.data_identity(config)}
  outputs = [os.path.join(out, name) for name in os.listdir(out)
             if name != fingerprint.FILE and not name.endswith(files.LOCK_SUFFIX)
             ] if os.path.isdir(out) else []

  def clear():
    for path in outputs:
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    print(f'[ref_logps] config.overwrite: deleted the earlier output in {out}', flush=True)

  fingerprint.ensure(os.path.join(out, fingerprint.FILE), produced_by,
                     has_output=bool(outputs), overwrite=config.get('overwrite', False),
                     clear=clear, overwrite_hint='--config.overwrite=True',
                     writer=jax.process_index() == 0)
  multihost_utils.sync_global_devices('ref_logps output claimed')
def eval_batches(config, make, model_config, data, record_paths) -> list[dict]:
  """The fixed held-out batches: the first `eval.max_batches` of one epoch of the eval
  records' plan (same seed and batching as training; this process's rows)."""
  data = copy.deepcopy(data)
  data.num_epochs = 1
  paths = datasets.resolve_paths(record_paths)
  batches = iter(make(model_config, data, paths, seed=config.seed))
  return list(itertools.islice(batches, config.eval.max_batches))


def _skip(batches, count: int) -> None:
  """Move a Grain iterator past `count` batches (its state is a batch count, or read them)."""
  state = batches.get_state()
  if set(state) == {'next_index'}:
    batches.set_state({'next_index': count})
  else:
    for _ in range(count):
      next(batches)


def _progress(path: str, produced_by) -> tuple[int, dict]:
  """(batches done, pair index -> log-probs) of a stopped reference pass of the same
  inputs; (0, {}) when there is none."""
  if not os.path.exists(path):
    return 0, {}
  saved = fingerprint.read(path)
  if saved.get('produced_by') != fingerprint.normalize(produced_by):
    print(f'[ref_logps] {path} belongs to other records or weights: starting over', flush=True)
    return 0, {}
  return saved['batches'], {int(k): tuple(v) for k, v in saved['values'].items()}


def _readable_shards(paths, damaged_log: str) -> list[str]:
  """The shards that can be opened; each other one is logged in `damaged_log` (a fresh
  file: the pass recomputes every pair) and left out, so the pass goes on without it."""
  if jax.process_index() == 0 and os.path.exists(damaged_log):
    os.remove(damaged_log)
  multihost_utils.sync_global_devices('ref_logps errors cleared')
  readable = []
  for path in paths:
    try:
      records.count_records(path)
      readable.append(path)
    except records.RecordError as e:
      if jax.process_index() == 0:
        files.append_jsonl(damaged_log, [dict(id=None, where=path, reason=str(e))])
        print(f'[ref_logps] skipped {e}', flush=True)
  if not readable:
    raise UserError(f'ref_logps: no readable shard among {len(paths)} (see {damaged_log})')
  return readable


def ref_logps_stage(config, record_paths, init_from: str) -> str:
  """The frozen reference's summed response log-probs of every pair, written into a copy
  of the preference records; returns their directory."""
  mesh = sharding.make_mesh(config.mesh)
  model_config = weights.model_config_of(config)
  paths = datasets.resolve_paths(record_paths)
  out = stage_dir(config, 'ref_logps')
  claim_ref_output(config, out, paths, init_from)
  paths = _readable_shards(paths, damaged_log := os.path.join(out, ERRORS))
  params = weights.initial_params(config, model_config, mesh, init_from)
  logps_fn = jax.jit(sharding.on_mesh(lambda params, batch: jnp.stack(steps.pair_logps(
      params, batch, model_config=model_config, chunk_size=config.logps_chunk_size), axis=-1),
      mesh))
  progress = os.path.join(out, PROGRESS)
  produced_by = {'records': fingerprint.files_identity(paths),
                 **weights.weights_identity(config, init_from)}
  done, values = _progress(progress, produced_by)
  batches = datasets.reference_batches(model_config, data_config(config, mesh), paths,
                                       damaged_log=damaged_log)
  if done:
    _skip(batches, done)
    if jax.process_index() == 0:
      print(f'[ref_logps] resumed after batch {done}', flush=True)
  for step, batch in enumerate(batches, start=done + 1):
    pair_index = batch.pop(PAIR_INDEX)
    batch.pop(FILL)
    logps = logps_fn(params, sharding.global_batch(batch, mesh))
    logps = np.asarray(multihost_utils.process_allgather(logps, tiled=True)).reshape(-1, 2)
    pair_index = np.asarray(multihost_utils.process_allgather(pair_index, tiled=True))
    pair_mask = batch['example_mask'].reshape(len(pair_index), -1)[:, 0]
    mask = np.asarray(multihost_utils.process_allgather(pair_mask, tiled=True))
    for index, (chosen, rejected), real in zip(pair_index, logps, mask):
      if index >= 0 and real:
        values[int(index)] = (float(chosen), float(rejected))
    if preemption.reached(step):
      if jax.process_index() == 0:
        files.write_json(progress, {'produced_by': fingerprint.normalize(produced_by),
                                    'batches': step, 'values': values})
      multihost_utils.sync_global_devices('ref_logps progress written')
      raise preemption.stopped(f'[ref_logps] stopped after batch {step}: {len(values)} pairs '
                               f'kept in {progress}')
  if jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    damaged = sorted({int(e['index']) for e in files.read_whole_lines(damaged_log)
                      if e.get('index') is not None})
    degenerate = []
    counts = records.fill_reference_logps(paths, values, key='index', out_dir=out,
                                          missing='keep', drop=damaged,
                                          skip_unreadable=True, degenerate=degenerate)
    files.write_jsonl(os.path.join(out, DEGENERATE), degenerate)
    if not counts['filled']:
      raise UserError(f'[ref_logps] no pair left to train on ({counts}); see {out}')
    files.write_text(os.path.join(out, DONE), f'{counts}\n')
    if os.path.exists(progress):
      os.remove(progress)
    print(f'[ref_logps] filled {counts["filled"]} pairs, kept {counts["kept"]} '
          f'(too long for the largest length bucket), dropped {counts["dropped"]} damaged '
          f'(see {damaged_log}), left out {counts["degenerate"]} degenerate pairs (equal '
          f'answers or chosen scored below rejected: {os.path.join(out, DEGENERATE)}) '
          f'-> {out}', flush=True)
  multihost_utils.sync_global_devices('ref_logps written')
  return out
