"""Running a stage: params and train state placed on the mesh, the jitted step with explicit
shardings and donated state, the loop with logging, non-finite checks, Orbax checkpoints,
held-out evaluation, profiles, time accounting and a clean stop on SIGTERM / SIGINT
(`preemption`)."""

import dataclasses
import functools
import os
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from saber_jax import files, fingerprint, sharding, weights
from saber_jax.batch import FILL, IGNORE_INDEX
from saber_jax.errors import UserError
from saber_jax.models.config import ThinkerConfig
from saber_jax.models.thinker import abstract_params
from saber_jax.train import adapters, checkpoint, flops, lora, optim, preemption, steps
from saber_jax.train.log import Clock, MetricLogger, Profile


class NonFiniteError(FloatingPointError):
  pass


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


@dataclasses.dataclass
class Setup:
  """Everything a stage's loop needs: the jitted step, the abstract state (shapes, dtypes
  and shardings) and, once `materialize`d, the state itself."""
  model_config: ThinkerConfig
  mesh: Mesh
  optimizer: Any
  abstract_state: steps.TrainState
  state_shardings: steps.TrainState
  step_fn: Callable
  state: steps.TrainState | None = None


def _boxed_lora(lora_config, boxed_params):
  """Abstract LoRA factors, boxed with the logical axes of the kernels they adapt."""
  abstract = jax.eval_shape(lambda: lora.init_lora(
      jax.random.key(0), nn.unbox(boxed_params), rank=lora_config.rank,
      targets=tuple(lora_config.targets)))
  specs = lora.lora_logical_axes(nn.get_partition_spec(boxed_params), abstract)
  return jax.tree.map(lambda x, spec: nn.LogicallyPartitioned(x, tuple(spec)), abstract, specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def plan(config, stage: str, mesh: Mesh) -> Setup:
  """The abstract train state of `stage` ('sft' or 'dpo') on `mesh` and its jitted step
  (explicit in/out shardings, state donated); nothing is allocated."""
  model_config = weights.model_config_of(config)
  boxed = abstract_params(model_config)
  lora_config = weights.lora_config_of(config)
  boxed_lora = _boxed_lora(lora_config, boxed) if lora_config is not None else None
  boxed_trainable, boxed_frozen = steps.split_params(boxed, config.trainable, boxed_lora)
  optimizer = optim.make_optimizer(config.optim)
  boxed_state = steps.TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), trainable=boxed_trainable, frozen=boxed_frozen,
      opt_state=jax.eval_shape(optimizer.init, boxed_trainable))
  state_shardings = sharding.tree_shardings(boxed_state, mesh)
  abstract_state = sharding.abstract_like(nn.unbox(boxed_state), state_shardings)
  step_fn = jax.jit(
      sharding.on_mesh(functools.partial(
          steps.train_step, loss_fn=stage_loss(config, stage, model_config),
          optimizer=optimizer, skip_nonfinite=config.nonfinite == 'skip'), mesh),
      in_shardings=(state_shardings, None), out_shardings=(state_shardings, replicated(mesh)),
      donate_argnums=0)
  return Setup(model_config, mesh, optimizer, abstract_state, state_shardings, step_fn)


def materialize(setup: Setup, config, init_from: str | None) -> Setup:
  """The initial state on the mesh: params from `init_from` (or random), fresh LoRA
  factors (or those of the PEFT adapter `config.init_lora`) and optimizer state, each
  created directly on its sharding."""
  params = weights.initial_params(config, setup.model_config, setup.mesh, init_from)
  shardings = setup.state_shardings
  lora_config, lora_params = weights.lora_config_of(config), None
  if lora_config is not None:
    lora_params = jax.jit(
        lambda p, key: lora.init_lora(key, p, rank=lora_config.rank,
                                      targets=tuple(lora_config.targets)),
        out_shardings=shardings.trainable['lora'])(params, jax.random.key(config.seed + 1))
    if config.get('init_lora'):         # a PEFT adapter to start from
      lora_params = jax.device_put(
          adapters.load_peft(config.init_lora, lora_params, rank=lora_config.rank,
                             alpha=lora_config.alpha), shardings.trainable['lora'])
  trainable, frozen = steps.split_params(params, config.trainable, lora_params)
  opt_state = jax.jit(setup.optimizer.init, out_shardings=shardings.opt_state)(trainable)
  state = steps.TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step),
                           trainable=trainable, frozen=frozen, opt_state=opt_state)
  return dataclasses.replace(setup, state=state)


def stage_loss(config, stage: str, model_config: ThinkerConfig):
  lora_config = weights.lora_config_of(config)
  if stage == 'sft':
    return functools.partial(steps.sft_loss, model_config=model_config, lora_config=lora_config,
                             chunk_size=config.logps_chunk_size)
  if stage == 'dpo':
    return functools.partial(steps.dpo_loss, model_config=model_config, dpo_config=config.dpo,
                             lora_config=lora_config, chunk_size=config.logps_chunk_size)
  raise ValueError(f'unknown stage {stage!r}')


def final_params(setup: Setup, lora_config) -> dict:
  """The thinker params the run ends with (LoRA merged)."""
  s = setup.state
  return jax.jit(functools.partial(steps.join_params, lora_config=lora_config))(s.trainable,
                                                                               s.frozen)


def data_identity(config) -> dict:
  """The data settings that change a stage's result (not how fast it is read)."""
  runtime_only = ('worker_count', 'worker_buffer_size', 'read_threads', 'prefetch',
                  'num_data_shards', 'batch_size', 'max_dropped_fraction')
  return {**{k: v for k, v in config.data.items() if k not in runtime_only},
          'global_batch_size': config.data.batch_size * jax.process_count()}


def claim_workdir(config, workdir: str, stage: str, record_paths, init_from: str | None):
  """Checks a stage's workdir belongs to this run (`fingerprint.json`: the records, the
  start weights and every setting that changes the result); a mismatch is an error naming
  what differs, or, with `config.overwrite`, the old stage is deleted and starts fresh."""
  c = config
  produced_by = {
      'stage': stage, 'records': fingerprint.files_identity(record_paths),
      **weights.weights_identity(c, init_from), 'trainable': c.trainable,
      'lora': weights.lora_config_of(c),
      **({'init_lora': fingerprint.tree_identity(c.init_lora)} if c.get('init_lora') else {}),
      'optim': c.optim, 'dpo': c.dpo if stage == 'dpo' else None, 'seed': c.seed,
      'nonfinite': c.nonfinite,
      'data': data_identity(c)}
  checkpoints, final = os.path.join(workdir, 'checkpoints'), os.path.join(workdir, 'final')
  has_output = any(files.listdir(p) for p in (checkpoints, final))

  def clear():
    for path in (checkpoints, final, checkpoints + '.damaged'):
      files.rmtree(path)
    print(f'[{stage}] config.overwrite: deleted the earlier run in {workdir}', flush=True)

  if has_output and not c.get('overwrite', False):
    check_global_batch(os.path.join(workdir, fingerprint.FILE), c.data.batch_size)
  fingerprint.ensure(os.path.join(workdir, fingerprint.FILE), produced_by,
                     has_output=has_output, overwrite=c.get('overwrite', False), clear=clear,
                     overwrite_hint='--config.overwrite=True',
                     writer=jax.process_index() == 0)
  multihost_utils.sync_global_devices(f'{stage} workdir claimed')


@dataclasses.dataclass
class Evaluation:
  """Held-out evaluation while training: a fixed list of host batches (the first
  `max_batches` of the eval records' plan), evaluated every `every_steps` steps and at the
  end by `step_fn(trainable, frozen, batch) -> (loss, metrics)`."""
  batches: list
  every_steps: int
  step_fn: Callable


def plan_evaluation(config, stage: str, setup: Setup, batches) -> Evaluation:
  """The eval step of `stage` sharded like training (the state's shardings; rows over
  the batch axes), compiled once per batch shape of the fixed eval batches."""
  loss_fn = stage_loss(config, stage, setup.model_config)
  shardings = setup.state_shardings
  step_fn = jax.jit(sharding.on_mesh(loss_fn, setup.mesh),
                    in_shardings=(shardings.trainable, shardings.frozen, None),
                    out_shardings=replicated(setup.mesh))
  batches = [{k: v for k, v in b.items() if k != FILL} for b in batches]
  return Evaluation(batches, config.eval.every_steps, step_fn)


def eval_means(per_batch: list[dict]) -> dict:
  """`eval/...` means over the eval batches: token-weighted for the SED loss (`loss` by
  `tokens`, `nll/<part>` by `tokens/<part>`: the held-out per-token NLL), token counts
  summed, every other metric (the CA-DPO loss, rewards) the mean of the batch means."""
  keys = per_batch[0].keys()
  values = {k: np.array([float(m[k]) for m in per_batch], np.float64) for k in keys}
  weight_of = lambda k: ('tokens' if k == 'loss' and 'tokens' in keys
                         else 'tokens/' + k[4:] if k.startswith('nll/') else None)
  out = {}
  for k, v in values.items():
    w = weight_of(k)
    if k.startswith('tokens'):
      out[f'eval/{k}'] = float(v.sum())
    elif w is not None:
      out[f'eval/{k}'] = float((v * values[w]).sum() / max(values[w].sum(), 1.0))
    else:
      out[f'eval/{k}'] = float(v.mean())
  return out


def evaluate(evaluation: Evaluation, state: steps.TrainState, mesh: Mesh) -> dict:
  """The eval metrics of `state` over the fixed eval batches (`eval_means`)."""
  per_batch = []
  for batch in evaluation.batches:
    loss, metrics = evaluation.step_fn(state.trainable, state.frozen,
                                       sharding.global_batch(batch, mesh))
    per_batch.append({'loss': loss, **metrics})
  return eval_means(jax.device_get(per_batch))


def check_global_batch(fingerprint_path: str, batch_size: int) -> None:
  """A run resumes on any number of processes with the global batch it started with
  (`data.batch_size` is per process): otherwise an error naming both numbers."""
  try:
    old = fingerprint.read(fingerprint_path)['data']['global_batch_size']
  except (OSError, ValueError, KeyError, TypeError):
    return                         # no earlier run to compare with: ensure() decides
  processes = jax.process_count()
  if old == batch_size * processes:
    return
  fix = (f'--config.data.batch_size={old // processes}' if old % processes == 0 else
         f'a process count that divides {old}')
  raise UserError(
      f'{os.path.dirname(fingerprint_path)} was trained with a global batch of {old} examples; '
      f'this run has data.batch_size={batch_size} per process x {processes} processes = '
      f'{batch_size * processes}. To resume, use {fix} (data.batch_size is per process).')
def check_trained(stage: str, tokens: int, steps: int) -> None:
  """UserError when `steps` > 0 steps trained on no token on any process (every example
  dropped or without an answer): the stage would write weights it never trained."""
  total = int(np.sum(multihost_utils.process_allgather(np.int64(tokens))))
  if steps and not total:
    raise UserError(f'[{stage}] {steps} steps trained on 0 tokens (every example was dropped '
                    'or had no answer tokens): no weights written; check the records and '
                    'data.length_buckets')


def train(config, setup: Setup, batches: Iterator[dict], data_iterator, workdir: str,
          stage: str, total_steps: int, init_from: str | None = None,
          evaluation: Evaluation | None = None) -> Setup:
  """The loop: one step per batch until `total_steps` micro-steps, checkpoints every
  `checkpoint.every_steps` (and at the end). Resumes from the latest complete checkpoint
  of `workdir` (state and data position); otherwise starts from `init_from`.

  Metrics stay on the devices until a log step or a checkpoint step fetches them all at
  once (no host sync per micro-step). The non-finite stop is still exact: it names the
  first non-finite step, and no checkpoint is written before the steps it holds were
  seen finite, so the last checkpoint is intact.

  On a stop request (`preemption.reached`, alike on every process) the step in flight is
  finished, logged and checkpointed, the save waited for, and `preemption.Stopped` raised.
  `evaluation`: held-out metrics logged as `eval/...` at its steps (a function of the state
  alone, so a resumed run logs the same values). `config.profile`: steps to trace."""
  clock = Clock()
  mngr = checkpoint.manager(os.path.join(workdir, 'checkpoints'), keep=config.checkpoint.keep,
                            every_steps=config.checkpoint.every_steps)
  with clock.part('checkpoint'):
    state = checkpoint.restore(mngr, setup.abstract_state, data_iterator)
  if state is None:
    state = materialize(setup, config, init_from).state
  elif jax.process_index() == 0:
    print(f'[{stage}] resumed from step {int(jax.device_get(state.step))}', flush=True)
  step = start_step = int(jax.device_get(state.step))
  run_tokens = 0   # trained (label) tokens of this process since the start or resume
  logger = MetricLogger(config.workdir, stage, total_steps, start_step=step,
                        wandb=config.get('wandb'), run_config=config.to_dict())
  # Traces go beside the TensorBoard scalars (staged locally for a URL workdir).
  profile = Profile(config.get('profile'), os.path.join(logger.local_dir, 'tensorboard', stage))
  schedule = optim.learning_rate_schedule(config.optim)
  pending = []     # (step, device metrics, host work counts) not yet fetched

  def fetch():
    for at, metrics, work in jax.device_get(pending):
      if not metrics['finite']:
        message = (f'[{stage}] non-finite loss or gradient at step {at} '
                   f'(loss {metrics["loss"]}, grad norm {metrics["grad_norm"]})')
        if config.nonfinite != 'skip':
          raise NonFiniteError(message + '; stopping. The last checkpoint is intact.')
        print(message + '; update skipped.', flush=True)
      logger.add(metrics, **work)
    pending.clear()

  try:
    while step < total_steps:
      profile.before(step + 1)
      with clock.part('input'):
        batch = next(batches)
      fill = batch.pop(FILL, None)   # the global batch's padding, not a model input
      state, metrics = setup.step_fn(state, sharding.global_batch(batch, setup.mesh))
      step += 1
      # Counted on the host while the (asynchronously dispatched) step runs.
      tokens = int(np.sum(batch['labels'] != IGNORE_INDEX))
      run_tokens += tokens
      pending.append((step, metrics, dict(
          tokens=tokens,
          model_flops=flops.step_flops(setup.model_config, batch, trainable=config.trainable),
          fill=fill)))
      profile.after(step, metrics)
      stop = step < total_steps and preemption.reached(step)
      last = step == total_steps or stop
      eval_now = evaluation is not None and (step % evaluation.every_steps == 0 or last)
      log_now = step % config.log_every == 0 or last or eval_now
      if log_now or mngr.should_save(step) or last:
        fetch()
      if log_now:
        extra = {'lr': float(schedule((step - 1) // config.optim.grad_accum_steps))}
        if eval_now:
          with clock.part('eval'):
            extra.update(evaluate(evaluation, state, setup.mesh))
        logger.write(step, {**extra, **clock.take()})
      if step == total_steps:
        check_trained(stage, run_tokens, step - start_step)
      with clock.part('checkpoint'):
        if checkpoint.save(mngr, step, state, data_iterator, force=last):
          logger.sync()        # a URL workdir's logs go up with each checkpoint
        if stop:
          mngr.wait_until_finished()
      if stop:
        raise preemption.stopped(
            f'[{stage}] stopped after step {step} of {total_steps}: checkpoint '
            f'{os.path.join(os.fspath(mngr.directory), str(step))} saved')
    mngr.wait_until_finished()
  finally:
    profile.stop()
    clock.close()
    mngr.close()
    logger.close()
  return dataclasses.replace(setup, state=state)
