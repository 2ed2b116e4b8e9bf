"""Decoding speed of `saber_jax.decode` against transformers' `generate` (KV cache on both).

Two cases per model: one prompt decoded greedily (batch 1), and k samples of one prompt at
temperature 0.8 (the CA-DPO sampling). Both sides load the same random weights, decode the
same number of new tokens (no end-of-sequence id, so no row stops early) and are timed
after a warm-up call (JAX compiles there), best of `--repeats`. Models: 'bench' (8 layers x
512 hidden, the real 152K vocabulary) and 'tiny' (the test model).

  python benchmarks/generate.py [--models bench,tiny] [--new_tokens 128] [--json]

With --json the last line is one JSON object; `speedup` is JAX over transformers, in
tokens/s, for the k-sample case of the first model.

Dataset mode (`--dataset N`): N generated demo clips (varied prompt lengths and media)
through `mode=generate` (`saber_jax.generate.generate_stage`: bucketed batches of
`--batch` prompts, k = `--samples` at temperature 0.8) against transformers `generate`
looped over the same prompts (one prompt, k return sequences per call), both on the same
random tiny thinker (the demo's model, real vocabulary) loaded from the same safetensors.
Wall time end to end: loading the weights, building the batches, compiling (JAX), and
decoding up to `--new_tokens` per sample (both stop at the Qwen EOS ids).

  python benchmarks/generate.py --dataset 32 [--batch 16] [--new_tokens 128] [--json]

Compaction mode (`--compaction`): `--batch` prompts x k samples on the bench model at
temperature 1 with rows that end at spread-out steps (one in 40 vocabulary ids, drawn at
random, ends a row: about 40 tokens on average, geometrically spread, as sampled answers
are), decoded with the batch halved to the rows still going (the default) and with every
row kept to the end (`compact_rows=False`). Both give the same tokens (checked); the
wall times are compared.

  python benchmarks/generate.py --compaction [--batch 4] [--samples 10] [--json]
"""

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np
import torch
from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

from saber_jax import convert
from saber_jax.decode import generate

TOWERS = dict(
    audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=64,
                      num_mel_bins=16, n_window=8),
    vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=2,
                       temporal_patch_size=2, spatial_merge_size=2, window_size=8,
                       fullatt_block_indexes=[0]))

MODELS = {
    # (layers, hidden, mlp, heads, kv heads, vocab, mrope section)
    'bench': (8, 512, 2048, 8, 2, 152064, [8, 12, 12]),
    'tiny': (2, 64, 96, 4, 2, 99, [2, 3, 3]),
}


def hf_model(name: str) -> Qwen2_5OmniThinkerForConditionalGeneration:
  layers, hidden, mlp, heads, kv_heads, vocab, section = MODELS[name]
  config = Qwen2_5OmniThinkerConfig(
      audio_config=dict(TOWERS['audio_config'], output_dim=hidden),
      vision_config=dict(TOWERS['vision_config'], out_hidden_size=hidden),
      text_config=dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, max_position_embeddings=4096,
                       tie_word_embeddings=False,
                       rope_parameters=dict(rope_type='default', rope_theta=1e6,
                                            mrope_section=section)),
      audio_token_index=1, image_token_index=2, video_token_index=3, audio_start_token_id=4,
      audio_end_token_id=5, user_token_id=6, vision_start_token_id=7, vision_end_token_id=8,
      tie_word_embeddings=False)
  torch.manual_seed(0)
  model = Qwen2_5OmniThinkerForConditionalGeneration(config).eval()
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  return model


def best_seconds(runs: dict, repeats: int) -> dict:
  """name -> best wall seconds of `fn` over `repeats`, after `warm_up`; runs {name: (fn,
  warm_up)}. The sides take turns, so that a shared machine's load hits both alike."""
  for _, warm_up in runs.values():
    warm_up()
  best = {name: float('inf') for name in runs}
  for _ in range(repeats):
    for name, (fn, _) in runs.items():
      start = time.perf_counter()
      fn()
      best[name] = min(best[name], time.perf_counter() - start)
  return best


def run_model(name: str, args) -> list[dict]:
  model = hf_model(name)
  with tempfile.TemporaryDirectory() as path:
    model.save_pretrained(path)
    config, params = convert.load_hf(path)
  vocab = MODELS[name][5]
  prompt = np.random.default_rng(0).integers(10, vocab, (1, args.prompt_len))
  batch = dict(input_ids=prompt, attention_mask=np.ones_like(prompt))
  torch_batch = {k: torch.as_tensor(v) for k, v in batch.items()}
  results = []
  for case, samples, temperature in (('batch 1 greedy', 1, 0.0),
                                     (f'{args.samples} samples, T=0.8', args.samples, 0.8)):
    sampling = dict(temperature=temperature, top_k=0, top_p=1.0)

    def run_jax():
      out = generate(config, params, batch, max_new_tokens=args.new_tokens,
                     num_samples=samples, eos_token_ids=(), pad_token_id=0, **sampling)
      assert out['lengths'].min() == args.new_tokens

    def run_hf(new_tokens=args.new_tokens):
      hf_sampling = dict(do_sample=True, **sampling) if temperature else dict(do_sample=False)
      with torch.inference_mode():
        out = model.generate(**torch_batch, max_new_tokens=new_tokens,
                             num_return_sequences=samples, **hf_sampling)
      assert out.shape == (samples, args.prompt_len + new_tokens)

    tokens = samples * args.new_tokens
    # The JAX warm-up compiles, so it runs the timed shapes; torch needs no more than a step.
    best = best_seconds(dict(jax=(run_jax, run_jax), hf=(run_hf, lambda: run_hf(2))),
                        args.repeats)
    jax_s, hf_s = best['jax'], best['hf']
    results.append(dict(model=name, case=case, rows=samples, new_tokens=args.new_tokens,
                        jax_tokens_per_s=tokens / jax_s, hf_tokens_per_s=tokens / hf_s,
                        speedup=hf_s / jax_s))
  return results


def run_dataset(args) -> dict:
  from saber_jax import generate as generate_stage_lib
  from saber_jax.cli import make_demo_data, preprocess
  from saber_jax.configs import demo
  from saber_jax.data import collate, examples, records
  from saber_jax.decode import EOS_TOKEN_IDS, PAD_TOKEN_ID
  from saber_jax.models.config import ThinkerConfig
  from common import save_hf_model

  with tempfile.TemporaryDirectory() as root:
    manifest, labels = make_demo_data.make_demo_data(os.path.join(root, 'clips'), n=args.dataset)
    preprocess.main(['--manifest', manifest, '--annotations', labels, '--out',
                     os.path.join(root, 'sft'), '--quiet'])
    prefix = os.path.join(root, 'sft', 'sft')
    hf_dir = os.path.join(root, 'hf')
    save_hf_model(ThinkerConfig.tiny(), hf_dir)

    config = demo.get_config()
    config.mode = 'generate'
    g = config.generate
    g.batch_size, g.num_samples, g.temperature = args.batch, args.samples, 0.8
    g.max_new_tokens = args.new_tokens
    out = os.path.join(root, 'jax', 'predictions.jsonl')
    start = time.perf_counter()
    generate_stage_lib.generate_stage(config, prefix, hf_dir, out)
    jax_s = time.perf_counter() - start
    with open(out) as f:
      lines = [json.loads(line) for line in f]
    jax_tokens = sum(sum(line['num_tokens']) + sum(line['finished']) for line in lines)

    start = time.perf_counter()
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(hf_dir).eval()
    model.generation_config.eos_token_id = list(EOS_TOKEN_IDS)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model_config = ThinkerConfig.tiny()
    hf_tokens = 0
    for record in records.iter_records(records.shard_paths(prefix)):
      example = examples.prompt_example(record, model_config, 'records')
      batch = collate.shard_batch([example], 1, len(example.rows[0]['input_ids']))
      del batch['labels'], batch['segments']
      inputs = {k: torch.as_tensor(v) for k, v in batch.items() if k != 'use_audio_in_video'}
      with torch.inference_mode():
        sequences = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=True,
                                   temperature=0.8, top_k=0, top_p=1.0,
                                   num_return_sequences=args.samples,
                                   use_audio_in_video=bool(batch['use_audio_in_video']))
      # Tokens up to each sample's first EOS, the EOS included (generate pads after it).
      is_eos = torch.isin(sequences[:, inputs['input_ids'].shape[1]:],
                          torch.as_tensor(EOS_TOKEN_IDS))
      hf_tokens += int(torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1,
                                   is_eos.shape[1]).sum())
    hf_s = time.perf_counter() - start
  return dict(records=len(lines), samples=args.samples, new_tokens=args.new_tokens,
              batch=args.batch, jax_seconds=jax_s, hf_seconds=hf_s, jax_tokens=jax_tokens,
              hf_tokens=hf_tokens, speedup=hf_s / jax_s)


def run_compaction(args) -> dict:
  model = hf_model('bench')
  with tempfile.TemporaryDirectory() as path:
    model.save_pretrained(path)
    config, params = convert.load_hf(path)
  vocab = MODELS['bench'][5]
  rng = np.random.default_rng(0)
  prompt = rng.integers(10, vocab, (args.batch, args.prompt_len))
  batch = dict(input_ids=prompt, attention_mask=np.ones_like(prompt))
  eos = tuple(int(i) for i in rng.choice(np.arange(10, vocab), vocab // 40, replace=False))
  outs = {}

  def decode(compact: bool):
    outs[compact] = generate(config, params, batch, max_new_tokens=args.new_tokens,
                             temperature=1.0, num_samples=args.samples, eos_token_ids=eos,
                             pad_token_id=0, compact_rows=compact)

  runs = {name: (lambda c=c: decode(c),) * 2 for name, c in (('compact', True), ('full', False))}
  best = best_seconds(runs, args.repeats)
  for key in ('tokens', 'lengths', 'finished'):
    np.testing.assert_array_equal(outs[True][key], outs[False][key], err_msg=key)
  lengths, steps = outs[False]['lengths'], int(outs[False]['steps'])
  # Row-steps a row still needs (its tokens and its EOS) of all the full loop runs.
  useful = float(np.minimum(lengths + 1, steps).sum() / (len(lengths) * steps))
  return dict(rows=len(lengths), steps=steps, mean_length=float(lengths.mean()),
              useful_row_steps=useful, compact_seconds=best['compact'],
              full_seconds=best['full'], speedup=best['full'] / best['compact'])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='bench,tiny')
  parser.add_argument('--new_tokens', type=int, default=128)
  parser.add_argument('--samples', type=int, default=10)
  parser.add_argument('--prompt_len', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--json', action='store_true')
  parser.add_argument('--torch_threads', type=int, default=1,
                      help='on a small shared machine one thread is torch\'s fastest: its '
                      'OpenMP threads spin against the other load (measured 0.4 ms vs 16 ms for '
                      'a 10x512 @ 512x2048 matmul, 1 vs 2 threads, on 2 busy cores)')
  parser.add_argument('--dataset', type=int, default=0,
                      help='dataset mode: this many demo clips through mode=generate')
  parser.add_argument('--batch', type=int, default=16,
                      help='dataset mode: prompts per batch; compaction mode: prompts')
  parser.add_argument('--compaction', action='store_true',
                      help='compaction mode: the decode loop with and without halving')
  args = parser.parse_args()
  torch.set_num_threads(args.torch_threads)
  if args.compaction:
    result = run_compaction(args)
    print(f"{result['rows']} rows, {result['steps']} steps, mean length "
          f"{result['mean_length']:.1f}, {result['useful_row_steps']:.0%} of the full loop's "
          f"row-steps needed: halving {result['compact_seconds']:.2f} s, all rows to the end "
          f"{result['full_seconds']:.2f} s: {result['speedup']:.2f}x")
    if args.json:
      print(json.dumps(result))
    return
  if args.dataset:
    result = run_dataset(args)
    print(f'{jax.devices()[0].device_kind}: {os.cpu_count()} cpus, torch threads '
          f'{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}')
    print(f"{result['records']} clips x {args.samples} samples, <= {args.new_tokens} new "
          f"tokens: saber_jax mode=generate {result['jax_seconds']:.1f} s "
          f"({result['jax_tokens']} tokens), transformers generate loop "
          f"{result['hf_seconds']:.1f} s ({result['hf_tokens']} tokens): "
          f"{result['speedup']:.2f}x")
    if args.json:
      print(json.dumps(result))
    return
  results = [r for name in args.models.split(',') for r in run_model(name, args)]
  print(f'{jax.devices()[0].device_kind}: {os.cpu_count()} cpus, torch threads '
        f'{torch.get_num_threads()}, prompt {args.prompt_len} tokens, load average '
        f'{os.getloadavg()[0]:.1f}')
  print(f"{'model':6} {'case':18} {'JAX tok/s':>10} {'HF tok/s':>10} {'speedup':>8}")
  for r in results:
    print(f"{r['model']:6} {r['case']:18} {r['jax_tokens_per_s']:10.1f} "
          f"{r['hf_tokens_per_s']:10.1f} {r['speedup']:8.2f}")
  if args.json:
    headline = next(r for r in results if r['rows'] == args.samples)
    print(json.dumps(dict(speedup=headline['speedup'], results=results)))


if __name__ == '__main__':
  main()
