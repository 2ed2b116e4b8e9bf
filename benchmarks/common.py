"""Shared parts of the step benchmarks: the benchmark-sized thinker, a SABER-shaped batch,
the measured matmul peak, and running one side of a comparison in its own process.

Each measured side runs in its own worker process (`Worker` / `serve`), so its peak host
memory (`ru_maxrss`) is its own; the driver steps the workers in turn, so on a shared
machine both sides run under the same load.
"""

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from saber_jax.data.prompt import expand_placeholders
from saber_jax.models.config import AudioConfig, TextConfig, ThinkerConfig, VisionConfig

# The benchmark-sized thinker: the real 152K vocabulary, mel bins, patch and window
# geometry and token ids; an 8 x 512 decoder and 2-layer towers.
BENCH_CONFIG = ThinkerConfig(
    audio=AudioConfig(d_model=256, encoder_layers=2, encoder_attention_heads=4,
                      encoder_ffn_dim=1024, output_dim=512),
    vision=VisionConfig(depth=2, hidden_size=256, intermediate_size=512, num_heads=4,
                        fullatt_block_indexes=(1,), out_hidden_size=512),
    text=TextConfig(vocab_size=152064, hidden_size=512, intermediate_size=2048,
                    num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                    mrope_section=(8, 12, 12)))

RESPONSE_SEGMENTS = (1, 2, 3)   # visual evidence, acoustic evidence, reasoning


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """One SABER-like row per entry of `audio_frames`: a video of `video_grid` patches with
  its audio track interleaved (10 s of audio = 1000 mel frames; 8 frames at 224 x 224 =
  grid (4, 16, 16)), `prompt_tokens` of instruction text around it and a response of
  `response_tokens` trained tokens."""
  audio_frames: tuple[int, ...] = (1000, 968)
  video_grid: tuple[int, int, int] = (4, 16, 16)
  seconds_per_grid: float = 2.5             # 8 frames over 10 s
  prompt_tokens: int = 60
  response_tokens: int = 440


def processor_batch(config: ThinkerConfig, spec: BatchSpec = BatchSpec(), seed: int = 0) -> dict:
  """A processor-style numpy batch (right padded) with `labels` and `segments`.

  Text ids are random ordinary tokens; the media blocks are laid out as the
  Qwen2.5-Omni processor lays out a video with `use_audio_in_video`.
  """
  rng = np.random.default_rng(seed)
  v = config.vision
  text = lambda n: rng.integers(1000, 150000, n)
  rows, response_spans = [], []
  for frames in spec.audio_frames:
    media = expand_placeholders(audio_lengths=[frames], video_grids=[spec.video_grid],
                                video_second_per_grid=[spec.seconds_per_grid],
                                use_audio_in_video=True)
    before = spec.prompt_tokens * 2 // 3
    prompt = np.concatenate([text(before), media, text(spec.prompt_tokens - before)])
    rows.append(np.concatenate([prompt, text(spec.response_tokens)]))
    response_spans.append((len(prompt), len(rows[-1])))
  length = max(map(len, rows))
  input_ids = np.zeros((len(rows), length), np.int64)
  attention_mask = np.zeros_like(input_ids)
  labels = np.full((len(rows), length), -100, np.int64)
  segments = np.zeros_like(input_ids)
  for i, (ids, (start, stop)) in enumerate(zip(rows, response_spans)):
    input_ids[i, :len(ids)] = ids
    attention_mask[i, :len(ids)] = 1
    labels[i, start:stop] = ids[start:stop]
    segments[i, start:stop] = np.repeat(RESPONSE_SEGMENTS, -(-(stop - start) // 3))[:stop - start]
  max_frames = max(spec.audio_frames)
  features = rng.standard_normal((len(rows), config.audio.num_mel_bins, max_frames))
  feature_mask = np.arange(max_frames)[None] < np.asarray(spec.audio_frames)[:, None]
  patches = int(np.prod(spec.video_grid))
  return dict(
      input_ids=input_ids, attention_mask=attention_mask,
      input_features=features.astype(np.float32),
      feature_attention_mask=feature_mask.astype(np.int64),
      pixel_values_videos=rng.standard_normal(
          (patches * len(rows), v.patch_dim)).astype(np.float32),
      video_grid_thw=np.array([spec.video_grid] * len(rows)),
      video_second_per_grid=np.full(len(rows), spec.seconds_per_grid, np.float32),
      use_audio_in_video=True, labels=labels, segments=segments)


def jax_batch(model_config: ThinkerConfig, raw: dict) -> dict:
  """The train step's batch of a `processor_batch`: the thinker's `model_inputs` plus
  int32 labels and segments."""
  from saber_jax.models.thinker import model_inputs
  raw = dict(raw)
  labels, segments = raw.pop('labels'), raw.pop('segments')
  return dict(model_inputs(model_config, raw), labels=labels.astype(np.int32),
              segments=segments.astype(np.int32))


def save_batch(path: str, batch: dict):
  np.savez(path, **{k: np.asarray(v) for k, v in batch.items()})


def load_batch(path: str) -> dict:
  with np.load(path) as data:
    batch = {k: data[k] for k in data.files}
  batch['use_audio_in_video'] = bool(batch['use_audio_in_video'])
  return batch


def save_hf_model(config: ThinkerConfig, path: str, seed: int = 0):
  """A randomly initialised transformers thinker of `config`, saved with save_pretrained:
  the weights both sides load (transformers directly, saber_jax through `convert.load_hf`)."""
  import torch
  from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration
  torch.manual_seed(seed)
  model = Qwen2_5OmniThinkerForConditionalGeneration(Qwen2_5OmniThinkerConfig(**config.to_hf()))
  model.save_pretrained(path)


def matmul_peak(n: int = 2048, dtype: str = 'float32', repeats: int = 10) -> float:
  """FLOP/s of the best of `repeats` jitted `jnp.dot` of two n x n matrices."""
  import jax
  import jax.numpy as jnp
  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.random.normal(k, (n, n), dtype) for k in keys)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  best = min(_seconds(lambda: dot(a, b).block_until_ready()) for _ in range(repeats))
  return 2 * n ** 3 / best


def _seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def time_steps(step, warmup: int, steps: int) -> list[float]:
  """Seconds of each of `steps` calls of `step()` (which must block) after `warmup` calls."""
  for _ in range(warmup):
    step()
  return [_seconds(step) for _ in range(steps)]


def max_rss_bytes() -> int:
  """Peak resident memory of this process (Linux reports kilobytes)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def available_memory_bytes() -> int:
  """MemAvailable of /proc/meminfo (what can be allocated without swapping)."""
  with open('/proc/meminfo') as f:
    for line in f:
      if line.startswith('MemAvailable:'):
        return int(line.split()[1]) * 1024
  raise RuntimeError('no MemAvailable in /proc/meminfo')


# ----------------------------------------------------------------------------- workers
#
# A measured side runs in a worker process that the driver steps line by line, so two
# sides can take turns step by step and see the same load on a shared machine.
#   worker -> 'READY {json}' after its setup; driver -> 'STEP'; worker -> 'STEP {json}'
#   with the step's wall and CPU seconds; driver -> 'QUIT'; worker -> 'RESULT {json}' with
#   its peak resident memory.


def full_fp32_matmuls():
  """float32 matmuls in full float32 (on GPUs JAX would otherwise use TF32), as the
  PyTorch side runs them: the two sides compute the same thing. CPUs are left as they are."""
  import jax
  if jax.default_backend() != 'cpu':
    jax.config.update('jax_default_matmul_precision', 'highest')


def setup_peak():
  """The peak worker: each STEP measures the fp32 `jnp.dot` peak (best of 5) at that
  moment, next to the measured sides' steps: 2048^2 on a CPU, 8192^2 on a GPU."""
  import jax
  full_fp32_matmuls()
  n = 2048 if jax.default_backend() == 'cpu' else 8192
  matmul_peak(n, 'float32', repeats=2)
  return {}, lambda: dict(peak_flops=matmul_peak(n, 'float32', repeats=5))


def serve(setup):
  """The worker side: `setup()` returns (info dict, step function -> dict of metrics)."""
  info, step = setup()
  _reply('READY', info)
  for line in sys.stdin:
    command = line.strip()
    if command == 'STEP':
      wall, cpu = time.perf_counter(), cpu_seconds()
      metrics = step() or {}
      _reply('STEP', dict(metrics, wall_s=time.perf_counter() - wall,
                          cpu_s=cpu_seconds() - cpu))
    elif command == 'QUIT':
      _reply('RESULT', dict(max_rss_bytes=max_rss_bytes()))
      return


def _reply(tag: str, payload: dict):
  print(f'{tag} {json.dumps(payload)}', flush=True)


class Worker:
  """The driver's handle on one worker process (`python script *args`)."""

  def __init__(self, script: str, *args: str):
    self.name = ' '.join(args)
    self.stderr = tempfile.TemporaryFile(mode='w+')
    self.proc = subprocess.Popen([sys.executable, script, *args], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                 # The sides share one GPU: JAX must not take 75% of it.
                                 env=dict(os.environ, PYTHONUNBUFFERED='1',
                                          XLA_PYTHON_CLIENT_PREALLOCATE='false'))
    self.info = self._read('READY')

  def step(self) -> dict:
    self._send('STEP')
    return self._read('STEP')

  def close(self) -> dict:
    self._send('QUIT')
    result = self._read('RESULT')
    self.proc.wait()
    self.stderr.close()
    return result

  def kill(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()

  def _send(self, command: str):
    self.proc.stdin.write(command + '\n')
    self.proc.stdin.flush()

  def _read(self, tag: str) -> dict:
    for line in self.proc.stdout:          # libraries may print too: look for the tag
      if line.startswith(tag + ' '):
        return json.loads(line[len(tag) + 1:])
    self.proc.wait()
    self.stderr.seek(0)
    raise RuntimeError(f'worker {self.name!r} exited ({self.proc.returncode}) before '
                       f'{tag}:\n{self.stderr.read()[-4000:]}')


def run_repeat(script: str, sides: dict[str, list[str]], steps: int, repeat: int,
               lockstep: bool) -> dict:
  """One repeat: fresh workers (`script --side=NAME *args` per side, and `--side=peak`),
  then `steps` rounds of one step per side (order alternating) with the matmul peak
  measured next to them. `lockstep`: all sides alive, taking turns step by step; else
  all of one side's steps, then the next side's. Returns {rounds: [{side: step reply,
  'peak_' + side: FLOP/s}], infos: {side: READY info + RESULT}, lockstep}."""
  names = list(sides) if repeat % 2 == 0 else list(sides)[::-1]
  rounds = [dict() for _ in range(steps)]
  infos, started = {}, []

  def start(side, args=()):
    started.append(Worker(script, f'--side={side}', *args))
    return started[-1]

  def finish(side, worker):
    infos[side] = dict(worker.info, **worker.close())
  try:
    peak = start('peak')
    if lockstep:
      workers = {side: start(side, sides[side]) for side in names}
      for i, measured in enumerate(rounds):
        for side in (names if i % 2 == 0 else names[::-1]):
          measured[side] = workers[side].step()
        flops = peak.step()['peak_flops']
        measured.update({f'peak_{side}': flops for side in names})
      for side, worker in workers.items():
        finish(side, worker)
    else:
      for side in names:
        worker = start(side, sides[side])
        for measured in rounds:
          measured[side] = worker.step()
          measured[f'peak_{side}'] = peak.step()['peak_flops']
        finish(side, worker)
    peak.close()
  finally:
    for worker in started:
      worker.kill()
  print(f'repeat {repeat + 1} ({"lockstep" if lockstep else "sequential"}): ' + '; '.join(
      f'{side} ' + ' '.join(f'{r[side]["wall_s"]:.2f}' for r in rounds) + ' s'
      for side in sides) + '; peak ' + ' '.join(f'{r[f"peak_{names[0]}"] / 1e9:.0f}'
                                                for r in rounds) + ' GFLOP/s',
        file=sys.stderr, flush=True)
  return dict(rounds=rounds, infos=infos, lockstep=lockstep)


def median(values) -> float:
  return float(statistics.median(values))


def gib(num_bytes: float) -> float:
  return num_bytes / 2 ** 30


def cpu_model() -> str:
  """lscpu's model name, with the family/model numbers (a VM's name may say only 'AMD
  EPYC': family 25 is Zen 3/4, 26 Zen 5) and whether the CPU has AVX-512 bf16."""
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, timeout=10).stdout
  except (OSError, subprocess.SubprocessError):
    return 'unknown CPU'
  fields = dict(line.split(':', 1) for line in out.splitlines() if ':' in line)
  get = lambda key: fields.get(key, '?').strip()
  bf16 = 'avx512_bf16' in get('Flags').split()
  return (f"{get('Model name')} (family {get('CPU family')}, model {get('Model')}"
          f"{', AVX-512 bf16' if bf16 else ''})")


def machine() -> str:
  import jax
  device = jax.devices()[0]
  kind = cpu_model() if device.platform == 'cpu' else device.device_kind
  return f'{kind}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}'


def fresh_state(trainable, frozen, optimizer):
  """A train state at step 0, unsharded (the trainer builds its own, sharded)."""
  import jax.numpy as jnp
  from saber_jax.train import steps
  return steps.TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                          opt_state=optimizer.init(trainable))
