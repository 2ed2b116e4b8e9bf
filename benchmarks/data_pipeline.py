"""Throughput of the data side on this machine (preprocessing and the Grain pipeline), and
how much of a batch is padding.

  python benchmarks/data_pipeline.py [--batches 64] [--workers 0 4] [--json] [--fills_only]
                                     [--against DIR --rounds 3]

Fill: on a SABER-like distribution (clips uniform in 0.5-30 s, video at 2 fps capped at
40 frames of at most 224x224 (50176 px) in a few aspect ratios, audio interleaved,
answers 150-600 tokens), as synthetic size indexes for the 7B model (no media decoded),
global batches of 64 clips over 8 devices, the default ladders: text_fill (real / padded
text positions) and media_fill (real / padded audio + vision positions) over an epoch of
`random` batches (group_batches=0, what the pipeline did before the batch plan) and the
size-`grouped` plan, and the distinct batch shapes (compilations) each needs;
`grouped_pod`: the plan at pod scale (5x the clips, global batch 512 on 64 devices);
`random_old_ladders`: random batches on the ladders the pipeline had before.

Two settings:
  demo  saber-make-demo-data clips (160x128, 1.5-4 s) run through saber-preprocess,
        batched for the tiny model: batch 8 in 2 data shards, buckets (256, 512, 1024).
  7b    records with the sizes of the 7B recipe written directly (no media decoding):
        8-20 s clips, 128-bin log-mel (800-2000 frames), 16-40 frames of 224x224
        (the 50176-pixel cap), ~1.1-2.1k tokens; the Qwen2.5-Omni-7B host-side config;
        batch 8 in 8 data shards (one row per GPU of an 8-GPU host).
For each setting and worker count: batches/s and examples/s over --batches batches after
a first batch that starts the workers (not timed), and MB per batch, each timing in a
fresh process (pipeline_timer.py). `--against DIR --rounds 3`: also time the pipeline of
another checkout (e.g. `git worktree add DIR <older commit>`) on the same records and
options, the two alternating, and print medians. The last line is a JSON object with
every number when --json is given; its "random" and "grouped" entries hold the fills.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402

from saber_jax.cli import make_demo_data, preprocess  # noqa: E402
from saber_jax.data import prompt, records, sed  # noqa: E402
from saber_jax.data.examples import DataConfig  # noqa: E402
from saber_jax.data.plan import BatchPlan, example_needs  # noqa: E402
from saber_jax.models import audio  # noqa: E402
from saber_jax.models.config import ThinkerConfig  # noqa: E402

SEVEN_B = ThinkerConfig.qwen2_5_omni_7b()


def demo_records(folder: str, n: int) -> tuple[list[str], dict]:
  manifest, labels = make_demo_data.make_demo_data(os.path.join(folder, 'clips'), n=n, seed=0)
  start = time.perf_counter()
  preprocess.main(['--manifest', manifest, '--annotations', labels, '--out',
                   os.path.join(folder, 'sft'), '--quiet'])
  seconds = time.perf_counter() - start
  return records.shard_paths(os.path.join(folder, 'sft', 'sft')), {
      'preprocess_clips_per_s': n / seconds}


def seven_b_records(folder: str, n: int) -> list[str]:
  """SFT records with the 7B recipe's media sizes (random content, real token layout)."""
  tokenizer = prompt.load_tokenizer()
  rng = np.random.default_rng(0)
  blobs = []
  for i in range(n):
    seconds = float(rng.uniform(8, 20))
    mel = int(seconds * 100)
    frames = min(40, 2 * int(seconds)) // 2 * 2
    grid = (frames // 2, 16, 16)
    prompt_ids = prompt.build_prompt(tokenizer, text=sed.sed_instruction('en'), audio_lengths=[mel],
                                     video_grids=[grid], video_second_per_grid=[1.0],
                                     use_audio_in_video=True)
    response = rng.integers(0, 150000, int(rng.integers(200, 400))).astype(np.int32)
    blobs.append(records.encode_sft_record(
        id=f'7b-{i}', lang='en', duration=seconds,
        input_ids=np.concatenate([prompt_ids, response]),
        labels=np.concatenate([np.full(len(prompt_ids), -100, np.int32), response]),
        segments=np.concatenate([np.zeros(len(prompt_ids), np.int8),
                                 np.repeat(np.int8([1, 2, 3]), [100, 50, len(response) - 150])]),
        input_features=rng.standard_normal((128, mel)).astype(np.float32),
        frames=rng.integers(0, 256, (frames, 224, 224, 3), dtype=np.uint8), video_fps=2.0,
        use_audio_in_video=True))
  path = os.path.join(folder, records.shard_name('sft7b', 0, 1))
  records.write_records(path, blobs)
  return [path]


def saber_sizes(n: int, seed: int = 0) -> np.ndarray:
  """A size index (records.SIZE_FIELDS) of n SABER-like SFT records."""
  rng = np.random.default_rng(seed)
  seconds = rng.uniform(0.5, 30, n)
  frames = np.clip(np.round(2 * seconds).astype(int), 2, 40)
  sides = np.array([(224, 224), (196, 252), (252, 196), (168, 280), (280, 168)])[
      rng.integers(0, 5, n)]
  mel = (seconds * 100).astype(int)
  merged = SEVEN_B.vision.patch_size * SEVEN_B.vision.spatial_merge_size
  video_tokens = -(-frames // 2) * (sides[:, 0] // merged) * (sides[:, 1] // merged)
  prompt_tokens = 60 + np.array([audio.audio_token_count(m) for m in mel]) + video_tokens
  zeros = np.zeros(n, int)
  return np.stack([prompt_tokens, rng.integers(150, 601, n), zeros, mel, frames, sides[:, 0],
                   sides[:, 1], zeros, zeros], 1).astype(np.int32)


# The ladders before the batch plan (text doubling, media 2 steps per doubling).
OLD_LADDERS = dict(length_buckets=(256, 512, 1024, 2048, 4096), bucket_steps=2)


def fills(sizes: np.ndarray, group_batches: int, batch_size: int = 64, num_data_shards: int = 8,
          **ladders) -> dict:
  options = DataConfig(group_batches=group_batches, **ladders)
  plan = BatchPlan(
      example_needs(sizes, records.SFT, SEVEN_B, options), rows_per_example=1,
      batch_size=batch_size, num_data_shards=num_data_shards, model_config=SEVEN_B,
      options=options, seed=0)
  totals, shapes = np.zeros(4), set()
  for step in range(plan.steps_per_epoch):
    batch = plan.shapes(step)
    totals += batch['fill']
    shapes.add((batch['length'], *sorted(batch['media'].items())))
  return {'text_fill': totals[0] / totals[1], 'media_fill': totals[2] / totals[3],
          'shapes': len(shapes), 'steps': plan.steps_per_epoch}


# Pipeline options of the two throughput settings (DataConfig fields; the worker count
# is added per run). Every option is spelled out so that another checkout, whose
# defaults may differ, is timed on the same batches.
SETTINGS = {
    'demo': dict(batch_size=8, num_data_shards=2, length_buckets=(256, 512, 1024),
                 min_patches=256, min_frame_len=64, bucket_steps=4, read_threads=2),
    '7b': dict(batch_size=8, num_data_shards=8, length_buckets=(1024, 1536, 2048, 2560, 3072, 4096),
               min_patches=1024, min_frame_len=256, min_audio_chunks=4, min_vision_blocks=16,
               bucket_steps=4, read_threads=2),
}


def measure(root, setting: str, paths, workers: int, num_batches: int) -> dict:
  """Throughput of the pipeline of checkout `root` in a fresh process (pipeline_timer.py)."""
  spec = dict(model=setting, paths=paths, batches=num_batches,
              options=dict(SETTINGS[setting], worker_count=workers))
  out = subprocess.run([sys.executable, str(_ROOT / 'benchmarks' / 'pipeline_timer.py'),
                        str(root), json.dumps(spec)], check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batches', type=int, default=64)
  parser.add_argument('--workers', type=int, nargs='+', default=[0, 4])
  parser.add_argument('--clips', type=int, default=20000, help='clips of the fill measurement')
  parser.add_argument('--json', action='store_true')
  parser.add_argument('--fills_only', action='store_true')
  parser.add_argument('--against', help="another checkout (e.g. a `git worktree` of an older "
                      "commit) whose pipeline is timed on the same records, alternating")
  parser.add_argument('--rounds', type=int, default=1, help='timings of each checkout')
  args = parser.parse_args(argv)
  results = {'devices': f'{os.cpu_count()} CPU cores', 'settings': {}}
  sizes = saber_sizes(args.clips)
  start = time.perf_counter()
  results['random_old_ladders'] = fills(sizes, group_batches=0, **OLD_LADDERS)
  results['random'] = fills(sizes, group_batches=0)
  results['grouped'] = fills(sizes, group_batches=DataConfig.group_batches)
  results['plan_seconds'] = (time.perf_counter() - start) / 3
  start = time.perf_counter()
  results['grouped_pod'] = fills(saber_sizes(5 * args.clips, seed=1), batch_size=512,
                                 num_data_shards=64, group_batches=DataConfig.group_batches)
  results['pod_plan_seconds'] = time.perf_counter() - start
  print(f'fill over {args.clips} SABER-like clips, batch 64 on 8 devices, default ladders '
        f'(grouped_pod: {5 * args.clips} clips, batch 512 on 64 devices):')
  print('| batches | text_fill | media_fill | shapes per epoch |')
  print('|---|---|---|---|')
  for name in ('random_old_ladders', 'random', 'grouped', 'grouped_pod'):
    f = results[name]
    print(f'| {name} | {f["text_fill"]:.3f} | {f["media_fill"]:.3f} | {f["shapes"]} |')
  print(f'plan of an epoch (shapes and fills of every batch): {results["plan_seconds"]:.2f} s; '
        f'pod: {results["pod_plan_seconds"]:.2f} s')
  if args.fills_only:
    if args.json:
      print(json.dumps(results))
    return
  with tempfile.TemporaryDirectory() as folder:
    demo_paths, demo_info = demo_records(os.path.join(folder, 'demo'), 32)
    results['preprocess_demo_clips_per_s'] = demo_info['preprocess_clips_per_s']
    paths = {'demo': demo_paths, '7b': seven_b_records(os.path.join(folder, '7b'), 24)}
    checkouts = {**({'against': args.against} if args.against else {}), 'this': _ROOT}
    for _ in range(args.rounds):   # the checkouts alternate
      for checkout, root in checkouts.items():
        for name in SETTINGS:
          for workers in args.workers:
            stats = measure(root, name, paths[name], workers, args.batches)
            results['settings'].setdefault(f'{checkout}/{name}/workers={workers}', []).append(stats)
  print(f'preprocess (demo clips, 1 process): {results["preprocess_demo_clips_per_s"]:.1f} clips/s')
  print(f'examples/s per process over {args.rounds} round(s), median (range):')
  print('| setting | workers | ' + ' | '.join(checkouts) + ' |')
  print('|---|---|' + '---|' * len(checkouts))
  for name in SETTINGS:
    for workers in args.workers:
      cells = []
      for checkout in checkouts:
        runs = results['settings'][f'{checkout}/{name}/workers={workers}']
        v = [r['examples_per_s'] for r in runs]
        cells.append(f'{np.median(v):.1f} ({min(v):.1f}-{max(v):.1f})')
      print(f'| {name} | {workers} | ' + ' | '.join(cells) + ' |')
  if args.json:
    print(json.dumps(results))


if __name__ == '__main__':
  main()
