"""`python -m saber_jax.main` end to end, as real processes: kill-and-resume and
SIGTERM-and-resume give the same losses, two jax.distributed processes match one, the 7B
dry run reports its memory, and the demo pipeline trains both stages (held-out eval
falling, a PNG of its curves)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
from processes import cpu_env, free_port  # noqa: E402
from saber_jax import convert, files  # noqa: E402
from saber_jax.cli import convert_hf, make_demo_data, preprocess  # noqa: E402

pytestmark = pytest.mark.slow

# The demo config (tiny model) reduced to a short SFT run on fixed shapes.
SFT_ARGS = ['--config=configs/demo.py', '--config.mode=sft', '--config.optim.lr=3e-3',
            '--config.log_every=1', '--config.data.batch_size=4',
            '--config.data.length_buckets=(1024,)']


@pytest.fixture(scope='module')
def sft_records(tmp_path_factory):
  root = tmp_path_factory.mktemp('main')
  manifest, labels = make_demo_data.make_demo_data(str(root / 'clips'), n=12, seed=3)
  preprocess.main(['--manifest', manifest, '--annotations', labels, '--out', str(root / 'sft'),
                   '--quiet'])
  return str(root / 'sft' / 'sft')


def _main(args, workdir, devices=1, env=None, **kwargs) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, '-m', 'saber_jax.main', *args,
                           f'--config.workdir={workdir}'], cwd=ROOT,
                          env={**cpu_env(devices), **(env or {})},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _run(args, workdir, devices=1, timeout=600, env=None) -> str:
  process = _main(args, workdir, devices, env=env)
  out, _ = process.communicate(timeout=timeout)
  assert process.returncode == 0, out[-4000:]
  return out


def _losses(workdir, stage='sft') -> dict[int, float]:
  """step -> loss of metrics.jsonl, where each step appears once (after a resume too)."""
  rows = list(files.read_jsonl(f'{workdir}/metrics.jsonl'))
  steps = [r['step'] for r in rows if r['stage'] == stage]
  assert len(steps) == len(set(steps)), steps
  return {r['step']: r['loss'] for r in rows if r['stage'] == stage}


def _resume_args(sft_records):
  return SFT_ARGS + [f'--config.sft_records={sft_records}', '--config.optim.total_steps=8',
                     '--config.checkpoint.every_steps=2']


@pytest.fixture(scope='module')
def straight(sft_records, tmp_path_factory):
  """The uninterrupted 8-step run the interrupted ones must equal (its workdir)."""
  workdir = tmp_path_factory.mktemp('straight')
  _run(_resume_args(sft_records), workdir)
  return workdir


def _read_stdout(process) -> tuple[list, threading.Thread]:
  lines = []
  reader = threading.Thread(target=lambda: [lines.append(line) for line in process.stdout],
                            daemon=True)
  reader.start()
  return lines, reader


def test_killed_runs_resume_with_the_same_losses(sft_records, straight, tmp_path):
  args = _resume_args(sft_records)
  want = _losses(straight)
  assert sorted(want) == list(range(1, 9))

  # Kill with SIGKILL as soon as the step-4 checkpoint is being written (mid-save): the
  # restart resumes from the last complete one.
  workdir = tmp_path / 'killed'
  checkpoints = workdir / 'sft' / 'checkpoints'
  process = _main(args, workdir)
  deadline = time.time() + 400
  while not any(p.name.startswith('4.orbax-checkpoint-tmp') for p in checkpoints.glob('*')) \
      and process.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  assert process.poll() is None, process.communicate()[0][-3000:]
  process.send_signal(signal.SIGKILL)
  process.wait()
  # Then SIGTERM as step 5 is logged, and again during the save: the step in flight
  # finishes, is checkpointed whole, and the run exits 0 within seconds, saying where.
  process = _main(args, workdir)
  lines, reader = _read_stdout(process)
  while not any('[sft] step 5/8' in line for line in lines) and process.poll() is None \
      and time.time() < deadline + 400:
    time.sleep(0.01)
  process.send_signal(signal.SIGTERM)
  sent = time.time()
  time.sleep(0.3)
  process.send_signal(signal.SIGTERM)
  process.wait(timeout=300)
  reader.join()
  out = ''.join(lines)
  assert process.returncode == 0 and time.time() - sent < 60, out[-3000:]
  stop = int(out.split('[sft] stopped after step ')[1].split()[0])
  assert 5 <= stop < 8 and (checkpoints / str(stop)).is_dir(), out[-3000:]
  assert 'SIGTERM again: already stopping' in out
  assert not (workdir / 'sft' / 'final').exists()
  out = _run(args, workdir)
  assert f'resumed from step {stop}' in out
  got = _losses(workdir)
  assert sorted(got) == list(range(1, 9))
  for step in want:
    assert got[step] == pytest.approx(want[step], rel=1e-6), step


def test_gs_workdir_killed_resumes_and_exports_like_a_local_run(sft_records, straight, gcs,
                                                                tmp_path):
  from etils import epath
  args, workdir = _resume_args(sft_records), 'gs://runs/w'
  # SIGKILL once step 5 is logged (the step-4 checkpoint written or being written): the
  # restart, as on a new machine, resumes from the bucket alone.
  process = _main(args, workdir, env=gcs)
  lines, reader = _read_stdout(process)
  deadline = time.time() + 400
  while not any('[sft] step 5/8' in line for line in lines) and process.poll() is None \
      and time.time() < deadline:
    time.sleep(0.01)
  assert process.poll() is None, ''.join(lines)[-3000:]
  process.send_signal(signal.SIGKILL)
  process.wait()
  reader.join()
  assert epath.Path(f'{workdir}/metrics.jsonl').exists()     # uploaded with a checkpoint
  out = _run(args, workdir, env=gcs)
  resumed = int(out.split('[sft] resumed from step ')[1].split()[0])
  assert resumed in (2, 4), out[-3000:]
  want, got = _losses(straight), _losses(workdir)
  assert sorted(got) == list(range(1, 9))
  for step in want:
    assert got[step] == pytest.approx(want[step], rel=1e-6), step
  assert epath.Path(f'{workdir}/sft/fingerprint.json').exists()
  assert list(epath.Path(f'{workdir}/tensorboard/sft').glob('events.out.tfevents.*'))

  # Export from and to the bucket; the tensors equal the local run's export.
  subprocess.run([sys.executable, '-m', 'saber_jax.cli.convert_hf', 'to-hf', '--params',
                  f'{workdir}/sft/final', '--out', f'{workdir}/hf'], cwd=ROOT, check=True,
                 env={**cpu_env(1), **gcs}, timeout=300)
  convert_hf.main(['to-hf', '--params', str(straight / 'sft' / 'final'),
                   '--out', str(tmp_path / 'hf_local')])
  assert files.download(f'{workdir}/hf', str(tmp_path / 'hf_gs'))
  local = dict(convert.read_safetensors(str(tmp_path / 'hf_local' / 'model.safetensors')))
  remote = dict(convert.read_safetensors(str(tmp_path / 'hf_gs' / 'model.safetensors')))
  assert sorted(remote) == sorted(local) and local
  for name in local:
    np.testing.assert_allclose(remote[name], local[name], rtol=1e-6, atol=1e-7, err_msg=name)
  # Nothing took the URL for a local path.
  assert not (ROOT / 'gs:').exists() and not pathlib.Path('gs:').exists()


def test_two_processes_match_one(sft_records, tmp_path):
  args = SFT_ARGS + [f'--config.sft_records={sft_records}', '--config.optim.total_steps=3',
                     '--config.checkpoint.every_steps=100']
  # One process with 8 devices and batch 4 vs two processes of 4 devices with batch 2 each:
  # the same 4 examples per step (one global shuffle, split by process).
  _run(args + ['--config.data.batch_size=4', '--config.mesh=(4,1,2)'], tmp_path / 'one',
       devices=8)
  port = free_port()
  processes = [
      _main(args + ['--config.data.batch_size=2', '--config.mesh=(4,1,2)',
                    f'--config.distributed.coordinator_address=127.0.0.1:{port}',
                    '--config.distributed.num_processes=2',
                    f'--config.distributed.process_id={i}'], tmp_path / 'two', devices=4)
      for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  for p, out in zip(processes, outputs):
    assert p.returncode == 0, out[-4000:]
  assert 'processes=2' in outputs[0]
  want, got = _losses(tmp_path / 'one'), _losses(tmp_path / 'two')
  assert sorted(got) == [1, 2, 3]
  for step in want:
    assert got[step] == pytest.approx(want[step], rel=1e-5), step


@pytest.mark.parametrize('trainable', ['full', 'lora'])
def test_7b_dry_run_prints_per_device_memory(trainable, tmp_path):
  out = _run([f'--config=configs/sed_sft.py:7b,{trainable}', '--config.dry_run=True',
              '--config.optim.total_steps=10'], tmp_path, devices=8)
  line = [s for s in out.splitlines() if s.startswith('per_device_memory_gib=')]
  assert line, out[-3000:]
  assert 1.0 < float(line[0].split('=')[1]) < 80.0


def test_demo_pipeline_trains_both_stages(tmp_path):
  start = time.time()
  _run(['--config=configs/demo.py'], tmp_path, timeout=900)
  elapsed = time.time() - start
  with open(tmp_path / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  sft = [r for r in rows if r['stage'] == 'sft']
  dpo = [r for r in rows if r['stage'] == 'dpo']
  assert sft[-1]['loss'] < 0.6 * sft[0]['loss']
  assert dpo[-1]['rewards/accuracies'] > 0.5
  # Held-out clips: the eval loss falls; DPO logs held-out reward accuracy and margins.
  held_out = [r['eval/loss'] for r in sft if 'eval/loss' in r]
  assert len(held_out) == 5 and held_out[-1] < held_out[0], held_out
  assert all('eval/rewards/margins' in r for r in dpo if r['step'] % 4 == 0)
  assert all(0 <= r['goodput'] <= 1 and 'time/input_s' in r for r in rows)
  assert (tmp_path / 'curves.png').read_bytes()[:4] == b'\x89PNG'
  assert all(r['model_flops_per_s_per_device'] > 0 for r in rows)   # no vendor peak on CPU
  assert not any('mfu' in r for r in rows)
  assert (tmp_path / 'dpo' / 'final' / 'thinker_config.json').exists()
  for stage in ('sft', 'dpo'):          # one clip's answer shown after each stage
    assert (tmp_path / f'answers_after_{stage}.jsonl').read_text().strip()
  print(f'demo pipeline: {elapsed:.0f} s')
  _check_demo_stages_alone(tmp_path)


def _check_demo_stages_alone(workdir):
  """`configs/demo.py:<stage>` names the inputs the pipeline made in `workdir`, and a
  training stage run alone there is the same run (its fingerprint matches, so it would
  resume rather than refuse)."""
  from saber_jax.configs import demo
  from saber_jax.data import datasets
  from saber_jax.train import trainer
  for stage in demo.STAGES:
    config = demo.get_config(stage)
    config.workdir = str(workdir)
    records = {'sft': config.sft_records, 'generate': config.generate.records}.get(
        stage, config.pref_records)
    paths = datasets.resolve_paths(records)
    assert paths and all(os.path.exists(p) for p in paths), (stage, records)
    assert not config.init_from or os.path.isdir(config.init_from), (stage, config.init_from)
    if stage in ('sft', 'dpo'):
      trainer.claim_workdir(config, os.path.join(config.workdir, stage), stage, paths,
                            config.init_from)
