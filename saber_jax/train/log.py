"""Training logs: a progress line, `workdir/metrics.jsonl` and TensorBoard event files.

Only process 0 writes; every line of metrics.jsonl is one JSON object with `stage`,
`step`, `loss` and the loss metrics, each the mean over the steps since the last line,
and the throughput over those steps: trained tokens per second, model FLOP/s per device
(`saber_jax.train.flops`) and, on an accelerator whose peak `flops.peak_flops` knows, MFU.
With the batch plan's fill counts, also `data/text_fill` (real / padded text positions)
and `data/media_fill` (real / padded audio + vision positions) of those steps' global
batches; model FLOPs ignore padding, so MFU stays honest.

With `config.wandb.project` set (the `wandb` extra), the same records also go to a Weights &
Biases run, one per stage, whose id is kept in `workdir/wandb/<stage>.id` so a resumed stage
continues it (`mode='offline'` writes the run under `workdir/wandb/` for `wandb sync`).
Where the wall time since the last line went (`Clock`): `time/input_s` waiting for the
next batch, `time/compile_s` compiling (JAX's compile events: the first steps, a new
bucket's shapes, the eval step), `time/checkpoint_s` restoring and saving checkpoints,
`time/eval_s` held-out evaluation and `time/step_s` the rest (dispatching and running the
steps); `goodput` = step / total. With `config.eval`, the held-out metrics of that step as
`eval/...`. `Profile` writes a jax.profiler trace of chosen steps next to the TensorBoard
scalars, where TensorBoard's profile plugin finds it.

A workdir on an object store (`gs://...`) cannot take appends: metrics.jsonl, the
TensorBoard files (profiles too) and the W&B run id are kept in a local staging
directory, downloaded from the workdir when the logger starts (a run resumed on another
machine continues the same history) and uploaded whole at every checkpoint (`sync`) and
at the end.
"""

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid

import jax
import numpy as np
from tensorboardX import SummaryWriter

from saber_jax import files
from saber_jax.train import flops

COMPILE_EVENTS = ('/jax/core/compile/jaxpr_trace_duration',
                  '/jax/core/compile/jaxpr_to_mlir_module_duration',
                  '/jax/core/compile/backend_compile_duration')
EVAL_SHOWN = ('eval/loss', 'eval/rewards/accuracies')   # in the progress line
TIME_PARTS = ('input', 'compile', 'checkpoint', 'eval')
# What a URL workdir's logger stages locally (see the module docstring).
STAGED = ('metrics.jsonl', 'tensorboard', 'wandb')


class Clock:
  """Wall time per part of the loop since the last `take` (see the module docstring).
  Compile time comes from JAX's compile events, so it is counted wherever it happens and
  taken out of the part it happened in."""

  def __init__(self):
    self.start = time.perf_counter()
    self.parts = dict.fromkeys(TIME_PARTS, 0.0)
    self._compiling = 0.0        # compile seconds seen inside the current `part`
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **_):
    if event in COMPILE_EVENTS:
      self.parts['compile'] += duration
      self._compiling += duration

  @contextlib.contextmanager
  def part(self, name: str):
    start, self._compiling = time.perf_counter(), 0.0
    try:
      yield
    finally:
      self.parts[name] += max(time.perf_counter() - start - self._compiling, 0.0)

  def take(self) -> dict:
    """`time/...` seconds and goodput since the last take; starts a new window."""
    now = time.perf_counter()
    total = max(now - self.start, 1e-9)
    step = max(total - sum(self.parts.values()), 0.0)
    record = {f'time/{k}_s': v for k, v in self.parts.items()}
    record.update({'time/step_s': step, 'time/total_s': total, 'goodput': step / total})
    self.start, self.parts = now, dict.fromkeys(TIME_PARTS, 0.0)
    return record

  def close(self):
    jax.monitoring.unregister_event_duration_listener(self._on_event)


class Profile:
  """A jax.profiler trace of steps [start, start + count) (1-based), written under
  `directory` (plugins/profile/<run>/, what TensorBoard's profile plugin reads)."""

  def __init__(self, window, directory: str):
    start, count = (tuple(window) + (0, 0))[:2] if window else (0, 0)
    self.first, self.last, self.directory = int(start), int(start) + int(count) - 1, directory
    self.active = False

  def before(self, step: int):
    if self.first <= step <= self.last and not self.active:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, outputs):
    if self.active and step >= self.last:
      jax.block_until_ready(outputs)      # the traced steps' device work is in the trace
      self.stop()

  def stop(self):
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      print(f'profile of steps {self.first}-{self.last} written to {self.directory} '
            f'(tensorboard --logdir {os.path.dirname(self.directory)})', flush=True)


def _scalar(value):
  value = np.asarray(value)
  return value.item() if value.size == 1 else value.tolist()


def drop_lines_after(path: str, stage: str, step: int) -> None:
  """Rewrites metrics.jsonl (atomically) without the lines of `stage` after `step`."""
  if not os.path.exists(path):
    return
  with open(path, encoding='utf-8') as f:
    lines = [line for line in f if line.strip()]
  keep = [line for line in lines if not _after(line, stage, step)]
  if len(keep) == len(lines):
    return
  files.write_text(path, ''.join(line if line.endswith('\n') else line + '\n' for line in keep))


def _after(line: str, stage: str, step: int) -> bool:
  try:
    record = json.loads(line)
  except ValueError:
    return True      # a line cut short by a kill
  return record.get('stage') == stage and record.get('step', 0) > step


def _numeric(record: dict) -> dict:
  return {k: v for k, v in record.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool) and k != 'step'}


class WandbWriter:
  """One stage's metrics as a W&B run (`settings`: config.wandb: project, entity, name,
  mode), keyed `<stage>/<metric>` at the training step like the TensorBoard scalars."""

  def __init__(self, settings, workdir: str, stage: str, run_config: dict | None = None,
               local_dir: str | None = None):
    """local_dir: where the id file and W&B's own files go (the workdir when local)."""
    try:
      import wandb
    except ImportError:
      raise ImportError("config.wandb.project is set but wandb is not installed: "
                        "pip install 'saber_jax[wandb]'") from None
    local_dir = local_dir or workdir
    directory = os.path.join(local_dir, 'wandb')
    os.makedirs(directory, exist_ok=True)
    id_file = os.path.join(directory, f'{stage}.id')
    if os.path.exists(id_file):
      run_id = files.read_text(id_file).strip()
    else:
      run_id = uuid.uuid4().hex[:8]
      files.write_text(id_file, run_id + '\n')
    group = os.path.basename(files.absolute(workdir).rstrip('/'))
    name = settings.get('name') or f'{group}-{stage}'
    self.run = wandb.init(project=settings.project, entity=settings.get('entity') or None,
                          name=name, id=run_id, resume='allow', dir=local_dir,
                          mode=settings.get('mode') or None, config=run_config,
                          group=group, job_type=stage)
    self.stage = stage

  def write(self, step: int, record: dict):
    self.run.log({f'{self.stage}/{k}': v for k, v in _numeric(record).items()}, step=step)

  def close(self):
    self.run.finish()


class MetricLogger:

  def __init__(self, workdir: str, stage: str, total_steps: int, start_step: int = 0,
               wandb=None, run_config: dict | None = None):
    """start_step: the step the run starts (or resumes) from; lines of `stage` after it,
    logged by an earlier run killed before its next checkpoint, are dropped so the steps
    this run logs again appear once. wandb: config.wandb (off without a project)."""
    self.stage, self.total_steps = stage, total_steps
    self.enabled = jax.process_index() == 0
    self.start = self.last_time = time.time()
    self.last_step, self.tokens, self.flops = None, 0, 0.0
    self.peak_flops = flops.peak_flops()
    self.sums, self.count = {}, 0
    self.fill = np.zeros(4, np.int64)
    # The files are appended here: the workdir itself, or a local staging copy of a URL's.
    self.workdir = workdir
    self.remote = files.is_url(workdir)
    self.local_dir = tempfile.mkdtemp(prefix='saber-logs-') if self.remote else workdir
    if self.enabled:
      if self.remote:
        for name in STAGED:
          files.download(f'{workdir}/{name}', os.path.join(self.local_dir, name))
      os.makedirs(self.local_dir, exist_ok=True)
      drop_lines_after(os.path.join(self.local_dir, 'metrics.jsonl'), stage, start_step)
      self.jsonl = open(os.path.join(self.local_dir, 'metrics.jsonl'), 'a')
      self.tensorboard = SummaryWriter(os.path.join(self.local_dir, 'tensorboard', stage))
    self.wandb = None
    if self.enabled and wandb is not None and wandb.get('project'):
      self.wandb = WandbWriter(wandb, workdir, stage, run_config, local_dir=self.local_dir)

  def sync(self):
    """Uploads the staged files whole to a URL workdir (at checkpoints and at the end): a
    restart resumes from a checkpoint no newer than the history uploaded with it."""
    if not self.remote:
      return
    if self.enabled:
      self.jsonl.flush()
      self.tensorboard.flush()
    self._upload()

  def _upload(self):
    for name in STAGED if self.enabled else ('tensorboard',):
      if os.path.exists(os.path.join(self.local_dir, name)):
        files.upload(os.path.join(self.local_dir, name), f'{self.workdir}/{name}')

  def add(self, metrics: dict, tokens: int, model_flops: float, fill=None):
    """One step's metrics (host scalars), trained tokens and model FLOPs (of this
    process's batch) and fill counts (`batch.FILL_FIELDS` of the global batch);
    `write` logs their means and rates since the last write."""
    if fill is not None:
      self.fill += np.asarray(fill, np.int64)
    self.tokens += tokens
    self.flops += model_flops
    for key, value in metrics.items():
      self.sums[key] = self.sums.get(key, 0.0) + np.asarray(value, np.float64)
    self.count += 1

  def write(self, step: int, extra: dict) -> dict:
    """Log the mean metrics of the steps since the last write, plus `extra`, at `step`."""
    now = time.time()
    steps = step - (self.last_step if self.last_step is not None else step - 1)
    elapsed = max(now - self.last_time, 1e-9)
    means = {k: _scalar(v / max(self.count, 1)) for k, v in self.sums.items()}
    flops_per_device = self.flops / elapsed / jax.local_device_count()
    record = {'stage': self.stage, 'step': step, **means, **extra,
              'step_time_s': elapsed / max(steps, 1), 'tokens_per_s': self.tokens / elapsed,
              'model_flops_per_s_per_device': flops_per_device}
    if self.peak_flops:
      record['mfu'] = flops.mfu(flops_per_device, self.peak_flops)
    text_real, text_padded, media_real, media_padded = self.fill.tolist()
    if text_padded:
      record['data/text_fill'] = text_real / text_padded
      record['data/media_fill'] = media_real / max(media_padded, 1)
    self.last_time, self.last_step, self.tokens, self.flops = now, step, 0, 0.0
    self.sums, self.count, self.fill = {}, 0, np.zeros(4, np.int64)
    if not self.enabled:
      return record
    self.jsonl.write(json.dumps(record) + '\n')
    self.jsonl.flush()
    for key, value in _numeric(record).items():
      self.tensorboard.add_scalar(f'{self.stage}/{key}', value, step)
    if self.wandb is not None:
      self.wandb.write(step, record)
    eta = (self.total_steps - step) * record['step_time_s']
    utilisation = f'MFU {record["mfu"]:.1%}' if 'mfu' in record else (
        f'{flops_per_device / 1e9:.1f} GFLOP/s/device')
    fill = (f'fill text {record["data/text_fill"]:.0%} media {record["data/media_fill"]:.0%}  '
            if text_padded else '')
    held_out = ''.join(f'{k} {record[k]:.4f}  ' for k in EVAL_SHOWN if k in record)
    goodput = f'goodput {record["goodput"]:.0%}  ' if 'goodput' in record else ''
    print(f'[{self.stage}] step {step}/{self.total_steps}  loss {record["loss"]:.4f}  '
          f'{held_out}{record["tokens_per_s"]:.0f} tok/s  {utilisation}  {fill}{goodput}'
          f'{record["step_time_s"]:.2f} s/step  ETA {eta / 60:.1f} min', flush=True)
    return record

  def close(self):
    if self.enabled:
      self.jsonl.close()
      self.tensorboard.close()
    if self.wandb is not None:
      self.wandb.close()
    if self.remote:
      self._upload()
      shutil.rmtree(self.local_dir, ignore_errors=True)
