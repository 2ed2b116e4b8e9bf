"""The package works when installed as a wheel: its console scripts, `python -m
saber_jax.cli.<tool>` and `python -m saber_jax.main --config=configs/<name>.py` run from a
directory that is not a checkout, with nothing of the checkout on the path."""

import json
import os
import pathlib
import site
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
  """A new virtualenv holding the wheel of this checkout (built as `pip wheel` builds it, in
  an isolated build environment). Its dependencies come from this environment's
  site-packages (a plain path entry, so the checkout's own editable install does not come
  along) rather than from the package index, to stay quick."""
  root = tmp_path_factory.mktemp('install')
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps',
                  '-w', str(root / 'wheel'), str(ROOT)], check=True, cwd=root)
  wheel, = (root / 'wheel').glob('saber_jax-*.whl')
  venv = root / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
  python = venv / 'bin' / 'python'
  purelib = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'],
                           check=True, capture_output=True, text=True).stdout.strip()
  pathlib.Path(purelib, 'dependencies.pth').write_text('\n'.join(site.getsitepackages()) + '\n')
  subprocess.run([python, '-m', 'pip', 'install', '-q', '--no-deps', str(wheel)], check=True)
  work = root / 'elsewhere'
  work.mkdir()
  return venv, work


def _run(venv, work, *command, timeout=600):
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'JAX_COORDINATOR_ADDRESS')}
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
  result = subprocess.run([str(c) for c in command], cwd=work, env=env, capture_output=True,
                          text=True, timeout=timeout)
  assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
  return result.stdout


def test_installed_package_comes_from_the_wheel(installed):
  venv, work = installed
  where = _run(venv, work, venv / 'bin' / 'python', '-c', 'import saber_jax; '
                                                          'print(saber_jax.__file__)')
  assert where.startswith(str(venv)) and str(ROOT) not in where


def test_tools_and_the_demo_first_stage_run_from_another_directory(installed):
  venv, work = installed
  _run(venv, work, venv / 'bin' / 'saber-make-demo-data', '--out', 'raw', '--n', '4', '--seed', '1')
  _run(venv, work, venv / 'bin' / 'python', '-m', 'saber_jax.cli.preprocess',
       '--manifest', 'raw/clips.jsonl', '--annotations', 'raw/annotations.jsonl', '--out', 'sft',
       '--quiet')
  assert json.loads((work / 'sft' / 'stats.json').read_text())['records'] == 4
  # The demo's SED stage, with the shipped config named as in a checkout.
  _run(venv, work, venv / 'bin' / 'python', '-m', 'saber_jax.main', '--config=configs/demo.py',
       '--config.mode=sft', '--config.sft_records=sft/sft', '--config.optim.total_steps=2',
       '--config.workdir=run')
  assert (work / 'run' / 'sft' / 'final').is_dir()
  losses = [json.loads(line)['loss'] for line in open(work / 'run' / 'metrics.jsonl')]
  assert losses and all(loss > 0 for loss in losses)
