"""Pod-scale input, end to end as real `jax.distributed` processes (gloo on loopback, 8
CPU devices in all): on records whose text and media sizes differ a lot between processes
(short clips on the first half of them, long ones on the rest), with the default bucket
ladders and no media floors, a 2-process run stopped by SIGTERM to one of its processes
(both stop at the same step, checkpoint it and exit 0) resumes on 1 process (8 devices)
and on 4 with the same global batch, continuing with exactly the next global batch: the
same losses, metrics and final params as one process (SFT and CA-DPO).

The records are read in file order (`shuffle=False`) and every global batch holds the
same sizes, so each run compiles one step (minutes on a loaded 2-core machine); how the
plan groups and shuffles is tested in test_plan.py."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from processes import cpu_env, free_port
from saber_jax.data import prompt, records

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

NUM_RECORDS = 16            # 2 global batches of 8 per epoch
STEPS = 3
# The demo config's tiny model; default data ladders and floors (demo.py raises them).
ARGS = ['--config=configs/demo.py', '--config.log_every=1', '--config.mesh=(4,1,2)',
        f'--config.optim.total_steps={STEPS}', '--config.optim.warmup_steps=1',
        '--config.data.length_buckets=' + str(tuple(range(256, 4097, 256))).replace(' ', ''),
        '--config.data.min_audio_chunks=2', '--config.data.min_patches=256',
        '--config.data.min_vision_blocks=4', '--config.data.min_frame_len=64',
        '--config.data.shuffle=False']
TIMING = {'step_time_s', 'tokens_per_s', 'model_flops_per_s_per_device', 'mfu', 'lr'}


def _write(folder, n=NUM_RECORDS, seed=0) -> tuple[str, str]:
  """SFT and preference shards: in every 8 records, 4 clips of 0.5 s (56x56, ~60 tokens)
  then 4 of 12 s (112x84, ~650 tokens)."""
  tokenizer = prompt.load_tokenizer()
  rng = np.random.default_rng(seed)
  sft, pref = [], []
  for i in range(n):
    long = i % 8 >= 4
    seconds = 12.0 if long else 0.5
    mel = int(seconds * 100)
    frames = 12 if long else 2
    height, width = (112, 84) if long else (56, 56)
    grid = (frames // 2, height // 14, width // 14)
    prompt_ids = prompt.build_prompt(tokenizer, text='How does this person feel?',
                                     audio_lengths=[mel], video_grids=[grid],
                                     video_second_per_grid=[1.0], use_audio_in_video=True)
    media = dict(input_features=rng.standard_normal((128, mel)).astype(np.float32),
                 frames=rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8),
                 video_fps=2.0, use_audio_in_video=True, duration=seconds, lang='en')
    answers = [rng.integers(0, 151000, 200 if long else 5).astype(np.int32) for _ in range(2)]
    sft.append(records.encode_sft_record(
        id=f'c{i}', input_ids=np.concatenate([prompt_ids, answers[0]]),
        labels=np.concatenate([np.full(len(prompt_ids), -100, np.int32), answers[0]]),
        segments=np.concatenate([np.zeros(len(prompt_ids), np.int8),
                                 np.full(len(answers[0]), 3, np.int8)]), **media))
    pref.append(records.encode_preference_record(
        id=f'p{i}', prompt_ids=prompt_ids, chosen_ids=answers[0], rejected_ids=answers[1],
        chosen_segments=np.full(len(answers[0]), 3, np.int8),
        rejected_segments=np.full(len(answers[1]), 3, np.int8), chosen='a', rejected='b',
        ref_chosen_logps=float(-2000 * rng.uniform()),
        ref_rejected_logps=float(-2000 * rng.uniform()),
        **media))
  prefixes = str(folder / 'sft'), str(folder / 'pref')
  for prefix, blobs in zip(prefixes, (sft, pref)):
    half = len(blobs) // 2
    for index, part in enumerate((blobs[:half], blobs[half:])):
      records.write_records(records.shard_name(prefix, index, 2), part)
  return prefixes


@pytest.fixture(scope='module')
def record_sets(tmp_path_factory):
  return _write(tmp_path_factory.mktemp('plan_records'))


def _launch(args, workdir, processes: int) -> list[subprocess.Popen]:
  """`processes` jax.distributed processes sharing 8 CPU devices, 8 examples per step."""
  env = cpu_env(8 // processes, many_threads=True)
  args = args + [f'--config.workdir={workdir}', f'--config.data.batch_size={8 // processes}']
  if processes > 1:
    port = free_port()
    args += [f'--config.distributed.coordinator_address=127.0.0.1:{port}',
             f'--config.distributed.num_processes={processes}']
  return [subprocess.Popen(
      [sys.executable, '-m', 'saber_jax.main', *args,
       *([f'--config.distributed.process_id={i}'] if processes > 1 else [])],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(processes)]


def _run(args, workdir, processes) -> str:
  launched = _launch(args, workdir, processes)
  outputs = [p.communicate(timeout=600)[0] for p in launched]
  for p, out in zip(launched, outputs):
    assert p.returncode == 0, out[-4000:]
  return outputs[0]


def _log(workdir, stage) -> dict[int, dict]:
  """step -> the metrics.jsonl line of that step (the latest one), timing left out."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return {r['step']: {k: v for k, v in r.items()
                      if k not in TIMING and not k.startswith('time/') and k != 'goodput'}
          for r in rows if r['stage'] == stage}


def _params(workdir, stage) -> dict:
  """The final params on this process's first device (saved by 1, 2 or 4 processes)."""
  import jax  # the test process needs no devices until here
  path = os.path.join(workdir, stage, 'final', 'params')
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as checkpointer:
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                          checkpointer.metadata(path).item_metadata)
    return checkpointer.restore(path, target)


def _assert_same_run(got_dir, want_dir, stage):
  got, want = _log(got_dir, stage), _log(want_dir, stage)
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  for step in want:
    assert got[step].keys() == want[step].keys(), step
    for key, value in want[step].items():
      expected = value if isinstance(value, str) else pytest.approx(value, rel=1e-5, abs=1e-6)
      assert got[step][key] == expected, (step, key)
  import jax
  # Sums over devices and processes run in other orders, and Adam scales the difference
  # up: equal to 1e-4 of each tensor's scale (measured: 4e-5).
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(_params(got_dir, stage)),
                          jax.tree.leaves(_params(want_dir, stage))):
    x, y = np.asarray(x), np.asarray(y)
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-4 * np.abs(y).max() + 1e-8,
                               err_msg=jax.tree_util.keystr(path))


def _stopped_by_sigterm(args, workdir, processes: int, signalled: int) -> list[str]:
  """Starts `processes` processes and sends SIGTERM to process `signalled` alone as soon as
  the stage claimed its workdir (before its first step): all of them finish the same step,
  checkpoint it, say where they stopped and exit 0."""
  launched = _launch(args, workdir, processes)
  claimed = next(workdir.glob('*/fingerprint.json'), None)
  deadline = time.time() + 600
  while claimed is None and time.time() < deadline and all(p.poll() is None for p in launched):
    time.sleep(0.01)
    claimed = next(workdir.glob('*/fingerprint.json'), None)
  assert all(p.poll() is None for p in launched), launched[0].communicate()[0][-3000:]
  launched[signalled].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=600)[0] for p in launched]
  for p, out in zip(launched, outputs):
    assert p.returncode == 0, out[-4000:]
  stops = [[s for s in out.splitlines() if 'stopped after step' in s] for out in outputs]
  assert all(stops), outputs[0][-3000:]
  at = {int(s[0].split('stopped after step ')[1].split()[0]) for s in stops}
  assert len(at) == 1 and 0 < min(at) < STEPS, stops      # one step for all, before the end
  stage = claimed.parent
  assert (stage / 'checkpoints' / str(min(at))).is_dir() and not (stage / 'final').exists()
  return outputs


def _resume(stopped, workdir, args, processes) -> str:
  shutil.copytree(stopped, workdir)
  out = _run(args, workdir, processes)
  assert f'processes={processes}' in out or processes == 1
  assert 'resumed from step' in out, out[-3000:]
  return out


def test_sft_stopped_on_2_processes_resumes_on_1_and_4_like_1(record_sets, tmp_path):
  args = ARGS + ['--config.mode=sft', f'--config.sft_records={record_sets[0]}',
                 '--config.optim.lr=3e-3', '--config.checkpoint.every_steps=100']
  start = time.time()
  _run(args, tmp_path / 'one', 1)
  log = _log(tmp_path / 'one', 'sft')
  assert all(0 < line['data/text_fill'] < 0.7 for line in log.values())   # short rows padded
  assert len({line['loss'] for line in log.values()}) == STEPS

  # Two processes, one of them preempted (SIGTERM); then the same global batch of 8 on one
  # process of 8 devices and on 4 processes of 2: step for step the run of one process.
  _stopped_by_sigterm(args, tmp_path / 'two', 2, signalled=1)
  for processes in (1, 4):
    workdir = tmp_path / f'two_then_{processes}'
    _resume(tmp_path / 'two', workdir, args, processes)
    _assert_same_run(workdir, tmp_path / 'one', 'sft')
  print(f'sft: {time.time() - start:.0f} s')


def test_dpo_stopped_on_2_processes_resumes_on_4_like_1(record_sets, tmp_path):
  args = ARGS + ['--config.mode=dpo', f'--config.pref_records={record_sets[1]}',
                 '--config.optim.lr=2e-4', '--config.checkpoint.every_steps=100']
  start = time.time()
  _run(args, tmp_path / 'one', 1)
  _stopped_by_sigterm(args, tmp_path / 'two', 2, signalled=0)
  _resume(tmp_path / 'two', tmp_path / 'four', args, 4)
  _assert_same_run(tmp_path / 'four', tmp_path / 'one', 'dpo')
  print(f'dpo: {time.time() - start:.0f} s')

