"""What the judged tools share: the judge and run arguments, the fingerprinted judged run,
the judge client from the arguments and line sharding of an input file."""

import argparse
import os
import sys
from typing import Iterable, Iterator

from saber_jax import files, fingerprint
from saber_jax.judge import runs


def tool_parser(doc: str) -> argparse.ArgumentParser:
  """Every tool's parser: its module docstring as the help text, line breaks kept."""
  return argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def produced_nothing(what: str, counts: str, reason, see: str) -> SystemExit:
  """The one-line exit of a tool whose run kept or wrote nothing: what, the counts, the most
  frequent reason and the file with the details."""
  return SystemExit(f'error: {what} ({counts}; most frequent reason: {reason}; see {see})')


def add_judge_args(parser: argparse.ArgumentParser, *, timeout: float = 60.0,
                   concurrency: int = 8, model_required: bool = True) -> None:
  """The judge endpoint's arguments and the run's (`add_run_args`); a tool that needs the
  judge only in some modes passes `model_required=False` and checks `--model` itself."""
  g = parser.add_argument_group('judge endpoint (any OpenAI-compatible chat-completions server)')
  g.add_argument('--base-url', default=os.environ.get('OPENAI_BASE_URL', 'http://localhost:8000/v1'),
                 help='server URL ending in /v1 (default: $OPENAI_BASE_URL or a local vLLM); '
                      'the key comes from $OPENAI_API_KEY, else "EMPTY"')
  g.add_argument('--model', required=model_required, help='model name the server knows')
  g.add_argument('--temperature', type=in_range(0.0, 2.0), default=0.0, help='in [0, 2]')
  g.add_argument('--max-tokens', type=at_least(1), default=None,
                 help='>= 1 (default: the server decides)')
  g.add_argument('--timeout', type=positive(float), default=timeout, help='seconds per request')
  g.add_argument('--max-retries', type=at_least(0), default=3,
                 help='retries of a transport error (by the openai SDK, with backoff) and '
                      're-asks of an unusable reply')
  g.add_argument('--response-format', choices=('json_schema', 'json_object', 'none'),
                 default='json_schema', help='json_object / none for servers without json_schema')
  add_run_args(parser, concurrency)


def add_run_args(parser: argparse.ArgumentParser, concurrency: int = 8) -> None:
  g = parser.add_argument_group('run')
  g.add_argument('--concurrency', type=at_least(1), default=concurrency, help='requests in flight')
  g.add_argument('--max-items', type=at_least(0), default=None,
                 help='start at most this many new items (smoke runs)')
  g.add_argument('--shard-index', type=at_least(0), default=0)
  g.add_argument('--num-shards', type=at_least(1), default=1,
                 help='process only input lines i with i %% num_shards == shard_index')
  g.add_argument('--overwrite', action='store_true',
                 help='delete results made from other inputs, judge or settings and start '
                      'fresh (by default such a rerun is an error naming what differs)')


def dashed(argv: list[str] | None, parser: argparse.ArgumentParser) -> list[str]:
  """`argv` with the old underscore spellings of the parser's options (`--num_shards`,
  `--sft_records=X`) replaced by its dashed ones, each with a deprecation note."""
  argv = list(sys.argv[1:] if argv is None else argv)
  known = set(parser._option_string_actions)
  out = []
  for arg in argv:
    name, eq, value = arg.partition('=')
    if arg.startswith('--') and '_' in name and name not in known:
      new = name.replace('_', '-')
      if new in known:
        print(f'note: {name} is deprecated, spell it {new}', file=sys.stderr)
        arg = new + eq + value
    out.append(arg)
  return out


def at_least(minimum, kind=int):
  """An argparse type: `kind` values >= minimum, else a usage error naming the bound."""
  def parse(text):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f'expected {kind.__name__}, got {text!r}') from None
    if value < minimum:
      raise argparse.ArgumentTypeError(f'must be >= {minimum}, got {text}')
    return value
  parse.__name__ = kind.__name__
  return parse


def in_range(low, high, kind=float, *, low_open=False):
  """An argparse type: `kind` values in [low, high] ((low, high] with `low_open`), else a
  usage error naming the range."""
  def parse(text):
    value = at_least(low, kind)(text)
    if value > high or (low_open and value == low):
      raise argparse.ArgumentTypeError(
          f'must be in {"(" if low_open else "["}{low}, {high}], got {text}')
    return value
  parse.__name__ = kind.__name__
  return parse


def positive(kind=float):
  """An argparse type: `kind` values > 0."""
  def parse(text):
    value = at_least(0, kind)(text)
    if value == 0:
      raise argparse.ArgumentTypeError(f'must be > 0, got {text}')
    return value
  parse.__name__ = kind.__name__
  return parse


def produced_by(args: argparse.Namespace, input_path: str, also: tuple[str, ...]) -> dict:
  """The fingerprint of a judged run: the judge, the input file, the shard and the
  arguments named in `also` (files by identity: path, size, modification time)."""
  value = lambda v: fingerprint.tree_identity(v) if isinstance(v, str) and os.path.isfile(v) else v
  return {'judge': {k: getattr(args, k) for k in ('model', 'temperature', 'max_tokens',
                                                  'response_format')},
          'input': fingerprint.tree_identity(input_path),
          'shard': [args.shard_index, args.num_shards],
          **{name: value(getattr(args, name)) for name in also}}


def run_judged(args: argparse.Namespace, items, process, *, input_path: str, out_path: str,
               desc: str, total: int | None = None, also: tuple[str, ...] = (),
               produced: dict | None = None) -> runs.RunSummary:
  """`runs.run_jobs` over the items of `input_path`, fingerprinted by `produced_by`
  (`also`: the other arguments that change the judge's results; `produced`: the whole
  fingerprint instead, for tools without a judge); exits with an error
  (status 1) before any request when an input id repeats or the output belongs to other
  inputs or settings, and after the run when every item failed."""
  try:
    files.check_unique_ids(input_path)
    run = runs.run_jobs(items, process, out_path=out_path,
                        errors_path=os.path.join(args.out, 'errors.jsonl'),
                        concurrency=args.concurrency, max_items=args.max_items, total=total,
                        desc=desc,
                        produced_by=produced or produced_by(args, input_path, also),
                        overwrite=args.overwrite)
  except files.DuplicateId as e:
    raise SystemExit(f'error: {e}; nothing was sent to the judge') from None
  except (fingerprint.Mismatch, ValueError) as e:
    raise SystemExit(f'error: {e}') from None
  if run.failed and not (run.done or run.skipped):
    raise SystemExit(f'error: {desc}: every item failed ({run.failed}); the reasons are in '
                     f'{run.errors_path}')
  return run


def judge_from_args(args: argparse.Namespace):
  """The `client.Judge` the judge arguments describe (the openai SDK is imported here)."""
  from saber_jax.judge import client
  return client.Judge(client.JudgeConfig(
      base_url=args.base_url, model=args.model, temperature=args.temperature,
      max_tokens=args.max_tokens, timeout=args.timeout, max_retries=args.max_retries,
      response_format=args.response_format))


def sharded(records: Iterable[dict], args: argparse.Namespace) -> Iterator[dict]:
  """This shard's records (`--shard-index` of `--num-shards`, by line)."""
  if not 0 <= args.shard_index < args.num_shards:
    raise SystemExit(f'--shard-index must be in [0, {args.num_shards}), got {args.shard_index}')
  return files.sharded(records, args.shard_index, args.num_shards)


def shard_total(path: str, args: argparse.Namespace) -> int:
  """How many records of `path` this shard processes (for the progress bar)."""
  return files.shard_size(files.count_lines(path), args.shard_index, args.num_shards)
