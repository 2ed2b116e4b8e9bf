"""Times one checkout's SFT Grain pipeline on given records (a child of data_pipeline.py).

  python benchmarks/pipeline_timer.py ROOT SPEC

ROOT: the checkout whose `saber_jax` is timed (first on sys.path, so another commit's
pipeline can be timed on the same records). SPEC: JSON {"model": "demo" | "7b", "paths":
[...], "options": {DataConfig fields}, "batches": N}. Prints one JSON line: batches/s,
examples/s and MB per batch over N batches after a first one that starts the workers.
"""

import json
import sys
import time


def main(root: str, spec: dict) -> dict:
  sys.path.insert(0, root)
  import jax
  try:
    from saber_jax.data import datasets as pipeline   # data/pipeline.py split in four
  except ImportError:                                  # a checkout from before the split
    from saber_jax.data import pipeline
  from saber_jax.models.config import ThinkerConfig

  # The host side needs only patch, window and mel sizes and token ids of the model.
  model = ThinkerConfig.qwen2_5_omni_7b() if spec['model'] == '7b' else ThinkerConfig()
  options = dict(spec['options'], length_buckets=tuple(spec['options']['length_buckets']))
  config = pipeline.DataConfig(**options)
  iterator = iter(pipeline.sft_dataset(model, config, spec['paths'], seed=0, shard_index=0,
                                       shard_count=1))
  first = next(iterator)   # starts the workers; not timed
  size = sum(x.nbytes for x in jax.tree.leaves(first)) / 2**20
  del first   # batches from worker processes live in shared memory until released
  start = time.perf_counter()
  for _ in range(spec['batches']):
    next(iterator)
  seconds = time.perf_counter() - start
  iterator.close()
  return {'batches_per_s': spec['batches'] / seconds,
          'examples_per_s': spec['batches'] * config.batch_size / seconds, 'mb_per_batch': size}


if __name__ == '__main__':
  print(json.dumps(main(sys.argv[1], json.loads(sys.argv[2]))))
