"""Where one SED train step spends its time, saber_jax beside transformers, on this machine.

  python benchmarks/profile_step.py [--out DIR] [--torch_compile] [--json]

The step, model, weights and batch of `train_step.py --config=bench`. Each side runs in its
own process: its first step and a warm-up step, then one step under its profiler
(`jax.profiler.trace`; `torch.profiler`). Each operation's time is put in one category:

  matmul     dense products: XLA dot / convolution (alone or fused, YNNPACK or Eigen);
             aten mm / addmm / bmm / baddbmm / linear
  attention  PyTorch's fused CPU attention (sdpa: its matmuls and softmax together; XLA
             has no such op, its attention is matmul + elementwise)
  optimizer  torch.optim.AdamW's foreach kernels (XLA fuses AdamW into elementwise)
  copy       layout changes: XLA copy / transpose; aten copy_ / clone / contiguous / cat
  other      everything else (elementwise, reductions, gathers, scatters)

XLA times are the thunks' durations (`hlo_op` of the Perfetto trace), which may overlap
on several threads (a conditional's, loop's or call's own event is left out: it spans the
instructions it runs, which are counted); PyTorch times are self CPU times of the main
thread's ops (intra-op threads work inside them). Both also report the step's wall time
under the profiler.
Written to DIR (default a temp dir): each side's raw trace and `<side>_ops.json`.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import common

CATEGORIES = ('matmul', 'attention', 'optimizer', 'copy', 'other')
TORCH_MATMUL = {'aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm', 'aten::linear',
                'aten::matmul', 'aten::conv3d', 'aten::convolution', 'aten::_convolution',
                'aten::mkldnn_convolution', 'aten::addbmm'}
TORCH_COPY = {'aten::copy_', 'aten::clone', 'aten::contiguous', 'aten::cat', 'aten::t',
              'aten::transpose', 'aten::permute', 'aten::_to_copy', 'aten::to'}


def torch_category(name: str) -> str:
  if name in TORCH_MATMUL:
    return 'matmul'
  if 'scaled_dot_product' in name or 'flash_attention' in name:
    return 'attention'
  if name.startswith('aten::_foreach') or name.startswith('Optimizer.') \
      or name == 'aten::_fused_adamw_':
    return 'optimizer'
  if name in TORCH_COPY:
    return 'copy'
  return 'other'


INSTRUCTION = re.compile(r'\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\b([a-z][\w\-]*)\(')
# Instructions whose trace event spans the instructions they run (counted there).
CONTAINERS = ('conditional', 'while', 'call')


def hlo_instructions(hlo_text: str) -> dict[str, dict[str, tuple[str, list[str]]]]:
  """{computation: {instruction: (opcode, the computations it fuses)}} of an HLO module's
  text."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r'\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$', line)
    if header and '=' not in line.split('{')[0]:
      current = computations.setdefault(header.group(1), {})
    elif current is not None and (m := INSTRUCTION.match(line)):
      current[m.group(1)] = (m.group(2), re.findall(r'calls=%?([\w.\-]+)', line))
  return computations


def dot_instructions(hlo_text: str) -> set[str]:
  """Names of the optimized module's instructions that compute a dense product: a dot or
  convolution itself, or a fusion whose computation holds one."""
  computations = hlo_instructions(hlo_text)
  has_dot = {name for name, body in computations.items()
             if any(op in ('dot', 'convolution') for op, _ in body.values())}
  return {name for body in computations.values() for name, (op, called) in body.items()
          if op in ('dot', 'convolution') or (op == 'fusion' and set(called) & has_dot)}


def container_instructions(hlo_text: str) -> set[str]:
  """Names of the conditionals, loops and calls: left out of the sums, as their events
  hold the time of the instructions they run."""
  return {name for body in hlo_instructions(hlo_text).values()
          for name, (op, _) in body.items() if op in CONTAINERS}


def xla_category(op: str, dots: set[str]) -> str:
  if op in dots or op.startswith(('dot', 'convolution')):
    return 'matmul'
  if op.startswith(('copy', 'transpose')):
    return 'copy'
  return 'other'


def summarize(times: dict[str, float], category, wall_s: float) -> dict:
  """{category: seconds}, the top operations and the wall time."""
  by_category = collections.Counter()
  for name, seconds in times.items():
    by_category[category(name)] += seconds
  top = sorted(times.items(), key=lambda kv: -kv[1])[:12]
  return dict(wall_s=wall_s, op_s=sum(times.values()),
              categories={c: by_category.get(c, 0.0) for c in CATEGORIES},
              top=[dict(op=name, category=category(name), s=s) for name, s in top])


# ----------------------------------------------------------------------------- the sides


def xla_op_times(trace_dir: str) -> dict[str, float]:
  """Seconds per HLO instruction of the jitted computations in a `jax.profiler.trace`
  written with `create_perfetto_trace=True` (summed over its executions)."""
  trace = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True)[0]
  events = json.load(gzip.open(trace))
  events = events['traceEvents'] if isinstance(events, dict) else events
  times = collections.Counter()
  for e in events:
    op = e.get('args', {}).get('hlo_op')
    if e.get('ph') == 'X' and op and e['args'].get('hlo_module', '').startswith('jit_'):
      times[op] += e['dur'] / 1e6
  return dict(times)


def torch_op_times(prof) -> dict[str, float]:
  """Self CPU seconds per operation of a finished `torch.profiler.profile`."""
  return {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}


def profile_jax(args) -> dict:
  import jax
  import train_step
  info, step = train_step.setup_jax(args, keep_hlo=True)
  trace_dir = os.path.join(args.out, 'jax')
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    start = time.perf_counter()
    step()
    wall = time.perf_counter() - start
  dots, containers = dot_instructions(info['hlo']), container_instructions(info['hlo'])
  times = {op: s for op, s in xla_op_times(trace_dir).items() if op not in containers}
  return summarize(times, lambda op: xla_category(op, dots), wall)


def profile_torch(args) -> dict:
  import torch
  import train_step
  _, step = train_step.setup_torch(args)
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    start = time.perf_counter()
    step()
    wall = time.perf_counter() - start
  prof.export_chrome_trace(os.path.join(args.out, f'{args.side}_trace.json'))
  return summarize(torch_op_times(prof), torch_category, wall)


# ----------------------------------------------------------------------------- driver


def print_table(results: dict):
  sides = list(results)
  print(f"{'seconds':14}" + ''.join(f'{s:>16}' for s in sides))
  for key in CATEGORIES:
    print(f'{key:14}' + ''.join(f"{results[s]['categories'][key]:16.2f}" for s in sides))
  print(f"{'sum of ops':14}" + ''.join(f"{results[s]['op_s']:16.2f}" for s in sides))
  print(f"{'step wall':14}" + ''.join(f"{results[s]['wall_s']:16.2f}" for s in sides))
  for side in sides:
    print(f'\n{side}: top operations')
    for t in results[side]['top']:
      print(f"  {t['s']:8.3f} s  {t['category']:10} {t['op']}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', help='where traces and summaries go (default: a temp dir)')
  parser.add_argument('--torch_compile', action='store_true',
                      help='also profile transformers under torch.compile (inductor)')
  parser.add_argument('--json', action='store_true')
  parser.add_argument('--side', choices=['jax', 'torch', 'torch_compile'],
                      help=argparse.SUPPRESS)
  parser.add_argument('--model_dir', help=argparse.SUPPRESS)
  parser.add_argument('--batch', help=argparse.SUPPRESS)
  args = parser.parse_args()
  args.remat, args.chunk_size, args.torch_threads = 'dots', 512, os.cpu_count()
  if args.side:
    result = (profile_jax if args.side == 'jax' else profile_torch)(args)
    with open(os.path.join(args.out, f'{args.side}_ops.json'), 'w') as f:
      json.dump(result, f, indent=1)
    return
  args.out = args.out or tempfile.mkdtemp(prefix='saber-profile-')
  os.makedirs(args.out, exist_ok=True)
  model_config = common.BENCH_CONFIG
  model_dir, batch_path = os.path.join(args.out, 'model'), os.path.join(args.out, 'batch.npz')
  common.save_hf_model(model_config, model_dir)
  common.save_batch(batch_path, common.processor_batch(model_config))
  results = {}
  for side in ['jax', 'torch'] + (['torch_compile'] if args.torch_compile else []):
    subprocess.run([sys.executable, __file__, f'--side={side}', f'--out={args.out}',
                    f'--model_dir={model_dir}', f'--batch={batch_path}'], check=True)
    with open(os.path.join(args.out, f'{side}_ops.json')) as f:
      results[side] = json.load(f)
  print(f'train step profile, {common.machine()}; traces in {args.out}')
  print_table(results)
  if args.json:
    print(json.dumps(dict(machine=common.machine(), **results)))


if __name__ == '__main__':
  main()
