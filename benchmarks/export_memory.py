"""Peak host memory of the full-model export (`saber-convert-hf to-hf --base`) at real size.

  python benchmarks/export_memory.py [3b|7b] [--dir /tmp/export_memory] [--max-shard-gb 2]

Writes a bf16 params directory of the thinker layout (all zeros: the values do not change
the memory an export needs, and untouched zero pages cost nothing to write) and a "base"
full checkpoint of the same thinker plus a talker-sized block of tensors, then runs the
export in its own process and reports its peak RSS (VmHWM) against the checkpoint
size, the shard size and the largest thinker tensor (the params are read one layer at a
time, so that is the most the export holds beside a shard).
Needs about 3x the bf16 model on disk (3B layout: ~27 GB; 7B: ~50 GB); everything is
deleted at the end.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import psutil

from saber_jax import convert, weights
from saber_jax.models import abstract_params
from saber_jax.models.config import ThinkerConfig

BF16 = np.dtype(ml_dtypes.bfloat16)
# The export, run in a process of its own that reports its peak resident memory: VmHWM, the
# peak since exec (ru_maxrss would also count the pages of the parent it was forked from).
EXPORT = """import sys
from saber_jax.cli import convert_hf
convert_hf.main(sys.argv[1:])
print(next(line for line in open('/proc/self/status') if line.startswith('VmHWM')), flush=True)
"""
TALKER_BYTES = 2 << 30          # the 7B release's talker + token2wav are ~1.3B params (bf16)


def zeros_params(config: ThinkerConfig) -> dict:
  return jax.tree.map(lambda s: np.zeros(s.shape, BF16), nn.unbox(abstract_params(config)))


def write_base(path: str, config: ThinkerConfig, params: dict, max_shard_bytes: int):
  os.makedirs(path, exist_ok=True)
  full = {'model_type': 'qwen2_5_omni', 'thinker_config': config.to_hf(),
          'talker_config': {'model_type': 'qwen2_5_omni_talker'},
          'token2wav_config': {'model_type': 'qwen2_5_omni_token2wav'}}
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(full, f)
  per = 256 << 20
  talker = ((f'talker.model.layers.{i}.mlp.weight', np.zeros((per // 2,), BF16))
            for i in range(TALKER_BYTES // per))
  largest = 0

  def tensors():
    nonlocal largest
    for name, array in convert.hf_tensors(params, 'thinker.'):
      largest = max(largest, array.nbytes)
      yield name, array.astype(BF16)
  convert.write_shards(path, (t for part in (tensors(), talker) for t in part), max_shard_bytes)
  open(os.path.join(path, 'spk_dict.pt'), 'wb').close()
  return largest


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('layout', nargs='?', default='3b', choices=('3b', '7b'))
  parser.add_argument('--dir', default='/tmp/export_memory')
  parser.add_argument('--max-shard-gb', type=float, default=2.0)
  args = parser.parse_args()
  config = getattr(ThinkerConfig, f'qwen2_5_omni_{args.layout}')(param_dtype='bfloat16')
  shutil.rmtree(args.dir, ignore_errors=True)
  try:
    params = zeros_params(config)
    start = time.time()
    weights.save_params(os.path.join(args.dir, 'params'), params, config)
    largest = write_base(os.path.join(args.dir, 'base'), config, params,
                         int(args.max_shard_gb * 2**30))
    del params
    print(f'[{args.layout}] wrote params and base in {time.time() - start:.0f} s', flush=True)
    start = time.time()
    child = subprocess.Popen(
        [sys.executable, '-c', EXPORT, 'to-hf', '--params',
         os.path.join(args.dir, 'params'), '--base', os.path.join(args.dir, 'base'),
         '--out', os.path.join(args.dir, 'out'), '--max-shard-gb', str(args.max_shard_gb)],
        env=dict(os.environ, JAX_PLATFORMS='cpu'), stdout=subprocess.PIPE, text=True,
        stderr=subprocess.DEVNULL)
    timeline = []          # (seconds, resident GiB, of which file-backed GiB) every 0.5 s
    process = psutil.Process(child.pid)
    while child.poll() is None:
      try:
        info = process.memory_info()
        timeline.append((round(time.time() - start, 1), round(info.rss / 2**30, 2),
                         round(info.shared / 2**30, 2)))
      except psutil.NoSuchProcess:
        break
      time.sleep(0.5)
    if child.returncode:
      raise SystemExit(f'the export failed ({child.returncode})')
    peak = int(child.stdout.read().split('VmHWM:')[1].split()[0]) * 1024
    top = max(timeline, key=lambda t: t[1])
    print(f'[{args.layout}] resident at its peak sample: {top[1]} GiB, {top[2]} GiB of it '
          f'file-backed (memory-mapped base shards) at {top[0]} s', flush=True)
    out = os.path.join(args.dir, 'out')
    total = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out)
                if n.endswith('.safetensors'))
    print(json.dumps({'layout': args.layout, 'export_s': round(time.time() - start, 1),
                      'checkpoint_gib': round(total / 2**30, 2),
                      'largest_tensor_gib': round(largest / 2**30, 2),
                      'max_shard_gib': args.max_shard_gb,
                      'peak_rss_gib': round(peak / 2**30, 2)}), flush=True)
  finally:
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == '__main__':
  main()
