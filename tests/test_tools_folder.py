"""The project card's top-level `tools/`: one entry script per console script, each the same
program (`saber_jax.cli.<tool>.main`) and runnable as `python tools/<name>.py` from a checkout,
from any directory, with nothing installed on the path."""

import concurrent.futures
import os
import pathlib
import re
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _scripts() -> dict[str, str]:
  """saber-<tool> -> tool module name, from pyproject.toml's [project.scripts]."""
  scripts = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['scripts']
  return {name: re.fullmatch(r'saber_jax\.cli:(\w+)_script', target).group(1)
          for name, target in scripts.items()}


def test_every_console_script_has_its_tool_and_no_other_tool_exists():
  tools = sorted(p.stem for p in (ROOT / 'tools').glob('*.py'))
  assert tools == sorted(_scripts().values())
  for tool in tools:
    assert (ROOT / 'saber_jax' / 'cli' / f'{tool}.py').exists(), tool


def test_every_tool_prints_its_help_from_another_directory(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  env['JAX_PLATFORMS'] = 'cpu'

  def run(tool):
    return tool, subprocess.run([sys.executable, str(ROOT / 'tools' / f'{tool}.py'), '--help'],
                                cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = list(pool.map(run, sorted(_scripts().values())))
  for tool, result in results:
    assert result.returncode == 0, (tool, result.stderr[-2000:])
    assert result.stdout.startswith(f'usage: {tool}.py'), (tool, result.stdout[:200])
    # The same program as the console script: its module docstring is the help's text.
    module_doc = (ROOT / 'saber_jax' / 'cli' / f'{tool}.py').read_text().split('"""')[1]
    first_line = module_doc.strip().splitlines()[0]
    assert first_line[:40] in result.stdout, (tool, first_line)
