"""The README's "Your own clips, end to end" block, run as written: generated clips, a
loopback judge, a tiny silent ASR model and the demo's tiny thinker stand in for the
user's clips, judge, Whisper and 7B. Every command reads the previous one's output as it
is; nothing is written by hand between them. Then the refusals that guard the chain: a
reference pass rerun from other weights and a stage with too few records each stop with
one `error:` line."""

import importlib
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import threading

import pytest

from asr_helpers import save_tiny_ctc
from judge_server import judge_server, user_text  # noqa: F401 (fixture)
from processes import cpu_env
from saber_jax import files
from saber_jax.cli import make_demo_data

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# The README's variables, for this test: the demo's tiny thinker from random weights,
# stages cut to a few steps. SFT batches of 4 over the 8 training clips; DPO batches of 2
# pairs.
TINY = ('--config=configs/demo.py --config.optim.warmup_steps=1 --config.log_every=1 '
        '--config.checkpoint.every_steps=1000 --config.generate.batch_size=8')
SFT = f'{TINY} --config.optim.lr=3e-3 --config.optim.min_lr_ratio=1 --config.optim.total_steps=20'
DPO = f'{TINY} --config.optim.lr=2e-4 --config.optim.total_steps=2 --config.data.batch_size=2'
# Sizes a test can afford, replaced where the README writes the paper's.
SMALLER = {'--per-class 900': '--per-class 1', 'num_samples=10': 'num_samples=4'}


def readme_block() -> tuple[dict[str, str], list[str]]:
  """(variables, commands) of the README block between the own-clips markers."""
  text = (ROOT / 'README.md').read_text()
  block = text.split('<!-- own-clips:begin -->')[1].split('<!-- own-clips:end -->')[0]
  lines = block.strip().removeprefix('```bash').removesuffix('```').replace('\\\n', ' ')
  variables, commands = {}, []
  for line in lines.splitlines():
    line = ' '.join(line.split())
    match = re.fullmatch(r'(?:export )?([A-Z_]+)=(.*)', line)
    if match:
      variables[match[1]] = match[2].strip('"')
    elif line:
      commands.append(line)
  return variables, commands


def expand(command: str, variables: dict[str, str]) -> list[str]:
  for old, new in SMALLER.items():
    command = command.replace(old, new)
  command = re.sub(r'\$([A-Z_]+)', lambda m: variables[m[1]], command)
  return shlex.split(command)


# The judge's annotations: short, so that the tiny thinker learns within a few SFT steps
# to end its answers (a sample cut at max_new_tokens is never a chosen answer).
MOODS = {'en': [('A smile.', 'Bright, quick humming.', 'Happy.'),
                ('A frown.', 'Low, slow humming.', 'Sad.'),
                ('A smile.', 'Low, slow humming.', 'Mixed: happy face, sad voice.')],
         'zh': [('微笑。', '明快的哼唱。', '开心。'),
                ('皱眉。', '低沉缓慢的哼唱。', '难过。'),
                ('微笑。', '低沉缓慢的哼唱。', '矛盾：脸开心，声音难过。')]}
SCENE = {'en': ('A cartoon face.', 'Still.'), 'zh': ('一张卡通脸。', '静止。')}


def annotation(lang: str, k: int) -> dict:
  face, voice, sentiment = MOODS[lang][k % len(MOODS[lang])]
  video, body = SCENE[lang]
  return {'video_desc': video, 'facial_exp_desc': face, 'body_lang_desc': body,
          'audio_desc': {'speech_content': '', 'acoustic_feat': voice},   # hummed: no words
          'sentiment_analysis': sentiment}


def judge():
  """The loopback judge's answers, by the reply schema each tool asks for."""
  counts, lock = {}, threading.Lock()

  def next_of(kind):
    with lock:
      counts[kind] = counts.get(kind, 0) + 1
      return counts[kind] - 1

  def answer(body):
    kind = body['response_format']['json_schema']['name']
    if kind == 'saber_annotation':    # the clip's language, as the prompt is written in it
      lang = 'zh' if re.search(r'[\u4e00-\u9fff]', user_text(body)) else 'en'
      return json.dumps(annotation(lang, next_of(lang)), ensure_ascii=False)
    if kind == 'av_relation':
      k = next_of(kind)
      return json.dumps({'relation': ('consistent', 'inconsistent')[k % 2], 'intensity': k % 10})
    if kind == 'response_score':      # prefers concise answers; different ones differ
      response = user_text(body).split('Response to grade:')[1]
      return json.dumps({'logical_consistency': max(0, 10 - len(response) // 80),
                         'evidence_alignment': sum(map(ord, response)) % 3})
    if kind == 'saber_test':
      return json.dumps({d: 2 for d in ('VD', 'SCD', 'AFD', 'FE', 'BL', 'CR')})
    raise AssertionError(f'unexpected judge request {kind}')
  return answer


def run_command(argv: list[str], log: list[str]) -> str:
  """One README command: a saber-* tool in this process (its console script's main), or
  `python -m saber_jax.main` as its own process. A failure shows the output."""
  log.append(shlex.join(argv))
  if argv[0].startswith('saber-'):
    tool = importlib.import_module('saber_jax.cli.' + argv[0][len('saber-'):].replace('-', '_'))
    try:
      tool.main(argv[1:])
    except SystemExit as e:
      pytest.fail(f'{log[-1]} exited: {e}')
    return ''
  assert argv[:3] == ['python', '-m', 'saber_jax.main'], argv
  done = subprocess.run([sys.executable, *argv[1:]], env=cpu_env(1), capture_output=True,
                        text=True, timeout=900)
  assert done.returncode == 0, f'{log[-1]}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}'
  return done.stdout + done.stderr


def test_readme_chain_runs_on_generated_clips(judge_server, tmp_path, monkeypatch):
  make_demo_data.make_demo_data(str(tmp_path), n=10, seed=0)    # clips.jsonl, media/
  os.remove(tmp_path / 'annotations.jsonl')   # the judge annotates, from the clips
  server = judge_server(judge(), lifetime=1800)
  variables, commands = readme_block()
  assert set(variables) == {'OPENAI_API_KEY', 'J', 'ASR', 'BASE', 'SFT', 'DPO', 'W'}
  variables.update(J=f'--base-url {server.base_url} --model test-judge --concurrency 2',
                   ASR=save_tiny_ctc(str(tmp_path / 'asr_model'), silent=True), BASE='',
                   SFT=SFT, DPO=DPO, W='work')
  monkeypatch.chdir(tmp_path)
  log = []
  for command in commands:
    run_command(expand(command, variables), log)

  read = lambda path: list(files.read_jsonl(str(tmp_path / path)))
  kept = read('qc/kept.jsonl')
  assert len(kept) == 10 and all(r['qc']['wer'] == 0.0 for r in kept)
  test_ids = {r['id'] for r in read('test/test_set.jsonl')}
  assert len(test_ids) == 2
  sft = json.loads((tmp_path / 'sft' / 'stats.json').read_text())
  assert (sft['records'], sft['left_out']) == (8, 2)
  samples = read('work/samples/predictions.jsonl')
  assert {s['id'] for s in samples}.isdisjoint(test_ids) and len(samples) == 8
  pairs = read('pairs/pairs.jsonl')
  assert pairs and not {p['id'] for p in pairs} & test_ids
  assert all(not p['chosen'][0].isspace() and not p['rejected'][0].isspace() for p in pairs)
  pref = json.loads((tmp_path / 'pref' / 'stats.json').read_text())
  assert (pref['records'], pref['rejected']) == (len(pairs), 0)
  predictions = read('work/test/predictions.jsonl')
  assert {p['id'] for p in predictions} == test_ids
  summary = json.loads((tmp_path / 'eval' / 'summary.json').read_text())
  assert (tmp_path / 'eval' / 'report.md').exists() and summary

  # The reference pass rerun from other weights is refused, in one line.
  ref = next(c for c in commands if 'mode=ref_logps' in c)
  argv = expand(ref.replace('$W/sft/final', '$W/dpo/final'), variables)
  done = subprocess.run([sys.executable, *argv[1:]], env=cpu_env(1), capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 1
  assert re.search(r'^error: .*ref_logps holds an earlier output', done.stderr, re.M)
  assert 'init_from' in done.stderr and 'Traceback' not in done.stderr
  # DPO with fewer pairs than one global batch: refused in one line, naming the count.
  dpo = next(c for c in commands if 'mode=dpo' in c)
  argv = expand(dpo + ' --config.data.batch_size=64 --config.workdir=$W/big', variables)
  done = subprocess.run([sys.executable, *argv[1:]], env=cpu_env(1), capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 1 and 'Traceback' not in done.stderr
  assert f'error: {len(pairs)} records are fewer than one global batch of 64' in done.stderr
