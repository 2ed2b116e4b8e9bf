"""`mode=generate` at scale: k responses for every record of a set (CA-DPO pairs, evaluation).

  this process's records (global index % processes) -> decode, skip ids already done
  -> a window of prompts sorted by size -> batches of `batch_size` prompts per process
  -> batch shapes agreed by all processes (the largest of each bucket size)
  -> `decode.generate_inputs` with rows sharded over ('data', 'fsdp')
  -> JSONL lines appended and fsynced per batch -> per-process files merged at the end

Batches are built by the training collate code (`data.collate`: `data_shard_batches`,
`media_sizes` with the ladders of `config.data`, `encode` with left padding), one data
shard per data-parallel device, so a whole run compiles once per bucket it uses. Memory
is bounded by the window (decoded prompts of `window_batches` batches) and the set of
finished ids.

Sample j of record `id` draws from fold_in(fold_in(key(seed), hash(id)), j): the same
tokens whatever the batch size, process count, bucket or resume point.

Output, one line per record, in `<out>.part<process>` while running and merged into
`<out>` (each id once) at the end:

  {"id", "response": text of sample 0, "responses": [k texts] (k > 1),
   "finished": [k bools: the sample ended with an EOS id, false when cut at
   max_new_tokens], "num_tokens": [k ints, EOS excluded], "logprob": [k floats: summed
   log-probs of the sample's tokens, EOS included, under the model at temperature 1]}

A torn last line (a kill mid-write) is dropped on restart. SIGTERM / SIGINT
(`train.preemption`) stops every process after the same batch, once its lines are
fsynced: the parts stay unmerged and a restart carries on with the ids not yet written.
A batch that fails is split down to single prompts (one process only; with several, a
device failure stops the run); a prompt that still fails, or a record that cannot be
decoded, goes to `errors.jsonl` next to `<out>` ({"id", "where", "reason"}; per process
in `errors.jsonl.part<process>` until the merge) and is skipped, also on later runs. When
every prompt of a batch fails before any batch of the run has worked, the run stops with
the error instead (a broken setup, not bad clips).

An `<out>` on an object store (`gs://...`, a URL) cannot take appends. Each process
downloads the output's objects (merged files, parts) into a local staging directory,
appends there as above, and every `upload_every` batches, and when it stops (the end, a
stop request, an error), uploads its new lines whole as a new object
`<name>.part<process>.<time>-<random>` and starts its local part afresh. At the end
process 0 merges the part objects of every process into `<out>` and errors.jsonl, writes
them whole, then removes the parts. A SIGKILL loses the batches since the last upload
(done again on restart); a stop request loses nothing. The fingerprint file on an object
store takes no lock (files.acquire_lock): one run per output.
"""

import contextlib
import dataclasses
import hashlib
import itertools
import os
import tempfile
import time
import uuid
from typing import Callable, Iterator, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from saber_jax import decode, files, fingerprint, sharding, weights
from saber_jax.data import collate as collate_lib
from saber_jax.data import datasets, examples, records
from saber_jax.data import prompt as prompt_lib
from saber_jax.models.config import ThinkerConfig
from saber_jax.train import preemption

SIZE_KEYS = ('num_audio_chunks', 'num_audio_tokens', 'num_patches', 'num_windows',
             'window_len', 'num_frames', 'frame_len')


def id_stream(record_id: str) -> int:
  """A record's random stream: 32 bits of sha256(id), the same in every process."""
  return int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:4], 'little')


@dataclasses.dataclass
class Prompt:
  """One record's prompt, ready to collate."""
  id: str
  where: str
  example: examples.Example
  size: tuple[int, ...]      # (length bucket, media sizes of the record alone): the sort key


# ------------------------------------------------------------------------------ output

def part_path(path: str, process: int) -> str:
  return f'{path}.part{process}'


def errors_path(out_path: str) -> str:
  return os.path.join(os.path.dirname(files.absolute(out_path)), 'errors.jsonl')


def line_key(line: dict) -> str | None:
  """What a line of the output or of errors.jsonl is about: its record's id, or the
  record's 'path:index' when its id could not be read."""
  return str(line['id']) if line.get('id') is not None else line.get('where')


def output_files(out_path: str) -> list[str]:
  """Those of `out_path`, errors.jsonl and their parts that exist (local, or objects)."""
  whole = [out_path, errors_path(out_path)]
  return [p for p in whole if files.exists(p)] + [
      part for p in whole for part in files.with_prefix(p + '.part')]


def finished_ids(out_path: str) -> set[str]:
  """Ids done or given up on: in `out_path`, errors.jsonl or any process's part of either
  (by 'path:index' for a record whose id could not be read)."""
  return {line_key(line) for path in output_files(out_path)
          for line in files.read_whole_lines(path)} - {None}


def merge_process_parts(path: str) -> int:
  """`path` rewritten (atomically) with its lines and those of every part file
  (`<path>.part*`), each `line_key` once; the part files removed. Returns the number of
  lines."""
  parts = files.with_prefix(path + '.part')
  seen = set()
  with files.atomic_open(path) as f:
    for source in [path] + parts:
      for line in files.read_whole_lines(source):
        if line_key(line) not in seen:
          seen.add(line_key(line))
          f.write(files.jsonl_line(line))
  for source in parts:
    os.remove(source)
  return len(seen)


def download_into(sources: Sequence[str], folder: str) -> None:
  """Each object (or file) of `sources` into `folder`, under its own name."""
  for source in sources:
    files.download(source, os.path.join(folder, os.path.basename(source)))


def merge_remote(url: str) -> int:
  """`merge_process_parts` of an object and its part objects: merged in a local temporary
  directory, `url` written whole, then the parts removed (a kill in between leaves parts
  whose lines `url` holds already: merged once again, each key once)."""
  parts = files.with_prefix(url + '.part')
  with tempfile.TemporaryDirectory(prefix='saber-merge-') as local:
    download_into([url] + parts, local)
    merged = os.path.join(local, os.path.basename(url))
    count = merge_process_parts(merged)
    files.upload(merged, url)
  for source in parts:
    files.remove(source)
  return count


def merge_outputs(out_path: str) -> int:
  """Process 0 at the end: every part merged into `out_path` and into errors.jsonl (made
  only when a record failed). Returns the number of lines of `out_path`."""
  merge = merge_remote if files.is_url(out_path) else merge_process_parts
  errors = errors_path(out_path)
  if files.exists(errors) or files.with_prefix(errors + '.part'):
    merge(errors)
  return merge(out_path)


@contextlib.contextmanager
def staged(out_path: str) -> Iterator[str]:
  """The path this process appends to: `out_path` itself when local. For a URL, the same
  name in a local staging directory (removed afterwards) into which the output's objects
  are downloaded first (merged file, errors.jsonl, every part of both, names kept), so a
  run resumed on another machine sees the same finished ids."""
  if not files.is_url(out_path):
    yield out_path
    return
  with tempfile.TemporaryDirectory(prefix='saber-generate-') as local:
    download_into(output_files(out_path), local)
    yield os.path.join(local, os.path.basename(out_path))


def upload_parts(local_out: str, out_path: str, process: int) -> None:
  """For a URL `out_path`: this process's staged part files (lines, errors) uploaded
  whole as new objects `<name>.part<process>.<time>-<random>`, then removed locally so
  the next upload holds only newer lines. Nothing for a local `out_path`."""
  if not files.is_url(out_path):
    return
  stamp = f'{time.time_ns()}-{uuid.uuid4().hex[:8]}'
  for local, remote in ((local_out, out_path), (errors_path(local_out), errors_path(out_path))):
    part = part_path(local, process)
    if os.path.exists(part) and os.path.getsize(part):
      files.upload(part, f'{part_path(remote, process)}.{stamp}')
      os.remove(part)


# ------------------------------------------------------------------------------ prompts

def make_prompt(record: dict, where: str, model_config: ThinkerConfig,
                options: examples.DataConfig) -> Prompt:
  """A record's prompt and media (patched here, once) with its bucket sizes; RecordError
  or ValueError for a record that cannot be generated from."""
  example = examples.prompt_example(record, model_config, where)
  length = collate_lib.length_bucket(len(example.rows[0]['input_ids']), options.length_buckets)
  sizes = collate_lib.media_sizes(collate_lib.data_shard_batches([example], 1, 1, length),
                                  model_config, options)
  return Prompt(str(record['id']), where, example, (length,) + tuple(sizes[k] for k in SIZE_KEYS))


def readable_shards(paths: Sequence[str]) -> tuple[list[str], list[records.RecordError]]:
  """(the shards that open, the errors of those that do not)."""
  readable, errors = [], []
  for path in paths:
    try:
      records.count_records(path)
      readable.append(path)
    except records.RecordError as e:
      errors.append(e)
  return readable, errors


def _own_records(paths: Sequence[str], process: int, count: int, skip: Sequence[int] = ()
                 ) -> Iterator[tuple[str, bytes | records.RecordError]]:
  """('path:index', blob) of every `count`-th record from `process` on, read lazily; a
  record (or a whole shard, 'path') Riegeli cannot read comes as its RecordError instead,
  so the caller logs it and goes on. `skip`: positions among the readable shards left out
  (records repeating earlier ones)."""
  readable, errors = readable_shards(paths)
  if process == 0:
    for path, error in zip([p for p in paths if p not in readable], errors):
      yield path, error
  source, skip = records.ShardSource(readable), set(skip)
  for index in range(process, len(source), count):
    if index in skip:
      continue
    try:
      yield source.where(index), source[index]
    except records.RecordError as e:
      yield source.where(index), e


def windows(prompts: Iterator[Prompt], batch_size: int, window_batches: int
            ) -> Iterator[list[Prompt]]:
  """Batches of up to `batch_size` prompts: each window of `window_batches` batches sorted
  by size, so a batch's prompts pad to the same buckets."""
  window: list[Prompt] = []

  def flush():
    window.sort(key=lambda p: p.size)
    for start in range(0, len(window), batch_size):
      yield window[start:start + batch_size]
    window.clear()

  for p in prompts:
    window.append(p)
    if len(window) == batch_size * window_batches:
      yield from flush()
  yield from flush()


# ------------------------------------------------------------------------------ batches

def collate_prompts(prompts: Sequence[Prompt | None], model_config, options,
                    num_data_shards: int) -> tuple[list[dict], np.ndarray]:
  """(processor-style batch of each data shard, the shape it needs: int
  [1 + len(SIZE_KEYS)], the length bucket and the media sizes; zeros if all padding)."""
  real = [p for p in prompts if p is not None]
  length = max([p.size[0] for p in real] + [1])
  shards = collate_lib.data_shard_batches([p and p.example for p in prompts], num_data_shards,
                                          1, length)
  if not real:
    return shards, np.zeros(1 + len(SIZE_KEYS), np.int64)
  sizes = collate_lib.media_sizes(shards, model_config, options)
  return shards, np.array([length] + [sizes[k] for k in SIZE_KEYS], np.int64)


def agree(shape: np.ndarray) -> np.ndarray:
  """The shape every process uses: the largest of each size (all on their ladders)."""
  if jax.process_count() == 1:
    return shape
  return np.asarray(multihost_utils.process_allgather(shape)).max(axis=0)


def batch_inputs(prompts: Sequence[Prompt | None], shards: list[dict], shape: np.ndarray,
                 model_config, pad_token_id: int) -> dict:
  """Host arrays of `generate_inputs` for this process's rows, left padded to `shape`."""
  length, sizes = int(shape[0]), dict(zip(SIZE_KEYS, (int(s) for s in shape[1:])))
  inputs = collate_lib.encode(shards, model_config, sizes, padding='left', length=length,
                              pad_id=pad_token_id, keep_text=False)
  first = decode.first_new_positions(inputs['position_ids'], inputs['attention_mask'])
  streams = np.array([id_stream(p.id) if p is not None else 0 for p in prompts], np.uint32)
  return dict(inputs=inputs, first=first, streams=streams)


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a global array sharded over its leading axis (split over the
  batch axes, as `generate_inputs` returns them)."""
  if jax.process_count() > 1 and x.is_fully_replicated:
    raise ValueError('a replicated result: its rows are not split over the processes')
  shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


@dataclasses.dataclass
class Stats:
  written: int = 0
  skipped: int = 0
  errors: int = 0
  repeated: int = 0            # records repeating earlier ones byte for byte, dropped
  batches: int = 0
  padding_rows: int = 0
  row_steps: int = 0           # rows x decode steps run
  useful_row_steps: int = 0    # of those, steps of a row before its end
  stopped: bool = False        # on request (preemption), before the last batch
  shapes: set = dataclasses.field(default_factory=set)   # distinct batch shapes run


def sample_records(config, model_config: ThinkerConfig, params, mesh, record_paths,
                   out_path: str, tokenizer, limit: int | None = None,
                   after_batch: Callable[[int], None] = lambda step: None
                   ) -> tuple[list[dict], Stats]:
  """The loop of `generate_stage` (see the module docstring) over a local `out_path`;
  `after_batch(step)` runs once each batch's lines are written. Returns (the lines this
  process wrote when `limit` is set, else [], the counts)."""
  g = config.generate
  options = examples.data_options(config.data)
  process, count = jax.process_index(), jax.process_count()
  num_data_shards = max(mesh.shape['data'] * mesh.shape['fsdp'] // count, 1)
  if g.batch_size % num_data_shards:
    raise ValueError(f'generate.batch_size ({g.batch_size}) must be a multiple of the '
                     f'{num_data_shards} data-parallel devices of each process')
  settings = decode.DecodeSettings(
      int(g.max_new_tokens), float(g.temperature), int(g.top_k), float(g.top_p),
      int(g.num_samples), tuple(g.get('eos_token_ids') or decode.EOS_TOKEN_IDS),
      int(g.get('pad_token_id', decode.PAD_TOKEN_ID)))
  settings.check_ids(model_config.text.vocab_size)
  model_config = dataclasses.replace(model_config, attention='xla')   # left-padded prompts
  key = jax.random.key(config.seed)
  own_part, own_errors = part_path(out_path, process), part_path(errors_path(out_path), process)
  files.repair_tail(own_part)
  files.repair_tail(own_errors)
  done = finished_ids(out_path)
  stats, kept = Stats(), []
  # Before any sampling: two different records of one id would give one line for two
  # prompts (RecordError naming both places); a record repeated byte for byte is dropped.
  readable = readable_shards(datasets.resolve_paths(record_paths))[0]
  repeats = records.repeated_records(readable, tolerate_damaged=True)
  stats.repeated = len(repeats)
  if repeats and process == 0:
    print(f'[generate] {len(repeats)} records repeat earlier ones byte for byte (a shard '
          'given twice?): each is sampled once', flush=True)

  def error(prompt_id, where, reason):
    files.append_jsonl(own_errors, [dict(id=prompt_id, where=where, reason=reason)])
    stats.errors += 1
    print(f'[generate] skipped {prompt_id or where}: {reason}', flush=True)

  def prompts() -> Iterator[Prompt]:
    taken = 0
    for where, blob in _own_records(datasets.resolve_paths(record_paths), process, count,
                                    repeats):
      if limit is not None and taken >= limit:
        return
      if where in done:
        stats.skipped += 1
        continue
      try:
        if isinstance(blob, records.RecordError):
          raise blob
        record = records.decode_record(blob, where)
      except records.RecordError as e:
        error(None, where, str(e))
        continue
      if str(record['id']) in done:
        stats.skipped += 1
        continue
      taken += 1
      try:
        yield make_prompt(record, where, model_config, options)
      except ValueError as e:     # RecordError, MediaError, too long for every bucket
        error(str(record['id']), where, str(e))

  def collate(batch: list[Prompt | None]):
    return collate_prompts(batch, model_config, options, num_data_shards)

  def run(batch: list[Prompt | None], shards: list[dict], shape: np.ndarray) -> None:
    host = batch_inputs(batch, shards, shape, model_config, settings.pad_token_id)
    placed = sharding.global_batch(host, mesh)
    stats.shapes.add(tuple(int(x) for x in shape))
    with jax.set_mesh(mesh):           # rows stay split through the decode loop
      out = decode.generate_inputs(model_config, settings, params, placed['inputs'],
                                     placed['first'], key, placed['streams'])
    out = {k: local_rows(v) if v.ndim else np.asarray(v) for k, v in out.items()}
    write(batch, out)

  def write(batch: list[Prompt | None], out: dict) -> None:
    n = settings.num_samples
    texts = decode.decode_responses(tokenizer, out['tokens'], out['lengths'])
    logprob = out['logprobs'].sum(-1)        # 0 after the EOS; the EOS itself counts
    lines = []
    for b, p in enumerate(batch):
      if p is None:
        continue
      rows = slice(b * n, (b + 1) * n)
      line = dict(id=p.id, response=texts[b * n])
      if n > 1:
        line['responses'] = texts[rows]
      line.update(finished=out['finished'][rows].tolist(),
                  num_tokens=out['lengths'][rows].tolist(),
                  logprob=[round(float(x), 5) for x in logprob[rows]])
      lines.append(line)
    files.append_jsonl(own_part, lines)
    stats.written += len(lines)
    stats.batches += 1
    stats.padding_rows += sum(p is None for p in batch)
    stats.row_steps += int(out['steps']) * len(out['lengths'])
    live = out['lengths'] + out['finished']  # steps each row ran before its end
    stats.useful_row_steps += int(np.minimum(live, out['steps']).sum())
    if limit is not None:
      kept.extend(lines)

  def run_or_split(batch: list[Prompt | None], failed: list) -> None:
    """One process: a failing batch is halved (padding keeps its size) down to one
    prompt; the prompts that fail alone are added to `failed` with the error."""
    real = [p for p in batch if p is not None]
    try:
      run(batch, *collate(batch))
    except Exception as e:  # noqa: BLE001 - any failure of one batch: isolate the prompt
      if len(real) == 1:
        failed.append((real[0], e))
        return
      half = len(real) // 2
      for part in (real[:half], real[half:]):
        run_or_split(part + [None] * (len(batch) - len(part)), failed)

  def run_batch(batch: list[Prompt | None]) -> None:
    failed = []
    run_or_split(batch, failed)
    if failed and len(failed) == sum(p is not None for p in batch) and not stats.written:
      # Nothing has worked yet: a fault of the setup, not of these clips; keep them.
      raise failed[-1][1]
    for p, e in failed:
      error(p.id, p.where, f'{type(e).__name__}: {e}')

  batches = windows(prompts(), g.batch_size, int(g.get('window_batches', 32)))
  for step in itertools.count(1):
    batch = next(batches, None)
    batch = list(batch or []) + [None] * (g.batch_size - len(batch or []))
    if count == 1:
      if not any(batch):
        break
      run_batch(batch)
    else:
      # Several processes step together: every one runs each step, with padding rows when
      # it has no prompts left, until none has.
      shards, shape = collate(batch)
      shape = agree(shape)
      if not shape[0]:
        break
      run(batch, shards, shape)
    after_batch(step)
    if preemption.reached(step):     # this batch's lines are fsynced: stop here
      stats.stopped = True
      break
  return kept, stats


def _check_fingerprint(config, record_paths, init_from: str, out_path: str) -> None:
  """Resume only output made from the same records, weights and sampling settings (batch
  size and process count do not change a sample); else an error naming what differs, or
  `config.overwrite` starts fresh."""
  outputs = output_files(out_path)
  g = config.generate
  produced_by = {'records': fingerprint.files_identity(datasets.resolve_paths(record_paths)),
                 'seed': config.seed, **weights.weights_identity(config, init_from),
                 'generate': {k: g[k] for k in ('max_new_tokens', 'temperature', 'top_p', 'top_k',
                                                'num_samples', 'tokenizer')}}
  fingerprint.ensure(os.path.splitext(out_path)[0] + '.' + fingerprint.FILE, produced_by,
                     has_output=bool(outputs), overwrite=config.get('overwrite', False),
                     clear=lambda: [files.remove(p) for p in outputs],
                     overwrite_hint='--config.overwrite=True', writer=jax.process_index() == 0)
  multihost_utils.sync_global_devices('generate: output checked')


def warn_short_budget(max_new_tokens: int, paths) -> int:
  """Warns when the records' own answers (their SED targets, EOS included) are longer
  than `max_new_tokens`: samples of that length would be cut, and a cut sample is never
  a chosen answer. Returns the longest answer's token count."""
  sizes = records.load_sizes(paths)
  longest = int(sizes[:, records.SIZE_FIELDS.index('response_tokens')].max(initial=0))
  if longest > max_new_tokens:
    print(f'[generate] warning: the records\' answers reach {longest} tokens but '
          f'generate.max_new_tokens is {max_new_tokens}: answers that long will be cut '
          f'(set it to ~{int(longest * 1.5)})', flush=True)
  return longest


def generate_stage(config, record_paths, init_from: str, out_path: str,
                   limit: int | None = None) -> list[dict]:
  """Responses of the model at `init_from` to the prompts of the records, in the JSONL
  `out_path` (see the module docstring); finished ids are skipped, so a killed run resumes.
  `limit`: at most this many new prompts per process, and their lines are returned (the
  demo's one answer); otherwise returns []. `out_path` may be a URL (see the module
  docstring)."""
  if not files.is_url(out_path):
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  _check_fingerprint(config, record_paths, init_from, out_path)
  if jax.process_index() == 0:
    try:
      warn_short_budget(config.generate.max_new_tokens, datasets.resolve_paths(record_paths))
    except records.RecordError as e:    # a damaged shard: its records go to errors.jsonl
      print(f'[generate] warning: answer lengths not checked: {e}', flush=True)
  model_config = weights.model_config_of(config)
  mesh = sharding.make_mesh(config.mesh)
  params = weights.initial_params(config, model_config, mesh, init_from)
  tokenizer = prompt_lib.load_tokenizer(config.generate.tokenizer or None)
  start, compiled = time.perf_counter(), decode.generate_inputs._cache_size()
  process, every = jax.process_index(), int(config.generate.upload_every)
  with staged(out_path) as local_out:

    def after_batch(step: int) -> None:
      if step % every == 0:
        upload_parts(local_out, out_path, process)

    try:
      kept, stats = sample_records(config, model_config, params, mesh, record_paths,
                                   local_out, tokenizer, limit, after_batch)
    finally:                    # at the end, on a stop request, on an error
      upload_parts(local_out, out_path, process)
  waste = 1 - stats.useful_row_steps / max(stats.row_steps, 1)
  print(f'[generate] process {jax.process_index()}: {stats.written} prompts in {stats.batches} '
        f'batches of {len(stats.shapes)} shapes, {time.perf_counter() - start:.1f} s, '
        f'{decode.generate_inputs._cache_size() - compiled} compilations; '
        f'{stats.skipped} already done, {stats.errors} errors, {stats.padding_rows} padding '
        f'rows, {waste:.0%} of decode row-steps after a row ended', flush=True)
  multihost_utils.sync_global_devices('generate: parts written')
  if stats.stopped:
    raise preemption.stopped(f'[generate] stopped after {stats.batches} batches: '
                             f'{stats.written} new lines in {part_path(out_path, "*")}')
  if jax.process_index() == 0:
    print(f'[generate] {merge_outputs(out_path)} lines in {out_path}', flush=True)
  multihost_utils.sync_global_devices('generate: merged')
  return kept
