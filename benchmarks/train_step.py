"""One SED train step (forward, backward, AdamW update): saber_jax against transformers.

  python benchmarks/train_step.py [--repeats 3] [--steps 3] [--json]
  python benchmarks/train_step.py --config=7b-llm-slice [--attention auto|cudnn|xla]

`--config=bench` (default): the benchmark-sized thinker of `common.BENCH_CONFIG` (8 x 512
decoder, the real 152K vocabulary, 2-layer audio and vision towers) on a batch of 2 rows,
each a 10 s clip (1000 mel frames) with 8 video frames at 224 x 224 and ~500 text tokens,
the response tokens trained (token-mean NLL, Eq. 2). Both sides load the same weights (a
transformers checkpoint; saber_jax converts it with `convert.load_hf`), see the same
inputs and run AdamW (lr 1e-5, weight decay 0.1 except biases and norms, global-norm
clipping at 1): saber_jax as one jitted, state-donating step in fp32, transformers in
eager PyTorch fp32 (sdpa attention) with torch.optim.AdamW (`--torch_compile`: also under
`torch.compile`, inductor, as a third side). Their first-step losses must
agree, which checks that the two sides compute the same thing. On a GPU both sides run
there (float32 matmuls in full float32, no TF32) and each also reports its allocator's
peak GPU memory.

Each side runs in its own worker process (peak host memory is that process's `ru_maxrss`,
loading included) and the driver steps them in turn ("lockstep": one step of saber_jax,
one of transformers, order alternating, with the fp32 `jnp.dot` peak (2048^2; 8192^2 on
a GPU) measured next to them), so on a shared machine both sides see the same load; when
free memory does not allow both workers at once, each runs its steps in turn
(`"lockstep": false`). Each
worker runs its first step (compilation for saber_jax; the losses are compared) and one
warm-up step before the timed ones. Times are medians over a repeat's steps, then the
median over `--repeats` fresh pairs of workers; `paired_speedup` is the median of the
per-step ratios. Tokens are the valid (non-padding) tokens of the batch; `mfu` is model
FLOPs (`saber_jax.train.flops.step_flops`) per second over the measured peak, `hfu` the same
with what the step really executes (`hardware=True`). Defaults: remat 'dots', loss chunks
of 512 positions (`--remat`, `--chunk_size`).

`--config=7b-llm-slice`: a 7B-wide decoder slice (`--slice_layers` layers of 3584 hidden,
real vocabulary, bf16 compute, fp32 params, remat 'full', text only) for one GPU, MFU
against the device's dense bf16 peak and a measured bf16 matmul peak. On a CPU it
compiles the step ahead of time (nothing allocated), prints its memory and FLOPs and says
it is meant for a GPU.
"""

import argparse
import dataclasses
import functools
import json
import os
import tempfile

import numpy as np

import common

SLICE_LAYERS = 4


# ----------------------------------------------------------------------------- saber_jax


def _optimizer():
  import ml_collections
  from saber_jax.train import optim
  return optim.make_optimizer(ml_collections.ConfigDict(dict(
      lr=1e-5, total_steps=1000, weight_decay=0.1, grad_clip_norm=1.0)))


def _jax_step(model_config, chunk_size: int, trainable: str = 'full'):
  import jax
  from saber_jax.train import steps
  loss_fn = functools.partial(steps.sft_loss, model_config=model_config, chunk_size=chunk_size)
  return jax.jit(functools.partial(steps.train_step, loss_fn=loss_fn, optimizer=_optimizer(),
                                   skip_nonfinite=False), donate_argnums=0)


def setup_jax(args, keep_hlo: bool = False):
  """Worker setup: the converted weights, the compiled step (state donated) and its first
  step; each STEP then runs one more step. `keep_hlo`: info['hlo'] is the optimized HLO
  text of the step (for `profile_step.py`)."""
  import jax
  from saber_jax import convert
  from saber_jax.train import flops
  common.full_fp32_matmuls()
  model_config, params = convert.load_hf(args.model_dir)
  model_config = dataclasses.replace(model_config, remat=args.remat)
  batch = common.jax_batch(model_config, common.load_batch(args.batch))
  state = common.fresh_state(params, {}, _optimizer())
  del params
  device_batch = jax.device_put(batch)
  step = _jax_step(model_config, args.chunk_size).lower(state, device_batch).compile()
  memory = step.memory_analysis()
  state, metrics = step(state, device_batch)
  info = dict(loss=float(metrics['loss']), tokens=int(batch['attention_mask'].sum()),
              model_flops=flops.step_flops(model_config, batch),
              hardware_flops=flops.step_flops(model_config, batch, hardware=True,
                                              chunk_size=args.chunk_size),
              xla_temp_bytes=memory.temp_size_in_bytes)
  if keep_hlo:
    info['hlo'] = step.as_text()

  def one_step():
    nonlocal state
    state, metrics = step(state, device_batch)
    jax.block_until_ready(metrics['loss'])
  one_step()                                  # warm-up, as the torch side
  stats = jax.devices()[0].memory_stats() or {}
  info['device_peak_bytes'] = stats.get('peak_bytes_in_use')     # None on a CPU
  return info, one_step


# ----------------------------------------------------------------------------- PyTorch


def setup_torch(args):
  import torch
  from transformers import Qwen2_5OmniThinkerForConditionalGeneration
  torch.set_num_threads(args.torch_threads)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # true fp32
  model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
      args.model_dir, dtype=torch.float32, attn_implementation='sdpa').to(device)
  model.train()
  if args.side == 'torch_compile':       # inductor; compiles in the first (untimed) steps
    model = torch.compile(model)
  # Decay as saber_jax's optim.weight_decay_mask: not biases, not norm weights.
  no_decay = lambda name: name.endswith('bias') or 'norm' in name or 'ln_' in name
  named = list(model.named_parameters())
  optimizer = torch.optim.AdamW(
      [dict(params=[p for n, p in named if not no_decay(n)], weight_decay=0.1),
       dict(params=[p for n, p in named if no_decay(n)], weight_decay=0.0)],
      lr=1e-5, betas=(0.9, 0.999), eps=1e-8)
  raw = common.load_batch(args.batch)
  inputs = {k: torch.as_tensor(v).to(device) for k, v in raw.items()
            if k not in ('use_audio_in_video', 'segments')}

  def step() -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = model(**inputs, use_audio_in_video=True).loss   # token-mean NLL over labels
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()

  info = dict(loss=step(), tokens=int(raw['attention_mask'].sum()),
              threads=torch.get_num_threads())
  step()                                      # warm-up: Adam's moments exist from here
  info['device_peak_bytes'] = torch.cuda.max_memory_allocated() if device == 'cuda' else None
  return info, lambda: dict(loss=step())      # .item() waits for the GPU


# ----------------------------------------------------------------------------- driver

# Both workers alive at once need about this much free memory (measured peaks: saber_jax
# ~6 GiB, transformers ~7.5 GiB; a compiled transformers side adds ~7.5); with less, the
# sides run one after the other.
LOCKSTEP_MEMORY = 15 * 2 ** 30
TORCH_MEMORY = 7.5 * 2 ** 30


def bench(args) -> dict:
  model_config = common.BENCH_CONFIG
  with tempfile.TemporaryDirectory() as work:
    model_dir, batch_path = os.path.join(work, 'model'), os.path.join(work, 'batch.npz')
    common.save_hf_model(model_config, model_dir)
    common.save_batch(batch_path, common.processor_batch(model_config))
    side_args = [f'--model_dir={model_dir}', f'--batch={batch_path}',
                 f'--remat={args.remat or "dots"}',
                 f'--chunk_size={args.chunk_size}', f'--torch_threads={args.torch_threads}']
    lockstep = args.mode == 'lockstep'
    sides = dict(jax=side_args, torch=side_args)
    if args.torch_compile:
      sides['torch_compile'] = side_args
    repeats = [common.run_repeat(__file__, sides, args.steps,
                                 repeat, lockstep and common.available_memory_bytes()
                                 > LOCKSTEP_MEMORY + TORCH_MEMORY * (len(sides) - 2))
               for repeat in range(args.repeats)]
  return summarize(repeats)


def summarize(repeats: list[dict]) -> dict:
  """Medians over each repeat's rounds, then the median over repeats."""
  jax0, torch0 = repeats[0]['infos']['jax'], repeats[0]['infos']['torch']
  if not np.isclose(jax0['loss'], torch0['loss'], rtol=1e-4, atol=1e-4):
    raise AssertionError(f'first-step losses differ: saber_jax {jax0["loss"]}, transformers '
                         f'{torch0["loss"]}: the two sides do not compute the same step')
  tokens, flops, hardware = jax0['tokens'], jax0['model_flops'], jax0['hardware_flops']

  def over_repeats(fn):
    return common.median([common.median([fn(r) for r in rep['rounds']]) for rep in repeats])
  jax_s = over_repeats(lambda r: r['jax']['wall_s'])
  torch_s = over_repeats(lambda r: r['torch']['wall_s'])
  rss = lambda side: common.median([rep['infos'][side]['max_rss_bytes'] for rep in repeats])
  compiled = {}
  if 'torch_compile' in repeats[0]['infos']:
    info = repeats[0]['infos']['torch_compile']
    if not np.isclose(jax0['loss'], info['loss'], rtol=1e-4, atol=1e-4):
      raise AssertionError(f'first-step losses differ: saber_jax {jax0["loss"]}, compiled '
                           f'transformers {info["loss"]}')
    step_s = over_repeats(lambda r: r['torch_compile']['wall_s'])
    compiled = dict(
        torch_compile_step_s=step_s, torch_compile_tokens_per_s=tokens / step_s,
        speedup_vs_torch_compile=step_s / jax_s,
        paired_speedup_vs_torch_compile=over_repeats(
            lambda r: r['torch_compile']['wall_s'] / r['jax']['wall_s']),
        torch_compile_mfu=over_repeats(
            lambda r: flops / r['torch_compile']['wall_s'] / r['peak_torch_compile']),
        torch_compile_max_rss_gib=common.gib(rss('torch_compile')),
        torch_compile_loss=info['loss'])
  return dict(**compiled,
      config='bench', machine=common.machine(), repeats=len(repeats),
      steps_per_repeat=len(repeats[0]['rounds']),
      lockstep=all(rep['lockstep'] for rep in repeats), tokens_per_step=tokens,
      jax_step_s=jax_s, torch_step_s=torch_s,
      jax_tokens_per_s=tokens / jax_s, torch_tokens_per_s=tokens / torch_s,
      speedup=torch_s / jax_s,
      paired_speedup=over_repeats(lambda r: r['torch']['wall_s'] / r['jax']['wall_s']),
      jax_cpu_s_per_step=over_repeats(lambda r: r['jax']['cpu_s']),
      torch_cpu_s_per_step=over_repeats(lambda r: r['torch']['cpu_s']),
      model_flops_per_step=flops, hardware_flops_per_step=hardware,
      model_flops_per_token=flops / tokens,
      peak_flops=over_repeats(lambda r: r['peak_jax']),
      mfu=over_repeats(lambda r: flops / r['jax']['wall_s'] / r['peak_jax']),
      hfu=over_repeats(lambda r: hardware / r['jax']['wall_s'] / r['peak_jax']),
      torch_mfu=over_repeats(lambda r: flops / r['torch']['wall_s'] / r['peak_torch']),
      jax_max_rss_gib=common.gib(rss('jax')), torch_max_rss_gib=common.gib(rss('torch')),
      jax_xla_temp_gib=common.gib(jax0['xla_temp_bytes']),
      jax_device_peak_gib=_gib_or_none(jax0['device_peak_bytes']),
      torch_device_peak_gib=_gib_or_none(torch0['device_peak_bytes']),
      jax_loss=jax0['loss'], torch_loss=torch0['loss'], torch_threads=torch0['threads'],
      jax_step_s_all=[[r['jax']['wall_s'] for r in rep['rounds']] for rep in repeats],
      torch_step_s_all=[[r['torch']['wall_s'] for r in rep['rounds']] for rep in repeats],
      peak_flops_all=[[r['peak_jax'] for r in rep['rounds']] for rep in repeats])


def _gib_or_none(num_bytes):
  return None if num_bytes is None else common.gib(num_bytes)


def print_table(r: dict):
  print(f"train step, {r['machine']}; {r['tokens_per_step']} tokens/step; median of "
        f"{r['repeats']} repeats x {r['steps_per_repeat']} steps "
        f"({'lockstep' if r['lockstep'] else 'sequential'}); torch threads {r['torch_threads']}")
  print(f"{'':24}{'saber_jax':>12}{'transformers':>14}")
  print(f"{'step time (s)':24}{r['jax_step_s']:12.2f}{r['torch_step_s']:14.2f}")
  print(f"{'tokens/s':24}{r['jax_tokens_per_s']:12.1f}{r['torch_tokens_per_s']:14.1f}")
  print(f"{'CPU seconds per step':24}{r['jax_cpu_s_per_step']:12.1f}"
        f"{r['torch_cpu_s_per_step']:14.1f}")
  print(f"{'MFU (measured peak)':24}{r['mfu']:12.2f}{r['torch_mfu']:14.2f}")
  print(f"{'peak host memory (GiB)':24}{r['jax_max_rss_gib']:12.2f}{r['torch_max_rss_gib']:14.2f}")
  if r['jax_device_peak_gib'] is not None:
    print(f"{'peak GPU memory (GiB)':24}{r['jax_device_peak_gib']:12.2f}"
          f"{r['torch_device_peak_gib']:14.2f}")
  print(f"{'first-step loss':24}{r['jax_loss']:12.5f}{r['torch_loss']:14.5f}")
  if 'torch_compile_step_s' in r:
    print(f"torch.compile (inductor): {r['torch_compile_step_s']:.2f} s/step, MFU "
          f"{r['torch_compile_mfu']:.2f}, first loss {r['torch_compile_loss']:.5f}, peak host "
          f"{r['torch_compile_max_rss_gib']:.2f} GiB: saber_jax "
          f"{r['speedup_vs_torch_compile']:.2f}x"
          f" (paired {r['paired_speedup_vs_torch_compile']:.2f}x)")
  print(f"speedup {r['speedup']:.2f}x (paired per step {r['paired_speedup']:.2f}x); model "
        f"FLOPs/step {r['model_flops_per_step'] / 1e9:.1f} G (hardware "
        f"{r['hardware_flops_per_step'] / 1e9:.1f} G, hfu {r['hfu']:.2f}); matmul peak "
        f"{r['peak_flops'] / 1e9:.1f} GFLOP/s")


# ----------------------------------------------------------------------------- 7B slice


def slice_config(layers: int, remat: str = 'full'):
  """The 7B decoder cut to `layers` layers (real width, heads and vocabulary), bf16
  compute, fp32 params; minimal towers, as the batch is text only."""
  from saber_jax.models.config import ThinkerConfig
  tiny = ThinkerConfig.tiny()
  seven = ThinkerConfig.qwen2_5_omni_7b()
  width = seven.text.hidden_size
  return dataclasses.replace(
      seven, audio=dataclasses.replace(tiny.audio, output_dim=width),
      vision=dataclasses.replace(tiny.vision, out_hidden_size=width),
      text=dataclasses.replace(seven.text, num_hidden_layers=layers),
      dtype='bfloat16', param_dtype='float32', remat=remat)


def slice_batch(model_config, rows: int, length: int) -> dict:
  """Text-only rows, no padding; the second half of every row is trained."""
  from saber_jax.models.thinker import model_inputs
  rng = np.random.default_rng(0)
  input_ids = rng.integers(1000, 150000, (rows, length))
  inputs = model_inputs(model_config, dict(input_ids=input_ids,
                                           attention_mask=np.ones_like(input_ids)))
  labels = np.where(np.arange(length) >= length // 2, input_ids, -100).astype(np.int32)
  return dict(inputs, labels=labels, segments=np.where(labels >= 0, 3, 0).astype(np.int32))


def llm_slice(args) -> dict:
  import jax
  import ml_collections
  from saber_jax.train import flops
  from saber_jax.models.thinker import abstract_params, init_params
  from saber_jax.train import optim, steps
  import flax.linen as nn
  model_config = slice_config(args.slice_layers, args.remat or 'full')
  batch = slice_batch(model_config, args.rows, args.seq_len)
  on_gpu = jax.devices()[0].platform == 'gpu'
  attention = args.attention if args.attention != 'auto' else ('cudnn' if on_gpu else 'xla')
  if attention == 'cudnn' and not on_gpu:
    raise SystemExit('--attention=cudnn needs a GPU')
  model_config = dataclasses.replace(model_config, attention=attention)
  optimizer = optim.make_optimizer(ml_collections.ConfigDict(dict(
      lr=1e-5, total_steps=1000, weight_decay=0.1, grad_clip_norm=1.0)))
  step = jax.jit(functools.partial(
      steps.train_step, loss_fn=functools.partial(steps.sft_loss, model_config=model_config,
                                                  chunk_size=args.chunk_size),
      optimizer=optimizer, skip_nonfinite=False), donate_argnums=0)
  abstract = nn.unbox(abstract_params(model_config))
  trainable, frozen = steps.split_params(abstract, 'llm')
  abstract_state = jax.eval_shape(lambda t, f: common.fresh_state(t, f, optimizer), trainable,
                                  frozen)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), batch)
  compiled = step.lower(abstract_state, shapes).compile()
  memory = compiled.memory_analysis()
  model_flops = flops.step_flops(model_config, batch, trainable='llm')
  tokens = int(batch['attention_mask'].sum())
  result = dict(config='7b-llm-slice', machine=common.machine(), layers=args.slice_layers,
                attention=attention, remat=model_config.remat,
                rows=args.rows, seq_len=args.seq_len, tokens_per_step=tokens,
                model_flops_per_step=model_flops,
                device_arguments_gib=common.gib(memory.argument_size_in_bytes),
                device_temporaries_gib=common.gib(memory.temp_size_in_bytes),
                device_memory_gib=common.gib(memory.argument_size_in_bytes
                                             + memory.output_size_in_bytes
                                             - memory.alias_size_in_bytes
                                             + memory.temp_size_in_bytes))
  if not on_gpu:
    result['note'] = ('meant for a GPU: compiled ahead of time only (nothing allocated); '
                      'run it where a GPU is lent')
    return result
  params = jax.jit(lambda key: nn.unbox(init_params(model_config, key)))(jax.random.key(0))
  trainable, frozen = steps.split_params(params, 'llm')
  state = common.fresh_state(trainable, frozen, optimizer)
  del params, trainable, frozen
  device_batch = jax.device_put(batch)

  def one_step():
    nonlocal state
    state, metrics = compiled(state, device_batch)
    jax.block_until_ready(metrics['loss'])
  times = common.time_steps(one_step, warmup=2, steps=args.steps)
  step_s = common.median(times)
  vendor_peak = flops.peak_flops()
  measured_peak = common.matmul_peak(8192, 'bfloat16')
  result.update(step_s=step_s, times=times, tokens_per_s=tokens / step_s,
                measured_peak_flops=measured_peak,
                vendor_peak_flops=vendor_peak,
                mfu=flops.mfu(model_flops / step_s, vendor_peak) if vendor_peak else None,
                mfu_measured_peak=flops.mfu(model_flops / step_s, measured_peak))
  return result


# ----------------------------------------------------------------------------- main


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='bench', choices=['bench', '7b-llm-slice'])
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--steps', type=int, default=3, help='timed steps per repeat')
  parser.add_argument('--mode', default='lockstep', choices=['lockstep', 'sequential'])
  parser.add_argument('--remat', choices=['none', 'full', 'dots'],
                      help="default: 'dots' for bench, 'full' for 7b-llm-slice")
  parser.add_argument('--chunk_size', type=int, default=512, help='logps_chunk_size')
  parser.add_argument('--torch_threads', type=int, default=os.cpu_count())
  parser.add_argument('--slice_layers', type=int, default=SLICE_LAYERS)
  parser.add_argument('--rows', type=int, default=4, help='7b-llm-slice rows per step')
  parser.add_argument('--seq_len', type=int, default=4096, help='7b-llm-slice row length')
  parser.add_argument('--attention', default='auto', choices=['auto', 'xla', 'cudnn'],
                      help='7b-llm-slice decoder attention (auto: cuDNN on a GPU)')
  parser.add_argument('--torch_compile', action='store_true',
                      help='bench: also time transformers under torch.compile (inductor)')
  parser.add_argument('--json', action='store_true')
  # Internal: one measured side in this process.
  parser.add_argument('--side', choices=['jax', 'torch', 'torch_compile', 'peak'],
                      help=argparse.SUPPRESS)
  parser.add_argument('--model_dir', help=argparse.SUPPRESS)
  parser.add_argument('--batch', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.side:
    common.serve(common.setup_peak if args.side == 'peak' else
                 lambda: dict(jax=setup_jax, torch=setup_torch,
                              torch_compile=setup_torch)[args.side](args))
    return
  if args.config == '7b-llm-slice':
    result = llm_slice(args)
    for key, value in result.items():
      print(f'{key:24} {value}')
  else:
    result = bench(args)
    print_table(result)
  if args.json:
    print(json.dumps(result))


if __name__ == '__main__':
  main()
