"""The data and evaluation programs, installed as console scripts (`saber-preprocess`, ...)
and runnable as `python -m saber_jax.cli.<tool>`. Each tool module has `main(argv=None)`,
which the demo pipeline and the tests call in-process.

A script imports its module only when run, so `saber-annotate` never loads JAX.
"""

import importlib


def _script(tool: str):
  def run() -> None:
    importlib.import_module(f'saber_jax.cli.{tool}').main()
  run.__name__ = tool
  return run


# Console-script entry points (pyproject.toml [project.scripts]): saber-<tool> -> main().
# (Named *_script so they never shadow the tool modules of this package.)
annotate_script = _script('annotate')
build_test_set_script = _script('build_test_set')
convert_hf_script = _script('convert_hf')
evaluate_script = _script('evaluate')
make_demo_data_script = _script('make_demo_data')
make_pairs_script = _script('make_pairs')
make_preference_records_script = _script('make_preference_records')
preprocess_script = _script('preprocess')
quality_script = _script('quality')
transcribe_script = _script('transcribe')
sample_script = _script('sample')
