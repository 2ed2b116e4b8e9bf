"""What precomputing the reference log-probs saves in a CA-DPO step.

  python benchmarks/dpo_step.py [--pairs 1] [--repeats 3] [--steps 3] [--json]

Two saber_jax DPO steps (forward and backward of the policy on chosen and rejected,
AdamW update) on the benchmark-sized thinker (`common.BENCH_CONFIG`) and SABER-shaped
pairs (one 10 s clip with 8 video frames per row, a ~440-token response):

* `precomputed` — the saber_jax way (`steps.dpo_loss`): the frozen reference model's
  log-probs were computed once, before training (`mode=ref_logps`), and arrive with the
  batch; the step runs the policy only.
* `in_step` — the reference model is held next to the policy and runs its forward on
  every step (as a DPO trainer without precomputation does); its log-probs are
  stop-gradient inputs to the same loss.

Each variant runs in its own worker process, stepped in turn ("lockstep", see
`train_step.py`); reported are tokens/s (valid tokens of the batch), model FLOPs per step
(`saber_jax.flops`: the reference forward adds one forward pass), XLA's memory analysis of
the compiled step (arguments and temporaries) and the process's peak host memory.
"""

import argparse
import dataclasses
import functools
import json
import os
import sys
import tempfile

import numpy as np

import common

VARIANTS = ('precomputed', 'in_step')


def _dpo_config():
  import ml_collections
  return ml_collections.ConfigDict(dict(beta=0.1, label_smoothing=0.0, loss_type='sigmoid'))


def dpo_with_reference(trainable, frozen, batch, *, model_config, dpo_config, chunk_size):
  """`steps.dpo_loss` with the reference log-probs computed here, from the reference
  params held in the frozen tree, instead of read from the batch."""
  import jax
  from saber_jax.train import steps
  ref = jax.lax.stop_gradient(steps.sequence_logps(frozen['reference'], batch,
                                                   model_config=model_config,
                                                   chunk_size=chunk_size))
  batch = dict(batch, ref_chosen_logps=ref[0::2], ref_rejected_logps=ref[1::2])
  return steps.dpo_loss(trainable, {}, batch, model_config=model_config,
                        dpo_config=dpo_config, chunk_size=chunk_size)


def setup_variant(args):
  import flax.linen as nn
  import jax
  import ml_collections
  from saber_jax import flops
  from saber_jax.models.thinker import init_params
  from saber_jax.train import optim, steps
  model_config = dataclasses.replace(common.BENCH_CONFIG, remat=args.remat)
  batch = common.jax_batch(model_config, common.load_batch(args.batch))
  init = jax.jit(lambda key: nn.unbox(init_params(model_config, key)))
  policy = init(jax.random.key(0))
  reference = init(jax.random.key(0))        # the SFT model: same values, its own buffers
  ref_logps = jax.jit(functools.partial(steps.sequence_logps, model_config=model_config,
                                        chunk_size=args.chunk_size))(reference, batch)
  ref_logps = np.asarray(ref_logps)
  optimizer = optim.make_optimizer(ml_collections.ConfigDict(dict(
      lr=1e-6, total_steps=1000, weight_decay=0.0, grad_clip_norm=1.0)))
  common_kw = dict(model_config=model_config, dpo_config=_dpo_config(),
                   chunk_size=args.chunk_size)
  if args.side == 'precomputed':
    loss_fn = functools.partial(steps.dpo_loss, **common_kw)
    frozen = {}
    batch = dict(batch, ref_chosen_logps=ref_logps[0::2], ref_rejected_logps=ref_logps[1::2])
    del reference
  else:
    loss_fn = functools.partial(dpo_with_reference, **common_kw)
    frozen = {'reference': reference}
  state = steps.init_state(policy, frozen, optimizer)
  del policy
  step = jax.jit(functools.partial(steps.train_step, loss_fn=loss_fn, optimizer=optimizer,
                                   skip_nonfinite=False), donate_argnums=0)
  device_batch = jax.device_put(batch)
  compiled = step.lower(state, device_batch).compile()
  memory = compiled.memory_analysis()
  state, metrics = compiled(state, device_batch)
  counts_batch = dict(batch, ref_chosen_logps=ref_logps[0::2])    # a DPO batch for flops
  model_flops = flops.step_flops(model_config, counts_batch)
  if args.side == 'in_step':
    model_flops += flops.forward_step_flops(model_config, batch)
  info = dict(loss=float(metrics['loss']), tokens=int(batch['attention_mask'].sum()),
              model_flops=model_flops, xla_argument_bytes=memory.argument_size_in_bytes,
              xla_temp_bytes=memory.temp_size_in_bytes)

  def one_step():
    nonlocal state
    state, metrics = compiled(state, device_batch)
    jax.block_until_ready(metrics['loss'])
  one_step()
  return info, one_step


def bench(args) -> dict:
  model_config = common.BENCH_CONFIG
  spec = common.BatchSpec(audio_frames=(1000,) * (2 * args.pairs))
  with tempfile.TemporaryDirectory() as work:
    batch_path = os.path.join(work, 'batch.npz')
    raw = common.processor_batch(model_config, spec)
    # Rows 2i and 2i + 1 are pair i: the same clip and prompt, two different responses.
    for key in ('input_features', 'pixel_values_videos'):
      per_row = len(raw[key]) // len(raw['input_ids'])
      rows = raw[key].reshape(len(raw['input_ids']) // 2, 2, per_row, *raw[key].shape[1:])
      raw[key] = np.repeat(rows[:, :1], 2, axis=1).reshape(raw[key].shape)
    common.save_batch(batch_path, raw)
    side_args = [f'--batch={batch_path}', f'--remat={args.remat}',
                 f'--chunk_size={args.chunk_size}']
    repeats = [common.run_repeat(__file__, {v: side_args for v in VARIANTS}, args.steps, repeat,
                                 args.mode == 'lockstep') for repeat in range(args.repeats)]
  return summarize(repeats, args.pairs)


def summarize(repeats: list[dict], pairs: int) -> dict:
  def over_repeats(fn):
    return common.median([common.median([fn(r) for r in rep['rounds']]) for rep in repeats])
  out = dict(machine=common.machine(), pairs=pairs, repeats=len(repeats),
             steps_per_repeat=len(repeats[0]['rounds']),
             lockstep=all(rep['lockstep'] for rep in repeats))
  for variant in VARIANTS:
    info = repeats[0]['infos'][variant]
    step_s = over_repeats(lambda r: r[variant]['wall_s'])
    out[variant] = dict(
        step_s=step_s, tokens_per_s=info['tokens'] / step_s,
        model_flops_per_step=info['model_flops'],
        mfu=over_repeats(lambda r: info['model_flops'] / r[variant]['wall_s']
                         / r[f'peak_{variant}']),
        xla_argument_gib=common.gib(info['xla_argument_bytes']),
        xla_temp_gib=common.gib(info['xla_temp_bytes']),
        max_rss_gib=common.gib(common.median([rep['infos'][variant]['max_rss_bytes']
                                              for rep in repeats])),
        first_loss=info['loss'])
  pre, ref = out['precomputed'], out['in_step']
  if not np.isclose(pre['first_loss'], ref['first_loss'], rtol=1e-4, atol=1e-5):
    raise AssertionError(f'the two variants disagree on the first loss: {pre["first_loss"]} vs '
                         f'{ref["first_loss"]}')
  out.update(speedup=ref['step_s'] / pre['step_s'],
             time_saved=1 - pre['step_s'] / ref['step_s'],
             memory_saved_gib=(ref['xla_argument_gib'] + ref['xla_temp_gib']
                               - pre['xla_argument_gib'] - pre['xla_temp_gib']),
             rss_saved_gib=ref['max_rss_gib'] - pre['max_rss_gib'])
  return out


def print_table(r: dict):
  print(f"DPO step, {r['machine']}; {r['pairs']} pair(s); median of {r['repeats']} repeats x "
        f"{r['steps_per_repeat']} steps ({'lockstep' if r['lockstep'] else 'sequential'})")
  print(f"{'':30}{'precomputed':>14}{'reference in step':>20}")
  rows = [('step time (s)', 'step_s', '.2f'), ('tokens/s', 'tokens_per_s', '.1f'),
          ('model GFLOP/step', 'model_flops_per_step', '.1f'), ('MFU (measured peak)', 'mfu', '.2f'),
          ('XLA arguments (GiB)', 'xla_argument_gib', '.2f'),
          ('XLA temporaries (GiB)', 'xla_temp_gib', '.2f'),
          ('peak host memory (GiB)', 'max_rss_gib', '.2f'), ('first loss', 'first_loss', '.5f')]
  for label, key, fmt in rows:
    scale = 1e-9 if key == 'model_flops_per_step' else 1
    print(f"{label:30}{r['precomputed'][key] * scale:14{fmt}}{r['in_step'][key] * scale:20{fmt}}")
  print(f"precomputing: {r['speedup']:.2f}x faster ({100 * r['time_saved']:.0f}% less time), "
        f"{r['memory_saved_gib']:.2f} GiB less XLA memory, {r['rss_saved_gib']:.2f} GiB less "
        f"peak host memory")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--pairs', type=int, default=1)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--steps', type=int, default=3, help='timed steps per repeat')
  parser.add_argument('--mode', default='lockstep', choices=['lockstep', 'sequential'])
  parser.add_argument('--remat', default='dots', choices=['none', 'full', 'dots'])
  parser.add_argument('--chunk_size', type=int, default=512)
  parser.add_argument('--json', action='store_true')
  parser.add_argument('--side', choices=[*VARIANTS, 'peak'], help=argparse.SUPPRESS)
  parser.add_argument('--batch', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.side:
    common.serve(common.setup_peak if args.side == 'peak' else lambda: setup_variant(args))
    return
  result = bench(args)
  print_table(result)
  if args.json:
    print(json.dumps(result))


if __name__ == '__main__':
  main()
