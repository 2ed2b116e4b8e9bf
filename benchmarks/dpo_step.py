"""What the CA-DPO step saves by computing each pair's prompt once, and by precomputing
the reference log-probs.

  python benchmarks/dpo_step.py [--pairs 1] [--repeats 2] [--steps 2] [--json]

saber_jax DPO steps (forward and backward of the policy on chosen and rejected, AdamW
update) on the benchmark-sized thinker (`common.BENCH_CONFIG`) and SABER-shaped pairs: a
20 s clip (2000 mel frames, ~500 audio tokens; 40 frames at 2 fps, 224 x 224, 1280 video
tokens, interleaved with the audio), ~150 prompt text tokens, answers of 300 and 450
tokens. Batches come from the data pipeline's `collate` (length buckets every 256 tokens):

* `shared` — the saber_jax default: one row `[prompt | chosen | rejected]` per pair (the
  towers and the prompt's decoder pass once), reference log-probs read from the batch.
* `two_rows` — chosen and rejected as two full rows `[prompt | answer]` (towers and prompt
  twice), reference log-probs read from the batch.
* `in_step` — the shared layout with a reference model next to the policy, running its
  forward on every step (a DPO trainer without `mode=ref_logps`).

Each variant runs in its own worker process, stepped in turn ("lockstep", see
`train_step.py`); reported are step time, tokens/s (valid tokens of the batch), model
FLOPs per step (`saber_jax.train.flops`), XLA's memory analysis of the compiled step
(arguments and temporaries) and the process's peak host memory. The variants' first
policy log-probs must agree. `--json`: the last line holds `shared_prompt_speedup`
(two_rows / shared step time) and `precompute_speedup` (in_step / shared).
"""

import argparse
import dataclasses
import functools
import json

import numpy as np

import common

VARIANTS = ('shared', 'two_rows', 'in_step')
CLIP_MEL_FRAMES = 2000                 # 20 s of audio
VIDEO_GRID = (20, 16, 16)              # 40 frames at 2 fps, 224 x 224
PROMPT_TOKENS = 150
ANSWER_TOKENS = (300, 450)             # chosen, rejected


def _dpo_config():
  import ml_collections
  return ml_collections.ConfigDict(dict(beta=0.1, label_smoothing=0.0, loss_type='sigmoid',
                                        sft_weight=0.0))


def pair_batch(model_config, pairs: int, shared: bool, seed: int = 0, *,
               clip_mel_frames: int = CLIP_MEL_FRAMES, video_grid=VIDEO_GRID,
               prompt_tokens: int = PROMPT_TOKENS, answer_tokens=ANSWER_TOKENS,
               length_step: int = 256) -> dict:
  """`pairs` SABER-shaped pairs through the pipeline's collate, in one layout (the same
  tokens and media for both layouts); the keywords shrink them (device_check --smoke)."""
  from saber_jax.data import collate, examples as examples_lib, records
  from saber_jax.data.prompt import expand_placeholders
  rng = np.random.default_rng(seed)
  v = model_config.vision
  text = lambda n: rng.integers(1000, 150000, n)
  examples = []
  for index in range(pairs):
    clip = expand_placeholders(audio_lengths=[clip_mel_frames], video_grids=[video_grid],
                               video_second_per_grid=[1.0], use_audio_in_video=True)
    record = dict(kind=records.PREFERENCE,
                  prompt_ids=np.concatenate([text(prompt_tokens // 3), clip,
                                             text(prompt_tokens - prompt_tokens // 3)]))
    for side, n in zip(('chosen', 'rejected'), answer_tokens):
      record[f'{side}_ids'] = text(n)
      record[f'{side}_segments'] = np.repeat(common.RESPONSE_SEGMENTS, -(-n // 3))[:n]
    media = dict(
        use_audio_in_video=True,
        audio=rng.standard_normal((model_config.audio.num_mel_bins, clip_mel_frames),
                                  np.float32),
        video=dict(pixel_values_videos=rng.standard_normal(
                       (int(np.prod(video_grid)), v.patch_dim), np.float32),
                   video_grid_thw=np.array([video_grid]),
                   video_second_per_grid=np.array([1.0], np.float32)))
    examples.append(examples_lib.Example(examples_lib._rows_of(record, shared), media, False,
                                         index, (0.0, 0.0)))
  options = examples_lib.DataConfig(batch_size=pairs, shared_prompt=shared,
                                    length_buckets=tuple(range(length_step, 8193, length_step)))
  return collate.collate(examples, model_config=model_config, options=options,
                         preference=True)


def dpo_with_reference(trainable, frozen, batch, *, model_config, dpo_config, chunk_size):
  """`steps.dpo_loss` with the reference log-probs computed here, from the reference
  params held in the frozen tree, instead of read from the batch."""
  import jax
  from saber_jax.train import steps
  chosen, rejected = jax.lax.stop_gradient(steps.pair_logps(
      frozen['reference'], batch, model_config=model_config, chunk_size=chunk_size))
  batch = dict(batch, ref_chosen_logps=chosen, ref_rejected_logps=rejected)
  return steps.dpo_loss(trainable, {}, batch, model_config=model_config,
                        dpo_config=dpo_config, chunk_size=chunk_size)


def setup_variant(args):
  import flax.linen as nn
  import jax
  import ml_collections
  from saber_jax.train import flops
  from saber_jax.models.thinker import init_params
  from saber_jax.train import optim, steps
  model_config = dataclasses.replace(common.BENCH_CONFIG, remat=args.remat)
  batch = pair_batch(model_config, args.pairs, shared=args.side != 'two_rows')
  init = jax.jit(lambda key: nn.unbox(init_params(model_config, key)))
  policy = init(jax.random.key(0))
  reference = init(jax.random.key(0))        # the SFT model: same values, its own buffers
  logps_fn = jax.jit(functools.partial(steps.pair_logps, model_config=model_config,
                                       chunk_size=args.chunk_size))
  ref_logps = [np.asarray(x) for x in logps_fn(reference, batch)]
  optimizer = optim.make_optimizer(ml_collections.ConfigDict(dict(
      lr=1e-6, total_steps=1000, weight_decay=0.0, grad_clip_norm=1.0)))
  common_kw = dict(model_config=model_config, dpo_config=_dpo_config(),
                   chunk_size=args.chunk_size)
  batch = dict(batch, ref_chosen_logps=ref_logps[0], ref_rejected_logps=ref_logps[1])
  if args.side == 'in_step':
    loss_fn = functools.partial(dpo_with_reference, **common_kw)
    frozen = {'reference': reference}
  else:
    loss_fn = functools.partial(steps.dpo_loss, **common_kw)
    frozen = {}
    del reference
  state = common.fresh_state(policy, frozen, optimizer)
  del policy
  step = jax.jit(functools.partial(steps.train_step, loss_fn=loss_fn, optimizer=optimizer,
                                   skip_nonfinite=False), donate_argnums=0)
  device_batch = jax.device_put(batch)
  compiled = step.lower(state, device_batch).compile()
  memory = compiled.memory_analysis()
  state, metrics = compiled(state, device_batch)
  model_flops = flops.step_flops(model_config, batch)
  if args.side == 'in_step':
    model_flops += flops.total(flops.forward_flops(model_config,
                                                  flops.batch_counts(model_config, batch)))
  info = dict(loss=float(metrics['loss']), tokens=int(batch['attention_mask'].sum()),
              rows=int(batch['input_ids'].shape[0]), row_length=int(batch['input_ids'].shape[1]),
              logps=[float(x) for x in np.concatenate(ref_logps)],
              model_flops=model_flops, xla_argument_bytes=memory.argument_size_in_bytes,
              xla_temp_bytes=memory.temp_size_in_bytes)

  def one_step():
    nonlocal state
    state, metrics = compiled(state, device_batch)
    jax.block_until_ready(metrics['loss'])
  one_step()
  return info, one_step


def bench(args) -> dict:
  side_args = [f'--pairs={args.pairs}', f'--remat={args.remat}', f'--chunk_size={args.chunk_size}']
  repeats = [common.run_repeat(__file__, {v: side_args for v in args.variants}, args.steps,
                               repeat, args.mode == 'lockstep') for repeat in range(args.repeats)]
  return summarize(repeats, args.pairs, args.variants)


def summarize(repeats: list[dict], pairs: int, variants) -> dict:
  def over_repeats(fn):
    return common.median([common.median([fn(r) for r in rep['rounds']]) for rep in repeats])
  out = dict(machine=common.machine(), pairs=pairs, repeats=len(repeats),
             steps_per_repeat=len(repeats[0]['rounds']),
             lockstep=all(rep['lockstep'] for rep in repeats))
  for variant in variants:
    info = repeats[0]['infos'][variant]
    step_s = over_repeats(lambda r: r[variant]['wall_s'])
    out[variant] = dict(
        step_s=step_s, tokens_per_s=info['tokens'] / step_s, tokens=info['tokens'],
        rows=info['rows'], row_length=info['row_length'],
        model_flops_per_step=info['model_flops'],
        mfu=over_repeats(lambda r: info['model_flops'] / r[variant]['wall_s']
                         / r[f'peak_{variant}']),
        xla_argument_gib=common.gib(info['xla_argument_bytes']),
        xla_temp_gib=common.gib(info['xla_temp_bytes']),
        max_rss_gib=common.gib(common.median([rep['infos'][variant]['max_rss_bytes']
                                              for rep in repeats])),
        first_loss=info['loss'], logps=info['logps'])
  first = out[variants[0]]
  for variant in variants[1:]:
    if not np.allclose(out[variant]['logps'], first['logps'], rtol=1e-4, atol=1e-3):
      raise AssertionError(f'{variant} and {variants[0]} disagree on the policy log-probs: '
                           f'{out[variant]["logps"]} vs {first["logps"]}')
  memory = lambda v: out[v]['xla_argument_gib'] + out[v]['xla_temp_gib']
  if 'shared' in out and 'two_rows' in out:
    out.update(shared_prompt_speedup=out['two_rows']['step_s'] / out['shared']['step_s'],
               shared_prompt_memory_saved_gib=memory('two_rows') - memory('shared'),
               shared_prompt_rss_saved_gib=(out['two_rows']['max_rss_gib']
                                            - out['shared']['max_rss_gib']))
  if 'shared' in out and 'in_step' in out:
    out.update(precompute_speedup=out['in_step']['step_s'] / out['shared']['step_s'],
               precompute_memory_saved_gib=memory('in_step') - memory('shared'))
  return out


def print_table(r: dict, variants):
  print(f"DPO step, {r['machine']}; {r['pairs']} pair(s); median of {r['repeats']} repeats x "
        f"{r['steps_per_repeat']} steps ({'lockstep' if r['lockstep'] else 'sequential'})")
  print(f"{'':30}" + ''.join(f'{v:>14}' for v in variants))
  rows = [('rows x length', None, ''), ('step time (s)', 'step_s', '.2f'),
          ('tokens/s', 'tokens_per_s', '.1f'), ('model GFLOP/step', 'model_flops_per_step', '.1f'),
          ('MFU (measured peak)', 'mfu', '.2f'), ('XLA arguments (GiB)', 'xla_argument_gib', '.2f'),
          ('XLA temporaries (GiB)', 'xla_temp_gib', '.2f'),
          ('peak host memory (GiB)', 'max_rss_gib', '.2f'), ('first loss', 'first_loss', '.5f')]
  for label, key, fmt in rows:
    if key is None:
      cells = [f"{r[v]['rows']} x {r[v]['row_length']}" for v in variants]
    else:
      scale = 1e-9 if key == 'model_flops_per_step' else 1
      cells = [f'{r[v][key] * scale:{fmt}}' for v in variants]
    print(f'{label:30}' + ''.join(f'{c:>14}' for c in cells))
  if 'shared_prompt_speedup' in r:
    print(f"prompt once: {r['shared_prompt_speedup']:.2f}x faster than two rows, "
          f"{r['shared_prompt_memory_saved_gib']:.2f} GiB less XLA memory, "
          f"{r['shared_prompt_rss_saved_gib']:.2f} GiB less peak host memory")
  if 'precompute_speedup' in r:
    print(f"precomputed reference: {r['precompute_speedup']:.2f}x faster than a reference "
          f"forward in the step, {r['precompute_memory_saved_gib']:.2f} GiB less XLA memory")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--pairs', type=int, default=1)
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--steps', type=int, default=2, help='timed steps per repeat')
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--mode', default='lockstep', choices=['lockstep', 'sequential'])
  parser.add_argument('--remat', default='dots', choices=['none', 'full', 'dots'])
  parser.add_argument('--chunk_size', type=int, default=512)
  parser.add_argument('--json', action='store_true')
  parser.add_argument('--side', choices=[*VARIANTS, 'peak'], help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.side:
    common.serve(common.setup_peak if args.side == 'peak' else lambda: setup_variant(args))
    return
  args.variants = tuple(v for v in args.variants.split(',') if v)
  if set(args.variants) - set(VARIANTS):
    parser.error(f'--variants: choose from {VARIANTS}')
  result = bench(args)
  print_table(result, args.variants)
  if args.json:
    print(json.dumps(result))


if __name__ == '__main__':
  main()
