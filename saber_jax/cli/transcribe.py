"""ASR transcripts of clips, the reference of saber-quality's speech check.

  saber-transcribe --manifest clips.jsonl --out asr/ --model DIR_OR_HUB_NAME \\
      [--language clip|en|zh|auto] [--batch-size 8] [--device cpu|cuda:0]

Each clip's audio (the `audio` file, else the video's own track; decoded to 16 kHz mono
as preprocessing decodes it) goes through transformers' `automatic-speech-recognition`
pipeline, --batch-size clips per forward pass for Whisper (which pads every clip to
its 30 s window anyway; other models, which would transcribe a batch's padding, take one
clip at a time). Any model that pipeline loads works: Whisper
for real runs (see the README for the checkpoint), a CTC model in the tests.

--language: `clip` (default) asks a Whisper model for each clip's manifest `lang`;
`en` / `zh` force one language; `auto` lets the model detect it. Models without a
language setting (CTC) ignore it.

Output: OUT/transcripts.jsonl, one line per clip {"id", "lang", "transcript"} (what
`saber-quality --transcripts` reads), written like the judged tools' results: one
fsync'ed line per clip, finished ids skipped on a rerun, clips that could not be decoded
in OUT/errors.jsonl (retried next run), OUT/transcripts.fingerprint.json naming the
model (its files), the manifest and the settings (a rerun with others is refused, or
starts fresh with --overwrite); --shard-index/--num-shards split the manifest.
Needs PyTorch (`pip install -e ".[asr]"`).
"""

import concurrent.futures
import os
import queue
import threading

from saber_jax import files, fingerprint
from saber_jax.cli import _common
from saber_jax.data import media
from saber_jax.judge import runs

LANGUAGES = ('clip', 'en', 'zh', 'auto')


def model_identity(model: str):
  """A local model directory by its files; a hub name as itself (its revision is the hub's)."""
  return fingerprint.tree_identity(model) if os.path.isdir(model) else model


def is_whisper(asr) -> bool:
  return getattr(asr.model.config, 'model_type', '') == 'whisper'


def generate_kwargs(asr, lang: str | None) -> dict:
  """The pipeline's generate settings for one clip language (None: let the model detect)."""
  if not is_whisper(asr):
    return {}
  kwargs = {'task': 'transcribe'}
  if lang is not None:
    kwargs['language'] = lang     # Whisper takes the code ('en', 'zh') as its language
  return kwargs


class Batcher:
  """Gathers the clips the run's threads decode into batches for one pipeline call.

  `transcribe(waveform, lang)` blocks until its batch ran. One worker thread takes what
  is waiting (up to `batch_size`, waiting `linger` s for more), groups it by language
  and calls `run(waveforms, lang) -> texts`; a batch that fails is retried clip by clip,
  so one bad clip fails alone (its exception is raised in its caller)."""

  def __init__(self, run, batch_size: int, linger: float = 0.2):
    self.run, self.batch_size, self.linger = run, batch_size, linger
    self.queue: queue.Queue = queue.Queue()
    self.thread = threading.Thread(target=self._work, daemon=True)
    self.thread.start()

  def transcribe(self, waveform, lang):
    future = concurrent.futures.Future()
    self.queue.put((waveform, lang, future))
    return future.result()

  def close(self) -> None:
    self.queue.put(None)
    self.thread.join()

  def _take(self):
    first = self.queue.get()
    if first is None:
      return None
    batch = [first]
    while len(batch) < self.batch_size:
      try:
        item = self.queue.get(timeout=self.linger)
      except queue.Empty:
        break
      if item is None:
        self.queue.put(None)
        break
      batch.append(item)
    return batch

  def _work(self) -> None:
    while (batch := self._take()) is not None:
      for lang in dict.fromkeys(lang for _, lang, _ in batch):
        group = [item for item in batch if item[1] == lang]
        try:
          texts = self.run([w for w, _, _ in group], lang)
        except Exception:   # one clip may be the cause: find it
          texts = None
        for k, (waveform, _, future) in enumerate(group):
          if texts is not None:
            future.set_result(texts[k])
            continue
          try:
            future.set_result(self.run([waveform], lang)[0])
          except Exception as e:
            future.set_exception(e)


def load_pipeline(args):
  try:
    import torch  # noqa: F401  (the pipeline runs on PyTorch)
  except ImportError:
    raise SystemExit('error: saber-transcribe needs PyTorch: pip install -e ".[asr]"') from None
  import transformers
  return transformers.pipeline('automatic-speech-recognition', model=args.model,
                               device=args.device)


def make_processor(args, batcher: Batcher, base_dir: str):
  def process(item: dict) -> dict:
    rid = str(item['id'])
    lang = item.get('lang')
    if lang not in ('en', 'zh'):
      raise runs.ItemError('bad_input', f"clip {rid!r}: 'lang' must be 'en' or 'zh', got {lang!r}")
    path = item.get('audio') or item.get('video')
    if not isinstance(path, str) or not path:
      raise runs.ItemError('bad_input', f"clip {rid!r}: needs an 'audio' or 'video' path")
    path = path if os.path.isabs(path) else os.path.join(base_dir, path)
    try:
      waveform = media.load_audio(path)
    except media.MediaError as e:
      raise runs.ItemError('bad_input', f'clip {rid!r}: {e}') from None
    asked = {'clip': lang, 'auto': None}.get(args.language, args.language)
    try:
      text = batcher.transcribe(waveform, asked)
    except Exception as e:  # noqa: BLE001  (the model failed on this clip alone)
      raise runs.ItemError('asr_failed', f'clip {rid!r}: {type(e).__name__}: {e}') from None
    return {'lang': lang, 'transcript': text.strip()}
  return process


def parse_args(argv=None):
  parser = _common.tool_parser(__doc__)
  parser.add_argument('--manifest', required=True, help='clips JSONL: id, video and/or audio, lang')
  parser.add_argument('--out', required=True, help='output folder')
  parser.add_argument('--model', required=True,
                      help='ASR model: a local directory or a hub name the pipeline loads')
  parser.add_argument('--language', choices=LANGUAGES, default='clip',
                      help="Whisper's language: each clip's manifest lang (default), one "
                           'for all, or detected')
  parser.add_argument('--batch-size', type=_common.at_least(1), default=8,
                      help='clips per forward pass')
  parser.add_argument('--device', default=None, help='torch device (default: the CPU)')
  _common.add_run_args(parser, concurrency=16)
  return parser.parse_args(_common.dashed(argv, parser))


def main(argv=None) -> runs.RunSummary:
  args = parse_args(argv)
  if not os.path.isfile(args.manifest):
    raise SystemExit(f'error: {args.manifest}: no such file')
  asr = load_pipeline(args)

  def run(waveforms, lang):
    settings = generate_kwargs(asr, lang)
    inputs = [{'raw': w, 'sampling_rate': media.SAMPLING_RATE} for w in waveforms]
    outputs = asr(inputs, batch_size=len(inputs),
                  **({'generate_kwargs': settings} if settings else {}))
    return [o['text'] for o in outputs]

  # Whisper pads every clip to its 30 s window, so a batch gives each clip what it would
  # get alone; other models (CTC) see the batch's padding and would transcribe it too.
  batcher = Batcher(run, args.batch_size if is_whisper(asr) else 1)
  produced_by = {'asr': {'model': model_identity(args.model), 'language': args.language},
                 'input': fingerprint.tree_identity(args.manifest),
                 'shard': [args.shard_index, args.num_shards]}
  try:
    return _common.run_judged(
        args, _common.sharded(files.read_jsonl(args.manifest), args),
        make_processor(args, batcher, os.path.dirname(os.path.abspath(args.manifest))),
        input_path=args.manifest, out_path=os.path.join(args.out, 'transcripts.jsonl'),
        total=_common.shard_total(args.manifest, args), desc='transcribe',
        produced=produced_by)
  finally:
    batcher.close()


if __name__ == '__main__':
  main()
