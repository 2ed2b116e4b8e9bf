"""Sample k responses per record from an OpenAI-compatible serving engine (vLLM, SGLang).

  vllm serve omni_out/ --served-model-name saber     # the full export (to-hf --base)
  saber-sample --base-url http://localhost:8000/v1 --model saber --records data/sft \\
      --manifest clips.jsonl --num-samples 10 --temperature 0.8 --max-tokens 1024 --out samples/

The same job as `mode=generate` (the JAX sampler) on a server: one chat-completions
request per record with `n` = --num-samples, and OUT/predictions.jsonl in exactly that
mode's schema, so `saber-make-pairs --samples OUT/predictions.jsonl` takes either:

  {"id", "response": sample 0, "responses": [k texts] (k > 1), "finished": [k bools:
   finish_reason 'stop', false when cut at --max-tokens], "num_tokens": [k ints: the
   response's tokens, EOS excluded], "logprob": [k floats: summed token log-probs as the
   server reports them; absent when it reports none]}

Messages. The record's prompt tokens (SFT: input_ids before the response; preference:
prompt_ids) are read back into chat messages: each <|im_start|>ROLE ... <|im_end|> turn
becomes a message, each media block a content part in its place, the text between them
text parts, and the trailing '<|im_start|>assistant\\n' is the generation prompt. Through
the exported processor's chat template they render to exactly the record's prompt.

Media. Records keep the model's inputs (log-mel features, resized uint8 frames), not the
clip: the server must compute features from a clip itself. So video and audio are the
source files the --manifest (saber-preprocess's: {"id", "video"?, "audio"?}) names,
sent as base64 data URLs (`video_url`, and `input_audio` WAV, decoded to 16 kHz mono when
the file is not a WAV); a video block holding audio tokens (the video's own track,
interleaved) sets `mm_processor_kwargs.use_audio_in_video` as vLLM's Qwen2.5-Omni expects;
when the manifest names a separate audio file for such a clip, it is muxed into the video
first (Matroska, the video stream copied, the audio as 16 kHz PCM: no re-encoding loss,
no padding).
Images are stored whole in the record and sent as PNG. A record whose media the manifest
lacks is an error line, not a guess.

Runs like the judged tools: --concurrency requests in flight, the SDK's retries with
backoff, finished ids skipped on a rerun (a torn last line dropped), failures in
OUT/errors.jsonl (retried next run, API keys redacted), a fingerprint of records,
manifest, model and sampling settings beside the output (a rerun with other settings is
refused, or --overwrite starts fresh).

Not the JAX sampler: the engine draws with its own RNG (--seed is passed on, but samples
are not reproducible across engines or against mode=generate), applies its own video
frame sampling to the clip, and its log-probs are the engine's.
"""

import base64
import io
import mimetypes
import os
import wave

import numpy as np

from saber_jax import files, fingerprint
from saber_jax.cli import _common
from saber_jax.data import prompt as prompt_lib
from saber_jax.data import records
from saber_jax.judge import runs

OUT_FILE = 'predictions.jsonl'


# ----------------------------------------------------------------------------- messages

def prompt_tokens(record: dict) -> np.ndarray:
  """The record's prompt: what `mode=generate` feeds the model."""
  if record['kind'] == records.PREFERENCE:
    return np.asarray(record['prompt_ids'])
  return np.asarray(record['input_ids'])[:records.prompt_length(record)]


def _media_kind(block: list[int], ids: prompt_lib.OmniTokenIds) -> tuple[str, bool]:
  """('video' | 'image' | 'audio', the video's audio interleaved) of one media block."""
  if ids.video in block:
    return 'video', ids.audio in block
  if ids.image in block:
    return 'image', False
  if ids.audio in block:
    return 'audio', False
  raise ValueError('a media block without placeholder tokens')


_NO_GENERATION_PROMPT = ("the prompt does not end with the generation prompt "
                         "'<|im_start|>assistant\\n'")


def parse_prompt(tokens, tokenizer) -> list[dict]:
  """The chat turns of rendered prompt tokens: [{'role', 'content': [parts]}], parts
  {'type': 'text', 'text'} or {'type': 'media', 'kind', 'audio_in_video'}; the last turn
  is the empty assistant turn of the generation prompt (dropped). ValueError when the
  tokens are not a chat-template rendering ending in the generation prompt."""
  ids = prompt_lib.OmniTokenIds.from_tokenizer(tokenizer)
  tokens = [int(t) for t in tokens]
  newline, = tokenizer.encode('\n', add_special_tokens=False)
  if not tokens or tokens[0] != ids.im_start:
    raise ValueError('the prompt does not start with <|im_start|>')
  turns, i = [], 0
  while i < len(tokens):
    if tokens[i] != ids.im_start:
      raise ValueError(f'token {i} is {tokens[i]}, expected <|im_start|> after a turn')
    end = tokens.index(ids.im_end, i) if ids.im_end in tokens[i:] else len(tokens)
    body = tokens[i + 1:end]
    if newline not in body:
      raise ValueError(_NO_GENERATION_PROMPT if end == len(tokens) else
                       f'the turn at token {i} has no newline after its role')
    header = tokenizer.decode(body[:body.index(newline)])
    content, text, j = [], [], body.index(newline) + 1
    while j < len(body):
      if body[j] in (ids.vision_bos, ids.audio_bos):
        close = ids.vision_eos if body[j] == ids.vision_bos else ids.audio_eos
        if close not in body[j:]:
          raise ValueError(f'the media block at token {i + 1 + j} is not closed')
        k = body.index(close, j)
        if text:
          content.append({'type': 'text', 'text': tokenizer.decode(text)})
          text = []
        kind, audio_in_video = _media_kind(body[j + 1:k], ids)
        content.append({'type': 'media', 'kind': kind, 'audio_in_video': audio_in_video})
        j = k + 1
      else:
        text.append(body[j])
        j += 1
    if text:
      content.append({'type': 'text', 'text': tokenizer.decode(text)})
    turns.append({'role': header, 'content': content})
    if end == len(tokens):
      break
    i = end + 1
    if i < len(tokens) and tokens[i] == newline:
      i += 1
  last = turns[-1] if turns else None
  if not last or last['role'] != 'assistant' or last['content'] or end != len(tokens):
    raise ValueError(_NO_GENERATION_PROMPT)
  if turns[0]['role'] != 'system':
    raise ValueError('the prompt has no system turn: the Qwen2.5-Omni chat template would '
                     'add one, so no messages render to these tokens')
  return turns[:-1]


def _data_url(path: str, default_type: str) -> str:
  kind = mimetypes.guess_type(path)[0] or default_type
  with open(path, 'rb') as f:
    return f'data:{kind};base64,{base64.b64encode(f.read()).decode()}'


def _wav_base64(path: str) -> str:
  """The audio as a base64 WAV: the file itself when it is one, else its audio track
  decoded to 16 kHz mono (as saber-preprocess decodes it)."""
  if path.lower().endswith('.wav'):
    with open(path, 'rb') as f:
      return base64.b64encode(f.read()).decode()
  from saber_jax.data import media
  samples = np.clip(media.load_audio(path), -1, 1)
  buffer = io.BytesIO()
  with wave.open(buffer, 'wb') as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(media.SAMPLING_RATE)
    w.writeframes((samples * 32767).astype('<i2').tobytes())
  return base64.b64encode(buffer.getvalue()).decode()


def _muxed_url(video_path: str, audio_path: str) -> str:
  """A Matroska data URL of the video's stream (copied) with the audio file as its track:
  16-bit PCM, 16 kHz mono as saber-preprocess decodes it, so the server's audio has the
  record's length to the sample (AAC in MP4 would pad it)."""
  import av
  from saber_jax.data import media
  samples = (np.clip(media.load_audio(audio_path), -1, 1) * 32767).astype(np.int16)
  buffer = io.BytesIO()
  with av.open(video_path) as source, av.open(buffer, 'w', format='matroska') as out:
    video = out.add_stream_from_template(source.streams.video[0])
    audio = out.add_stream('pcm_s16le', rate=media.SAMPLING_RATE, layout='mono')
    for packet in source.demux(source.streams.video[0]):
      if packet.dts is not None:
        packet.stream = video
        out.mux(packet)
    frame = av.AudioFrame.from_ndarray(samples[None], format='s16', layout='mono')
    frame.rate = media.SAMPLING_RATE
    for packet in [*audio.encode(frame), *audio.encode(None)]:
      out.mux(packet)
  return f'data:video/x-matroska;base64,{base64.b64encode(buffer.getvalue()).decode()}'


def _png_url(image: np.ndarray) -> str:
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format='PNG')
  return f'data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'


def request_messages(record: dict, clip: dict | None, tokenizer) -> tuple[list[dict], bool]:
  """(OpenAI chat messages of the record's prompt with its media, use_audio_in_video).
  `clip`: the record's manifest line with absolute paths (None: no line)."""
  turns = parse_prompt(prompt_tokens(record), tokenizer)
  rid = record['id']
  in_video = False
  messages = []
  for turn in turns:
    parts = []
    for part in turn['content']:
      if part['type'] == 'text':
        parts.append(part)
        continue
      kind = part['kind']
      if kind == 'image':
        if record.get('image') is None:
          raise runs.ItemError('no_media', f'record {rid!r}: an image block but no image field')
        parts.append({'type': 'image_url', 'image_url': {'url': _png_url(record['image'])}})
        continue
      source = (clip or {}).get(kind) or (clip or {}).get('video' if kind == 'audio' else '')
      if not source:
        raise runs.ItemError('no_media', f'record {rid!r}: a {kind} block but the manifest '
                             f'has no {kind!r} for it (pass --manifest)')
      if not os.path.exists(source):
        raise runs.ItemError('no_media', f'record {rid!r}: {kind} file {source} not found')
      if kind == 'video':
        in_video |= part['audio_in_video']
        separate = part['audio_in_video'] and (clip or {}).get('audio')
        if separate and not os.path.exists(separate):
          raise runs.ItemError('no_media', f'record {rid!r}: audio file {separate} not found')
        # The server takes interleaved audio from the video file's own track: a separate
        # audio file is muxed in first.
        url = _muxed_url(source, separate) if separate else _data_url(source, 'video/mp4')
        parts.append({'type': 'video_url', 'video_url': {'url': url}})
      else:
        parts.append({'type': 'input_audio',
                      'input_audio': {'data': _wav_base64(source), 'format': 'wav'}})
    if turn['role'] == 'system' and all(p['type'] == 'text' for p in parts):
      messages.append({'role': 'system', 'content': ''.join(p['text'] for p in parts)})
    else:
      messages.append({'role': turn['role'], 'content': parts})
  return messages, in_video


def template_messages(messages: list[dict]) -> list[dict]:
  """The messages as a chat template sees them after the server parses the OpenAI parts
  (vLLM: video_url -> {'type': 'video'}, input_audio -> 'audio', image_url -> 'image')."""
  kinds = {'video_url': 'video', 'input_audio': 'audio', 'audio_url': 'audio',
           'image_url': 'image'}
  out = []
  for m in messages:
    if isinstance(m['content'], str):
      out.append({'role': m['role'], 'content': [{'type': 'text', 'text': m['content']}]})
      continue
    out.append({'role': m['role'], 'content': [
        p if p['type'] == 'text' else {'type': kinds[p['type']]} for p in m['content']]})
  return out


# ----------------------------------------------------------------------------- the run

def sample_line(completion, num_samples: int, tokenizer) -> dict:
  """One record's output line (mode=generate's schema) from a chat completion."""
  choices = sorted(completion.choices or [], key=lambda c: c.index)
  if len(choices) != num_samples:
    raise runs.ItemFailure('invalid_reply', f'{len(choices)} choices, expected n={num_samples}')
  texts = [c.message.content or '' for c in choices]
  line = {'response': texts[0]}
  if num_samples > 1:
    line['responses'] = texts
  line['finished'] = [c.finish_reason == 'stop' for c in choices]
  line['num_tokens'] = [len(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
  logprobs = [getattr(getattr(c, 'logprobs', None), 'content', None) for c in choices]
  if all(lp is not None for lp in logprobs):
    line['logprob'] = [round(float(sum(t.logprob for t in lp)), 5) for lp in logprobs]
  return line


def _records(paths, args, manifest: dict[str, dict]):
  """The items of this shard: {'id', 'record', 'clip'}, or {'id': 'path:index', 'bad'}
  for a record that cannot be decoded (an error line, as in mode=generate)."""
  for index, (where, blob) in enumerate(records.read_records(paths)):
    if index % args.num_shards != args.shard_index:
      continue
    try:
      record = records.decode_record(blob, where)
    except records.RecordError as e:
      yield {'id': where, 'bad': str(e)}
      continue
    yield {'id': str(record['id']), 'record': record, 'clip': manifest.get(str(record['id']))}


def read_manifest(path: str | None) -> dict[str, dict]:
  """id -> manifest line with media paths made absolute (relative to the manifest's folder)."""
  if not path:
    return {}
  base = os.path.dirname(os.path.abspath(path))
  out = files.load_by_id(path)
  for clip in out.values():
    for key in ('video', 'audio'):
      if clip.get(key):
        clip[key] = os.path.join(base, clip[key])
  return out


def main(argv=None):
  parser = _common.tool_parser(__doc__)
  g = parser.add_argument_group('server (any OpenAI-compatible chat-completions endpoint)')
  g.add_argument('--base-url',
                 default=os.environ.get('OPENAI_BASE_URL', 'http://localhost:8000/v1'),
                 help='server URL ending in /v1; the key comes from $OPENAI_API_KEY, else "EMPTY"')
  g.add_argument('--model', required=True, help='model name the server serves')
  g.add_argument('--timeout', type=_common.positive(float), default=600.0,
                 help='seconds per request (all n samples)')
  g.add_argument('--max-retries', type=_common.at_least(0), default=3,
                 help='retries of a transport error (by the openai SDK, with backoff)')
  s = parser.add_argument_group('sampling')
  s.add_argument('--num-samples', type=_common.at_least(1), default=10, help='n per record')
  s.add_argument('--temperature', type=_common.in_range(0.0, 2.0), default=0.8,
                 help='in [0, 2]')
  s.add_argument('--top-p', type=_common.in_range(0.0, 1.0, low_open=True), default=1.0,
                 help='in (0, 1]')
  s.add_argument('--max-tokens', type=_common.at_least(1), required=True)
  s.add_argument('--seed', type=int, default=None, help="passed to the server's sampler")
  s.add_argument('--no-logprobs', action='store_true',
                 help='do not ask for token log-probs (servers without them)')
  parser.add_argument('--records', required=True, help='record shard prefix (or one file)')
  parser.add_argument('--manifest', default=None,
                      help="saber-preprocess's manifest: the clips' video / audio files")
  parser.add_argument('--tokenizer', default=None,
                      help='tokenizer directory (default: the offline Qwen2.5-Omni BPE)')
  parser.add_argument('--out', required=True, help='output folder')
  _common.add_run_args(parser, concurrency=16)
  args = parser.parse_args(argv)
  if not 0 <= args.shard_index < args.num_shards:
    raise SystemExit(f'--shard-index must be in [0, {args.num_shards}), got {args.shard_index}')

  try:
    paths = (records.shard_paths(args.records) if not os.path.isfile(args.records)
             else [args.records])
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f'error: --records {args.records}: {e}') from None
  try:
    manifest = read_manifest(args.manifest)
  except ValueError as e:
    raise SystemExit(f'error: --manifest: {e}') from None
  tokenizer = prompt_lib.load_tokenizer(args.tokenizer)
  from saber_jax.judge import client
  judge = client.Judge(client.JudgeConfig(base_url=args.base_url, model=args.model,
                                          timeout=args.timeout, max_retries=args.max_retries))
  import openai

  def process(item):
    if 'bad' in item:
      raise runs.ItemError('bad_record', item['bad'])
    try:
      messages, in_video = request_messages(item['record'], item['clip'], tokenizer)
    except ValueError as e:
      raise runs.ItemError('bad_prompt', f'record {item["id"]!r}: {e}') from None
    extra = {'mm_processor_kwargs': {'use_audio_in_video': True}} if in_video else None
    request = dict(model=args.model, messages=messages, n=args.num_samples,
                   temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    if args.seed is not None:
      request['seed'] = args.seed
    if not args.no_logprobs:
      request['logprobs'] = True
    try:
      completion = judge.client.chat.completions.create(**request, extra_body=extra)
    except openai.APIError as e:
      raise runs.ItemFailure(client.error_kind(e), judge._describe(e)) from None
    return sample_line(completion, args.num_samples, tokenizer)

  os.makedirs(args.out, exist_ok=True)
  out_path = os.path.join(args.out, OUT_FILE)
  produced_by = {
      'records': fingerprint.files_identity(paths),
      'manifest': fingerprint.tree_identity(args.manifest) if args.manifest else None,
      'server': {'model': args.model}, 'tokenizer': args.tokenizer,
      'sampling': {k: getattr(args, k) for k in ('num_samples', 'temperature', 'top_p',
                                                 'max_tokens', 'seed', 'no_logprobs')},
      'shard': [args.shard_index, args.num_shards]}
  try:
    summary = runs.run_jobs(_records(paths, args, manifest), process, out_path=out_path,
                            errors_path=os.path.join(args.out, 'errors.jsonl'),
                            concurrency=args.concurrency, max_items=args.max_items,
                            desc='sample', produced_by=produced_by, overwrite=args.overwrite)
  except (fingerprint.Mismatch, ValueError) as e:
    raise SystemExit(f'error: {e}') from None
  if summary.failed and not (summary.done or summary.skipped):
    raise SystemExit(f'error: sample: every record failed ({summary.failed}); the reasons are '
                     f'in {summary.errors_path}')
  print(f'wrote {out_path}')


if __name__ == '__main__':
  main()
