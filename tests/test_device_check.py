"""`benchmarks/device_check.py --smoke`: the prepared GPU check runs end to end on tiny
shapes on the CPU, so it cannot rot before a GPU comes (its GPU figures are in the README
once measured)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_check_smoke_writes_every_section(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'device_check.py'),
                         f'--out={tmp_path}', '--smoke'], capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / 'device_check.json').read_text())
  sections = result['sections']
  assert set(sections) == {'sed_lora_7b', 'dpo_7b_lora', 'decode_7b', 'sed_slice_full'}
  for name in ('sed_lora_7b', 'sed_slice_full'):
    r = sections[name]
    assert r['step_s'] > 0 and r['tokens'] == 2 * 128 and r['mfu_measured_peak'] > 0, name
    assert r['xla_memory']['total_gib'] > 0, name
  dpo = sections['dpo_7b_lora']
  assert dpo['shared']['rows'] == 1 and dpo['two_rows']['rows'] == 2
  # The same pair in both layouts: the shared row holds the prompt once.
  assert dpo['shared']['tokens'] < dpo['two_rows']['tokens']
  assert abs(dpo['shared']['first_loss'] - dpo['two_rows']['first_loss']) < 1e-2
  assert dpo['shared_prompt_speedup'] > 0
  decode = sections['decode_7b']    # 8 tokens on a shared CPU: the rates are noise here
  assert decode['prefill_s'] > 0 and decode['total_s'] > 0
  assert decode['weight_bytes_per_step'] > 0 and decode['kv_cache_bytes_per_step'] > 0
  assert 'shared-prompt pair row' in (tmp_path / 'device_check.md').read_text()


def test_device_check_refuses_a_cpu_without_smoke(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'device_check.py'),
                         f'--out={tmp_path}', '--sections=decode_7b'], capture_output=True,
                        text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=300)
  assert proc.returncode != 0 and 'needs a GPU, found cpu' in proc.stderr
