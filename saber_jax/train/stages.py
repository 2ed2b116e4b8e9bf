"""The stages a run config's `mode` selects, from records on disk to params on disk.

Each stage writes under `config.workdir/<stage>/`: `checkpoints/` (Orbax, for resume) and
`final/` (the thinker params, LoRA merged, the next stage's `init_from`). The reference
pass writes the preference records with `ref_chosen_logps` / `ref_rejected_logps`
filled into `ref_logps/`.
"""

import copy
import functools
import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from saber_jax import generate, sharding
from saber_jax.data import pipeline, prompt, records
from saber_jax.train import checkpoint, steps, trainer


DONE = 'DONE'                # written last by the reference pass


def stage_dir(config, stage: str) -> str:
  return os.path.join(config.workdir, stage)


def data_config(config, mesh):
  """`config.data` with one data shard per data-parallel device of this process."""
  data = copy.deepcopy(config.data)
  batch_devices = mesh.shape['data'] * mesh.shape['fsdp']
  data.num_data_shards = max(batch_devices // jax.process_count(), 1)
  return data


def _lora_config(config):
  return config.lora if config.trainable == 'lora' else None


def train_stage(config, stage: str, record_paths, init_from: str) -> str:
  """Train `stage` ('sft' or 'dpo') on the records; returns the final params directory."""
  mesh = sharding.make_mesh(config.mesh)
  config = copy.deepcopy(config)
  model_config = trainer.model_config_of(config)
  data = data_config(config, mesh)
  paths = pipeline.resolve_paths(record_paths)
  accum = config.optim.grad_accum_steps
  if config.optim.total_steps:
    micro_steps = config.optim.total_steps * accum
  else:
    micro_steps = (pipeline.steps_per_epoch(records.count_records(paths), data)
                   * config.data.num_epochs) // accum * accum
    config.optim.total_steps = micro_steps // accum
  if micro_steps <= 0:
    raise ValueError(f'{stage}: {records.count_records(paths)} records make no optimizer step '
                     f'of batch {data.batch_size} x {accum} accumulation')
  make = pipeline.sft_dataset if stage == 'sft' else pipeline.preference_dataset
  iterator = iter(make(model_config, data, paths, seed=config.seed))
  setup = trainer.plan(config, stage, mesh)
  workdir = stage_dir(config, stage)
  setup = trainer.train(config, setup, iterator, iterator, workdir, stage, micro_steps,
                        init_from=init_from)
  final = os.path.join(workdir, 'final')
  checkpoint.save_params(final, trainer.final_params(setup, _lora_config(config)), model_config)
  return final


def ref_logps_stage(config, record_paths, init_from: str) -> str:
  """The frozen reference's summed response log-probs of every pair, written into a copy
  of the preference records; returns their directory."""
  mesh = sharding.make_mesh(config.mesh)
  model_config = trainer.model_config_of(config)
  params = trainer.initial_params(config, model_config, mesh, init_from)
  logps_fn = jax.jit(sharding.on_mesh(functools.partial(
      steps.sequence_logps, model_config=model_config, chunk_size=config.logps_chunk_size), mesh))
  paths = pipeline.resolve_paths(record_paths)
  values = {}
  for batch in pipeline.reference_batches(model_config, data_config(config, mesh), paths):
    pair_index = batch.pop('pair_index')
    logps = logps_fn(params, sharding.global_batch(batch, mesh))
    logps = np.asarray(multihost_utils.process_allgather(logps, tiled=True)).reshape(-1, 2)
    pair_index = np.asarray(multihost_utils.process_allgather(pair_index, tiled=True))
    mask = np.asarray(multihost_utils.process_allgather(batch['example_mask'][0::2],
                                                        tiled=True))
    for index, (chosen, rejected), real in zip(pair_index, logps, mask):
      if index >= 0 and real:
        values[int(index)] = (float(chosen), float(rejected))
  out = stage_dir(config, 'ref_logps')
  if jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    counts = records.fill_reference_logps(paths, values, key='index', out_dir=out,
                                          missing='keep')
    with open(os.path.join(out, DONE), 'w') as f:
      f.write(f'{counts}\n')
    print(f'[ref_logps] filled {counts["filled"]} pairs, kept {counts["kept"]} '
          f'(too long for the largest length bucket) -> {out}', flush=True)
  multihost_utils.sync_global_devices('ref_logps written')
  return out


def generate_stage(config, record_paths, init_from: str, out_path: str,
                   limit: int | None = None) -> list[dict]:
  """Responses of the model at `init_from` to the prompts of the records, appended to the
  JSONL `out_path` as {"id", "response"}; ids already there are skipped (resumable)."""
  model_config = trainer.model_config_of(config)
  mesh = sharding.make_mesh(config.mesh)
  params = trainer.initial_params(config, model_config, mesh, init_from)
  tokenizer = prompt.load_tokenizer(config.generate.tokenizer or None)
  done = set()
  if os.path.exists(out_path):
    with open(out_path) as f:
      done = {json.loads(line)['id'] for line in f if line.strip()}
  todo = [(where, r) for where, r in
          ((w, records.decode_record(b, w)) for w, b in
           records.read_records(pipeline.resolve_paths(record_paths)))
          if r['id'] not in done][:limit]
  g = config.generate
  written = []
  with open(out_path, 'a') as out:
    for start in range(0, len(todo), g.batch_size):
      chunk = [r for _, r in todo[start:start + g.batch_size]]
      batch = pipeline.prompt_batch(chunk, model_config, todo[start][0])
      result = generate.generate(model_config, params, batch, max_new_tokens=g.max_new_tokens,
                                 temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                                 num_samples=g.num_samples, seed=config.seed + start)
      texts = generate.decode_responses(tokenizer, result['tokens'], result['lengths'])
      for i, record in enumerate(chunk):
        samples = texts[i * g.num_samples:(i + 1) * g.num_samples]
        line = {'id': record['id'], 'response': samples[0]}
        if g.num_samples > 1:
          line['responses'] = samples
        out.write(json.dumps(line, ensure_ascii=False) + '\n')
        out.flush()
        written.append(line)
  return written
