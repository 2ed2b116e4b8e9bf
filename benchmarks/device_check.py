"""One prepared check of a GPU, for the few minutes one is lent: every GPU figure the
README still lacks, through the training and sampling code paths, in one command.

  python benchmarks/device_check.py --out DIR [--budget_s 480] [--sections a,b]
  python benchmarks/device_check.py --out DIR --smoke        # tiny shapes on CPU (CI)

Sections (each in its own process on the first GPU only, so its allocator's peak is its
own; run in this order until `--budget_s` is spent):

* `sed_lora_7b` — the full-depth 7B thinker (random weights, bf16 compute, frozen weights
  stored in bf16, LoRA rank 8 adapters in fp32 with AdamW, remat 'full', cuDNN attention),
  one SED step on 4 x 4096 text tokens. MFU counts the frozen weights' backward through
  the activations but not their weight gradients (`flops.step_flops(trainable='lora')`).
* `dpo_7b_lora` — CA-DPO on SABER-shaped pairs (`dpo_step.pair_batch`: 20 s clip, 40
  frames, answers of 300 and 450 tokens) on the same 7B LoRA setup, cuDNN attention:
  the shared-prompt row `[prompt | chosen | rejected]` (pair rows on cuDNN: two gathered
  causal rows, `text.PairRows`) against two rows per pair, stepped in turn; the speedup
  is the median of the paired ratios.
* `decode_7b` — `saber_jax.generate.generate` (what `mode=generate` runs) on the 7B in
  bf16: 8 prompts, k = 10 samples each at temperature 0.8, 512 new tokens. Output tokens/s
  of the decoding (a 1-token run's time, the prefill, taken off) and the fraction of the
  HBM roofline: per step the decoder's weights and the whole KV cache are read, over the
  bandwidth of a measured large reduction (and over the vendor's figure).
* `sed_slice_full` — the README's 7B-wide 8-layer slice trained in full (LLM, fp32 master
  weights, `train_step.slice_config`), 4 x 4096 tokens, cuDNN: compare with the H200 table.

Every training section reports step time, tokens/s, model FLOPs, MFU against the vendor's
dense bf16 peak (`flops.peak_flops`) and a measured 8192^2 bf16 matmul, and memory twice:
XLA's analysis of the compiled step (arguments, outputs, temporaries, generated code) and
the allocator's `memory_stats()` (bytes in use once the state is placed, peak after the
compile, peak after the steps), so the gap between the two has its parts named.

Writes DIR/device_check.json (all sections, with the device and software versions) and
DIR/device_check.md (a short table), and prints the table. The device is checked before
anything else: a GPU (one is used) with enough memory, unless `--smoke`.
"""

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time

import numpy as np

import common

SECTIONS = ('sed_lora_7b', 'dpo_7b_lora', 'decode_7b', 'sed_slice_full')
MIN_GPU_GIB = 70                 # the 7B LoRA sections need about this much (an 80 GB H100)
LORA_RANK = 8
VENDOR_HBM_BYTES_PER_S = (('H200', 4.8e12), ('H100', 3.35e12), ('A100', 2.0e12))


@dataclasses.dataclass(frozen=True)
class Shapes:
  rows: int = 4                  # SED rows per step
  seq_len: int = 4096
  slice_layers: int = 8
  pairs: int = 4                 # CA-DPO pairs per step
  prompts: int = 8               # decoding
  samples: int = 10
  new_tokens: int = 512
  prompt_len: int = 256
  steps: int = 3                 # timed steps (after a warm-up)


SMOKE = Shapes(rows=2, seq_len=128, slice_layers=2, pairs=1, prompts=2, samples=2,
               new_tokens=8, prompt_len=16, steps=1)


# ----------------------------------------------------------------------------- models


def _seven_b(smoke: bool, remat: str = 'full'):
  """The full-depth 7B thinker in bf16 (weights stored in bf16, for LoRA and decoding), or
  for --smoke the benchmark thinker cut to 2 x 128 (real vocabulary and media geometry)."""
  from saber_jax.models.config import ThinkerConfig
  if smoke:
    c = common.BENCH_CONFIG
    return dataclasses.replace(
        c, text=dataclasses.replace(c.text, num_hidden_layers=2, hidden_size=128,
                                    intermediate_size=256, num_attention_heads=4,
                                    num_key_value_heads=2, mrope_section=(4, 6, 6)),
        audio=dataclasses.replace(c.audio, output_dim=128),
        vision=dataclasses.replace(c.vision, out_hidden_size=128),
        dtype='bfloat16', param_dtype='bfloat16', remat=remat, attention='xla')
  return ThinkerConfig.qwen2_5_omni_7b(dtype='bfloat16', param_dtype='bfloat16', remat=remat,
                                       attention='cudnn')


def _slice(smoke: bool, layers: int):
  import train_step
  if smoke:
    return dataclasses.replace(_seven_b(True), param_dtype='float32')
  return dataclasses.replace(train_step.slice_config(layers, 'full'), attention='cudnn')


# ----------------------------------------------------------------------------- measuring


def _memory_stats() -> dict:
  """The allocator's figures of device 0 (empty on a CPU)."""
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  return {k: stats[k] for k in ('bytes_in_use', 'peak_bytes_in_use', 'bytes_limit')
          if k in stats}


def _xla_memory(compiled) -> dict:
  m = compiled.memory_analysis()
  gib = lambda n: round(common.gib(n), 3)
  return dict(arguments_gib=gib(m.argument_size_in_bytes), outputs_gib=gib(m.output_size_in_bytes),
              aliased_gib=gib(m.alias_size_in_bytes), temporaries_gib=gib(m.temp_size_in_bytes),
              generated_code_gib=gib(m.generated_code_size_in_bytes),
              total_gib=gib(m.argument_size_in_bytes + m.output_size_in_bytes
                            - m.alias_size_in_bytes + m.temp_size_in_bytes))


def _allocator(placed: dict, compiled: dict, stepped: dict) -> dict:
  """The allocator's bytes at three moments, in GiB: once the state and batch are placed,
  the peak after compiling (autotuning buffers live there), the peak after the steps."""
  gib = lambda d, k: round(common.gib(d[k]), 3) if k in d else None
  return dict(in_use_placed_gib=gib(placed, 'bytes_in_use'),
              peak_after_compile_gib=gib(compiled, 'peak_bytes_in_use'),
              peak_after_steps_gib=gib(stepped, 'peak_bytes_in_use'),
              limit_gib=gib(stepped, 'bytes_limit'))


def _peaks(smoke: bool) -> dict:
  """The vendor's dense bf16 peak of device 0 and a measured bf16 matmul's FLOP/s."""
  from saber_jax.train import flops
  return dict(vendor_peak_flops=flops.peak_flops(),
              measured_peak_flops=common.matmul_peak(256 if smoke else 8192, 'bfloat16'))


def _rates(model_flops: float, step_s: float, tokens: int, peaks: dict) -> dict:
  vendor, measured = peaks['vendor_peak_flops'], peaks['measured_peak_flops']
  return dict(step_s=step_s, tokens_per_s=tokens / step_s, model_flops_per_step=model_flops,
              mfu=model_flops / step_s / vendor if vendor else None,
              mfu_measured_peak=model_flops / step_s / measured)


# ----------------------------------------------------------------------------- training


def _lora_state(model_config, key):
  """(trainable, frozen, lora_config): LoRA adapters over the bf16 base."""
  import flax.linen as nn
  import jax
  import ml_collections
  from saber_jax.models.thinker import init_params
  from saber_jax.train import lora, steps
  params = jax.jit(lambda k: nn.unbox(init_params(model_config, k)))(key)
  adapters = jax.jit(functools.partial(lora.init_lora, rank=LORA_RANK))(jax.random.key(1), params)
  trainable, frozen = steps.split_params(params, 'lora', adapters)
  return trainable, frozen, ml_collections.ConfigDict(dict(rank=LORA_RANK, alpha=2.0 * LORA_RANK))


def _compiled_step(loss_fn, state, frozen, batch):
  """The train step compiled with the frozen params as an argument of their own, not in
  the donated state: the DPO variants share one copy of the 7B base."""
  import jax
  from saber_jax.train import steps

  def step(state, frozen, batch):
    new, metrics = steps.train_step(state.replace(frozen=frozen), batch, loss_fn=loss_fn,
                                    optimizer=_optimizer(), skip_nonfinite=False)
    return new.replace(frozen={}), metrics
  return jax.jit(step, donate_argnums=0).lower(state, frozen, batch).compile()


def _optimizer():
  import train_step
  return train_step._optimizer()


class _Stepper:
  """A compiled, state-donating step and its state; `()` runs one step and waits."""

  def __init__(self, compiled, state, frozen, batch):
    self.compiled, self.state, self.frozen, self.batch = compiled, state, frozen, batch
    self.loss = None

  def __call__(self):
    import jax
    self.state, metrics = self.compiled(self.state, self.frozen, self.batch)
    self.loss = float(jax.block_until_ready(metrics['loss']))


def _train(model_config, batch, trainable_mode: str, loss, shapes: Shapes, peaks: dict,
           state_parts) -> dict:
  """One training section: place the state, compile, warm up, time `shapes.steps` steps."""
  import jax
  from saber_jax.train import flops
  trainable, frozen = state_parts
  state = common.fresh_state(trainable, {}, _optimizer())
  device_batch = jax.device_put(batch)
  placed = _memory_stats()
  compiled = _compiled_step(loss, state, frozen, device_batch)
  after_compile = _memory_stats()
  run = _Stepper(compiled, state, frozen, device_batch)
  run()                                              # first step (warm-up)
  times = common.time_steps(run, warmup=0, steps=shapes.steps)
  model_flops = flops.step_flops(model_config, batch, trainable=trainable_mode)
  tokens = int(np.asarray(batch['attention_mask']).sum())
  return dict(rows=int(batch['input_ids'].shape[0]), row_length=int(batch['input_ids'].shape[1]),
              tokens=tokens, times=times, loss=run.loss,
              **_rates(model_flops, common.median(times), tokens, peaks),
              xla_memory=_xla_memory(compiled),
              allocator=_allocator(placed, after_compile, _memory_stats()))


def sed_lora_7b(shapes: Shapes, smoke: bool) -> dict:
  import jax
  import train_step
  from saber_jax.train import steps
  model_config = _seven_b(smoke)
  batch = train_step.slice_batch(model_config, shapes.rows, shapes.seq_len)
  trainable, frozen, lora_config = _lora_state(model_config, jax.random.key(0))
  loss = functools.partial(steps.sft_loss, model_config=model_config, lora_config=lora_config)
  return dict(config='7B thinker, LoRA rank 8, frozen weights bf16, bf16 compute',
              attention=model_config.attention, remat=model_config.remat,
              **_train(model_config, batch, 'lora', loss, shapes, _peaks(smoke),
                       (trainable, frozen)))


def sed_slice_full(shapes: Shapes, smoke: bool) -> dict:
  import flax.linen as nn
  import jax
  import train_step
  from saber_jax.models.thinker import init_params
  from saber_jax.train import steps
  model_config = _slice(smoke, shapes.slice_layers)
  batch = train_step.slice_batch(model_config, shapes.rows, shapes.seq_len)
  params = jax.jit(lambda k: nn.unbox(init_params(model_config, k)))(jax.random.key(0))
  loss = functools.partial(steps.sft_loss, model_config=model_config)
  return dict(config=f'7B-wide {shapes.slice_layers}-layer slice, LLM trained in full, fp32 '
                     'master weights, bf16 compute', layers=shapes.slice_layers,
              attention=model_config.attention, remat=model_config.remat,
              **_train(model_config, batch, 'llm', loss, shapes, _peaks(smoke),
                       steps.split_params(params, 'llm')))


def dpo_7b_lora(shapes: Shapes, smoke: bool) -> dict:
  """The shared-prompt pair row against two rows per pair, same pairs, stepped in turn."""
  import jax
  import jax.numpy as jnp
  import dpo_step
  from saber_jax.train import flops
  from saber_jax.train import steps
  model_config = _seven_b(smoke)
  trainable, frozen, lora_config = _lora_state(model_config, jax.random.key(0))
  loss = functools.partial(steps.dpo_loss, model_config=model_config,
                           dpo_config=dpo_step._dpo_config(), lora_config=lora_config)
  pair_shapes = (dict(clip_mel_frames=200, video_grid=(2, 4, 4), prompt_tokens=12,
                      answer_tokens=(9, 14), length_step=64) if smoke else {})
  peaks = _peaks(smoke)
  out, runs = dict(config='7B thinker, LoRA rank 8, frozen weights bf16, bf16 compute',
                   attention=model_config.attention, pairs=shapes.pairs), {}
  for variant in ('shared', 'two_rows'):
    batch = dpo_step.pair_batch(model_config, shapes.pairs, shared=variant == 'shared',
                                **pair_shapes)
    batch = dict(batch, ref_chosen_logps=np.zeros(shapes.pairs, np.float32),
                 ref_rejected_logps=np.zeros(shapes.pairs, np.float32))
    # Each variant its own copy of the (small) trainable tree: the steps donate it.
    state = common.fresh_state(jax.tree.map(jnp.copy, trainable), {}, _optimizer())
    device_batch = jax.device_put(batch)
    compiled = _compiled_step(loss, state, frozen, device_batch)
    runs[variant] = _Stepper(compiled, state, frozen, device_batch)
    runs[variant]()
    out[variant] = dict(rows=int(batch['input_ids'].shape[0]),
                        row_length=int(batch['input_ids'].shape[1]),
                        tokens=int(batch['attention_mask'].sum()),
                        model_flops_per_step=flops.step_flops(model_config, batch,
                                                              trainable='lora'),
                        first_loss=runs[variant].loss, xla_memory=_xla_memory(compiled))
  times = {v: [] for v in runs}
  for i in range(shapes.steps + 1):                  # the first round warms up
    for variant in (runs if i % 2 == 0 else list(runs)[::-1]):
      start = time.perf_counter()
      runs[variant]()
      if i:
        times[variant].append(time.perf_counter() - start)
  for variant, t in times.items():
    r = out[variant]
    r.update(times=t, **_rates(r['model_flops_per_step'], common.median(t), r['tokens'], peaks))
  out['shared_prompt_speedup'] = common.median(
      [b / a for a, b in zip(times['shared'], times['two_rows'])])
  out['allocator'] = _allocator({}, {}, _memory_stats())
  return out


# ----------------------------------------------------------------------------- decoding


def _hbm_bandwidth(smoke: bool) -> float:
  """Bytes/s of a jitted sum over a large bf16 array (read once), best of 5."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones((2 ** 20 if smoke else 2 ** 31,), jnp.bfloat16)
  total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
  total(x).block_until_ready()
  best = min(common.time_steps(lambda: total(x).block_until_ready(), 0, 5))
  return x.nbytes / best


def decode_7b(shapes: Shapes, smoke: bool) -> dict:
  import flax.linen as nn
  import jax
  from saber_jax.decode import generate
  from saber_jax.models.thinker import init_params
  model_config = _seven_b(smoke)
  params = jax.jit(lambda k: nn.unbox(init_params(model_config, k)))(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = dict(input_ids=rng.integers(1000, 150000, (shapes.prompts, shapes.prompt_len)),
               attention_mask=np.ones((shapes.prompts, shapes.prompt_len), np.int64))
  # No end-of-sequence id ends a row early: every row decodes all its tokens.
  run = lambda new: generate(model_config, params, batch, max_new_tokens=new, temperature=0.8,
                             num_samples=shapes.samples, eos_token_ids=(), compact_rows=False)
  seconds = {}
  for new in (1, shapes.new_tokens):
    run(new)                                          # compile
    seconds[new] = min(common.time_steps(lambda: run(new), 0, 2))
  decode_s = seconds[shapes.new_tokens] - seconds[1]
  rows, steps = shapes.prompts * shapes.samples, shapes.new_tokens - 1
  t = model_config.text
  itemsize = np.dtype(jax.numpy.bfloat16).itemsize
  text = params['text']
  weights = sum(x.nbytes for k, x in jax.tree_util.tree_leaves_with_path(text)
                if 'embed_tokens' not in jax.tree_util.keystr(k))     # the embedding is gathered
  if t.tie_word_embeddings:
    weights += text['embed_tokens']['embedding'].nbytes
  cache = (2 * t.num_hidden_layers * rows * (shapes.prompt_len + shapes.new_tokens)
           * t.num_key_value_heads * t.head_dim * itemsize)
  bandwidth = _hbm_bandwidth(smoke)
  kind = jax.devices()[0].device_kind
  vendor = next((bw for name, bw in VENDOR_HBM_BYTES_PER_S if name in kind), None)
  achieved = (weights + cache) * steps / decode_s
  return dict(prompts=shapes.prompts, samples=shapes.samples, new_tokens=shapes.new_tokens,
              prompt_len=shapes.prompt_len, prefill_s=seconds[1],
              total_s=seconds[shapes.new_tokens], decode_s=decode_s,
              output_tokens_per_s=rows * steps / decode_s, step_ms=1e3 * decode_s / steps,
              weight_bytes_per_step=weights, kv_cache_bytes_per_step=cache,
              measured_hbm_bytes_per_s=bandwidth, vendor_hbm_bytes_per_s=vendor,
              roofline_fraction=achieved / bandwidth,
              roofline_fraction_vendor=achieved / vendor if vendor else None,
              allocator=_allocator({}, {}, _memory_stats()))


# ----------------------------------------------------------------------------- driver


def device_info() -> dict:
  """What this process sees: device 0's platform, kind and memory, the devices visible."""
  import jax
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  return dict(platform=device.platform, device_kind=device.device_kind,
              visible_devices=len(jax.devices()), jax=jax.__version__,
              memory_gib=round(common.gib(stats['bytes_limit']), 1) if stats else None)


def check_device(info: dict):
  """Exits naming what is wrong unless the device is a GPU with MIN_GPU_GIB of memory."""
  if info['platform'] != 'gpu':
    raise SystemExit(f"device_check: needs a GPU, found {info['platform']} "
                     f"({info['device_kind']}); --smoke runs tiny shapes on a CPU")
  if info['memory_gib'] is not None and info['memory_gib'] < MIN_GPU_GIB:
    raise SystemExit(f"device_check: {info['device_kind']} has {info['memory_gib']} GiB; the "
                     f'7B sections need about {MIN_GPU_GIB}')


def run_section(name: str, smoke: bool) -> dict:
  fn = dict(sed_lora_7b=sed_lora_7b, sed_slice_full=sed_slice_full, dpo_7b_lora=dpo_7b_lora,
            decode_7b=decode_7b)[name]
  start = time.perf_counter()
  result = fn(SMOKE if smoke else Shapes(), smoke)
  return dict(result, wall_s=time.perf_counter() - start)


def _child(args, section: str, timeout: float) -> dict:
  """`section` in its own process on the first GPU; its JSON, or what went wrong."""
  path = os.path.join(args.out, f'{section}.json')
  env = dict(os.environ, PYTHONUNBUFFERED='1',
             CUDA_VISIBLE_DEVICES=os.environ.get('CUDA_VISIBLE_DEVICES', '0').split(',')[0])
  # JAX takes 75% of the GPU by default; the 7B LoRA DPO section wants more.
  env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.95')
  command = [sys.executable, __file__, f'--out={args.out}', f'--section={section}']
  command += ['--smoke'] if args.smoke else []
  try:
    proc = subprocess.run(command, env=env, timeout=timeout, capture_output=True, text=True)
  except subprocess.TimeoutExpired:
    return dict(error=f'over the remaining budget ({timeout:.0f} s)')
  if proc.returncode != 0:
    return dict(error=f'exit {proc.returncode}: {proc.stderr[-3000:]}')
  with open(path) as f:
    return json.load(f)


def table(result: dict) -> str:
  d, s = result['device'], result['sections']
  lines = [f"device check: {d.get('device_kind')} ({d.get('platform')}), jax {d.get('jax')}"
           + (' [smoke: tiny shapes]' if result['smoke'] else ''), '',
           '| section | step | tokens/s | MFU (vendor peak) | XLA total (temps) | '
           'allocator peak |', '|---|---|---|---|---|---|']
  pct = lambda x: f'{100 * x:.1f}%' if x is not None else '-'

  def row(label, r, allocator):
    m = r['xla_memory']
    lines.append(f"| {label} | {r['step_s']:.3f} s | {r['tokens_per_s']:.0f} | {pct(r['mfu'])} | "
                 f"{m['total_gib']:.2f} GiB ({m['temporaries_gib']:.2f}) | "
                 f"{allocator.get('peak_after_steps_gib')} GiB |")
  for name in ('sed_lora_7b', 'sed_slice_full'):
    if name in s and 'error' not in s[name]:
      row(name, s[name], s[name]['allocator'])
  if 'dpo_7b_lora' in s and 'error' not in s['dpo_7b_lora']:
    for v in ('shared', 'two_rows'):
      row(f'dpo_7b_lora {v}', s['dpo_7b_lora'][v], s['dpo_7b_lora']['allocator'])
    lines.append(f"\nshared-prompt pair row: {s['dpo_7b_lora']['shared_prompt_speedup']:.2f}x "
                 'the two-row step')
  if 'decode_7b' in s and 'error' not in s['decode_7b']:
    r = s['decode_7b']
    lines.append(f"decoding ({r['prompts']} prompts x k={r['samples']}, {r['new_tokens']} new "
                 f"tokens): {r['output_tokens_per_s']:.0f} tokens/s, {r['step_ms']:.2f} ms/step, "
                 f"{pct(r['roofline_fraction'])} of the measured HBM roofline "
                 f"({pct(r['roofline_fraction_vendor'])} of the vendor's)")
  for name, r in s.items():
    if 'error' in r:
      lines.append(f"{name}: NOT MEASURED: {r['error'].splitlines()[-1] if r['error'] else ''}")
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='directory for the JSON and the table')
  parser.add_argument('--smoke', action='store_true', help='tiny shapes on a CPU (CI)')
  parser.add_argument('--budget_s', type=float, default=480)
  parser.add_argument('--sections', default=','.join(SECTIONS))
  parser.add_argument('--section', help=argparse.SUPPRESS)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  if args.section:                                   # a child: one section, one JSON
    result = device_info() if args.section == 'device' else run_section(args.section, args.smoke)
    with open(os.path.join(args.out, f'{args.section}.json'), 'w') as f:
      json.dump(result, f)
    return
  sections = [s for s in args.sections.split(',') if s]
  if set(sections) - set(SECTIONS):
    parser.error(f'--sections: choose from {SECTIONS}')
  start = time.perf_counter()
  if args.smoke:            # one process: tiny shapes, no GPU peaks to keep apart
    os.environ['CUDA_VISIBLE_DEVICES'] = ''
    result = dict(device=device_info(), smoke=True,
                  sections={name: run_section(name, True) for name in sections})
  else:
    device = _child(args, 'device', 120)
    if 'error' in device:
      raise SystemExit(f"device_check: could not read the device: {device['error']}")
    check_device(device)
    result = dict(device=device, smoke=False, sections={})
    for name in sections:
      left = args.budget_s - (time.perf_counter() - start)
      result['sections'][name] = (_child(args, name, left) if left > 30
                                  else dict(error=f'no budget left ({left:.0f} s)'))
      print(f'{name}: {time.perf_counter() - start:.0f} s', file=sys.stderr, flush=True)
  result['wall_s'] = time.perf_counter() - start
  with open(os.path.join(args.out, 'device_check.json'), 'w') as f:
    json.dump(result, f, indent=1)
  text = table(result)
  with open(os.path.join(args.out, 'device_check.md'), 'w') as f:
    f.write(text + '\n')
  print(text)


if __name__ == '__main__':
  main()
