"""Run a SABER-LLM stage: `python -m saber_jax.main --config=configs/<x>.py [--config.k=v]`.

config.mode: sft (SED fine-tuning), ref_logps (the frozen reference's log-probs written
into the preference records), dpo (CA-DPO), pipeline (every stage in order; the demo
config also makes its data) or generate (JSONL predictions for a record set).
`--config.dry_run=True` compiles the step for the mesh without weights and prints its
per-device memory. A user error (an invalid config, a refused rerun, too few records,
missing record shards or weights) is one `error: ...` line and exit status 1; `--debug`
shows its traceback.
"""

import os
import signal
import sys

if __name__ == '__main__':
  # SIGTERM / SIGINT go to one watcher thread (saber_jax/train/preemption.py): blocked here,
  # before JAX starts its threads (they inherit the mask), so a signal never cuts a
  # collective's connect or read short.
  signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})

if (any(a.startswith('--config.dry_run') and not a.endswith(('False', 'false', '0'))
        for a in sys.argv) and 'XLA_FLAGS' not in os.environ):
  # A dry run on a CPU-only host still plans for 8 accelerators.
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
if any(a.startswith('--config.dry_run_topology=') and a.partition('=')[2] for a in sys.argv):
  # Compiling for a TPU slice needs libtpu but no TPU: keep this process off any local TPU
  # and let libtpu load beside other JAX processes of this host.
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

from absl import app, flags, logging  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from saber_jax import configs, errors, pipeline, sampling  # noqa: E402
from saber_jax.train import config as config_lib, dry_run, preemption, stages  # noqa: E402

CONFIGS = os.path.dirname(os.path.abspath(configs.__file__))
DEFAULT_CONFIG = os.path.join(CONFIGS, 'demo.py')
_CONFIG = config_flags.DEFINE_config_file('config', DEFAULT_CONFIG, 'run config file')
_DEBUG = flags.DEFINE_bool('debug', False, 'show the traceback of a user error')
# What a user fixes by changing the input or the command; anything else is a bug.
USER_ERRORS = (errors.UserError, FileNotFoundError)


def with_packaged_configs(argv: list[str]) -> list[str]:
  """`--config=configs/<name>.py[:arg]` names the shipped config when no such file is here
  (an installed package run from any directory)."""
  def resolve(arg):
    if not arg.startswith('--config='):
      return arg
    path, colon, rest = arg[len('--config='):].partition(':')
    shipped = os.path.join(CONFIGS, os.path.basename(path))
    if not os.path.exists(path) and os.path.dirname(path) == 'configs' and os.path.exists(shipped):
      return f'--config={shipped}{colon}{rest}'
    return arg
  return [resolve(arg) for arg in argv]


def initialize_distributed(config) -> None:
  """`jax.distributed.initialize()` when the config or the environment asks for it: an
  explicit coordinator, SLURM, or a TPU pod / cloud environment JAX detects itself."""
  d = config.distributed
  if d.initialize == 'never':
    return
  # CPU processes (tests, laptops) reduce over gloo; GPUs and TPUs use their own.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if d.coordinator_address:
    jax.distributed.initialize(coordinator_address=d.coordinator_address,
                               num_processes=d.num_processes or None,
                               process_id=None if d.process_id < 0 else d.process_id)
  elif d.initialize == 'always' or 'SLURM_NTASKS' in os.environ \
      or 'JAX_COORDINATOR_ADDRESS' in os.environ:
    jax.distributed.initialize()


def run(config) -> None:
  """The stage `config.mode` names (or its dry run)."""
  if config.dry_run:
    dry_run.dry_run(config, 'dpo' if config.mode == 'dpo' else 'sft')
  elif config.mode == 'sft':
    stages.train_stage(config, 'sft', config.sft_records, config.init_from)
  elif config.mode == 'ref_logps':
    stages.ref_logps_stage(config, config.pref_records, config.init_from)
  elif config.mode == 'dpo':
    stages.train_stage(config, 'dpo', config.pref_records, config.init_from)
  elif config.mode == 'generate':
    sampling.generate_stage(config, config.generate.records, config.init_from,
                            os.path.join(config.workdir, 'predictions.jsonl'))
  elif config.mode == 'pipeline':
    pipeline.run_pipeline(config)
  else:
    raise ValueError(f'unknown mode {config.mode!r}: sft, ref_logps, dpo, generate, pipeline')


def main(argv):
  del argv
  try:
    start(_CONFIG.value)
  except USER_ERRORS as e:
    if _DEBUG.value:
      raise
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


def start(config) -> None:
  config_lib.validate(config)
  logging.set_verbosity(logging.WARNING)     # Orbax logs every save step at INFO
  if config.compilation_cache:
    # Restarts and later stages reuse compiled steps instead of compiling again.
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(config.compilation_cache))
  initialize_distributed(config)
  preemption.listen()          # SIGTERM / SIGINT: save the step in flight, then exit 0
  if jax.process_index() == 0:
    print(f'saber_jax: mode={config.mode} devices={jax.device_count()} '
          f'({jax.devices()[0].platform}) processes={jax.process_count()} '
          f'workdir={config.workdir}', flush=True)
  try:
    run(config)
  except preemption.Stopped as e:
    print(e, flush=True)       # exit status 0: the scheduler may restart the same command


if __name__ == '__main__':
  argv = with_packaged_configs(sys.argv)
  config_lib.check_overrides(argv, DEFAULT_CONFIG)
  app.run(main, argv=argv)
