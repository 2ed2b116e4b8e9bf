"""Annotate clips with the SABER six-dimension description through an
OpenAI-compatible multimodal endpoint (a vLLM-served Qwen2.5-Omni, Gemini/GPT via a
gateway, ...).

Input: a manifest JSONL, one clip per line:
  {"id": "c1", "video": "clips/c1.mp4", "audio": "clips/c1.wav", "lang": "en"|"zh", ...}
(`video` and/or `audio`; relative paths are resolved against the manifest's folder;
without `audio` the video's own audio track is used). Each clip is sent as
`--num-frames` evenly spaced frames (JPEG data URLs in image_url parts) plus the audio
as 16 kHz mono WAV in an `input_audio` part (`--no-audio` sends frames only).

Output: OUT/annotations.jsonl, the manifest record plus
  "annotation": {video_desc, audio_desc: {speech_content, acoustic_feat},
                 facial_exp_desc, body_lang_desc, sentiment_analysis}
validated (exact keys, non-empty, written in the clip's language); failures in
OUT/errors.jsonl, retried on the next run. A clip longer than --max-seconds (30 s, as
saber-preprocess) is an error ('too_long') and is not sent.

  saber-annotate --manifest clips.jsonl --out ann/ \\
      --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-Omni-7B
"""

import base64
import io
import os
import re
import wave

import numpy as np

from saber_jax import files
from saber_jax.cli import _common
from saber_jax.data import annotation as annotation_lib
from saber_jax.data import clips, media
from saber_jax.judge import replies, runs

# ----------------------------------------------------------------------------- prompts
# Written after the SABER paper's description of its annotation: describe the video,
# transcribe the speech with <...> sound-event tags, describe the voice, the face and
# the body, then reason to the sentiment from that evidence.

PROMPT_EN = """You are annotating a short video clip for multimodal emotion understanding.
{media}
Describe only what can be seen and heard; do not guess beyond the evidence. Reply with one JSON \
object with exactly these keys:
- "video_desc": the scene, the people in it, their appearance and what they do, in temporal order.
- "audio_desc": an object with two keys:
  - "speech_content": the spoken words, transcribed verbatim in the language spoken. Mark \
non-speech sound events where they occur with angle brackets, e.g. <laughter>, <sigh>, <applause>, \
<music>. Use an empty string if there is neither speech nor a sound event.
  - "acoustic_feat": the voice: gender, pitch, loudness, speaking rate, tone, and how they change.
- "facial_exp_desc": facial expressions (eyebrows, eyes, mouth) of the people and how they change.
- "body_lang_desc": posture, gestures and movements.
- "sentiment_analysis": reason from the evidence above to the overall emotion and sentiment of the \
clip. Say whether the visual cues (face, body, scene) and the acoustic cues (words, voice) agree \
or conflict, and which cues decide your conclusion.
Write every value except "speech_content" in English."""

PROMPT_ZH = """你正在为一段短视频做多模态情感理解标注。
{media}
只描述能看到和听到的内容，不要超出证据进行猜测。请输出一个JSON对象，且只包含以下键：
- "video_desc"：场景、画面中的人物、他们的外貌和动作，按时间顺序描述。
- "audio_desc"：包含两个键的对象：
  - "speech_content"：按所说语言逐字转写说话内容。在出现的位置用尖括号标注非语音的声音事件，例如\
<笑声>、<叹气>、<掌声>、<音乐>。既没有说话也没有声音事件时填空字符串。
  - "acoustic_feat"：声音特征：性别、音高、音量、语速、语气及其变化。
- "facial_exp_desc"：人物的面部表情（眉毛、眼睛、嘴部）及其变化。
- "body_lang_desc"：姿势、手势和动作。
- "sentiment_analysis"：根据以上证据推理出片段整体的情绪和情感倾向。说明视觉线索\
（表情、肢体、场景）与听觉线索（话语、声音）是一致还是矛盾，以及哪些线索决定了你的结论。
除"speech_content"外，所有字段都用中文书写。"""

MEDIA_EN = {
    (True, True): 'You are given {n} frames sampled evenly from the clip, in temporal order, and '
                  'its audio track.',
    (True, False): 'You are given {n} frames sampled evenly from the clip, in temporal order. No '
                   'audio is provided: fill "speech_content" and "acoustic_feat" only with what '
                   'the frames show (e.g. lip movement), and say that the audio was not available.',
    (False, True): 'You are given the audio track only; there is no video. Fill the visual fields '
                   'with "No video available."',
}
MEDIA_ZH = {
    (True, True): '提供了从片段中按时间顺序均匀采样的{n}帧画面及其音轨。',
    (True, False): '提供了从片段中按时间顺序均匀采样的{n}帧画面，没有音频："speech_content"和'
                   '"acoustic_feat"只填写画面能体现的内容（如口型），并说明没有音频。',
    (False, True): '只提供了音轨，没有画面。视觉相关字段填写"无视频。"',
}


# The SABER six-dimension annotation (see saber_jax/data/annotation.py). This spec is
# what the annotator is asked for (exact keys, sent as the json_schema); the content
# rules are the shared ones, applied by `annotation.checked_annotation`.
class AudioDescription(replies.Reply):
  speech_content: str
  acoustic_feat: replies.NonEmpty


class AnnotationReply(replies.Reply):
  video_desc: replies.NonEmpty
  audio_desc: AudioDescription
  facial_exp_desc: replies.NonEmpty
  body_lang_desc: replies.NonEmpty
  sentiment_analysis: replies.NonEmpty


def annotation_prompt(lang: str, num_frames: int, with_audio: bool) -> str:
  prompt, media = {'en': (PROMPT_EN, MEDIA_EN), 'zh': (PROMPT_ZH, MEDIA_ZH)}[lang]
  return prompt.format(media=media[(num_frames > 0, with_audio)].format(n=num_frames))


# ----------------------------------------------------------------------------- media


def sample_indices(num_available: int, num_samples: int) -> list[int]:
  """Evenly spaced frame indices, each at the centre of its 1/num_samples slice."""
  n = min(num_available, num_samples)
  return [int((k + 0.5) * num_available / n) for k in range(n)]


def decode_frames(path: str, num_frames: int, max_side: int, quality: int = 90) -> list[bytes]:
  """`num_frames` evenly spaced frames of the first video stream as JPEG bytes, the
  longer side scaled down to `max_side`. Two passes (count, then decode) so only the
  chosen frames are ever converted to images."""
  import av
  with av.open(path) as container:
    if not container.streams.video:
      return []
    stream = container.streams.video[0]
    total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
  if total == 0:
    return []
  wanted = sample_indices(total, num_frames)
  wanted_set, frames, last = set(wanted), [], None
  with av.open(path) as container:
    for i, frame in enumerate(container.decode(video=0)):
      last = frame
      if i in wanted_set:
        frames.append(_jpeg(frame, max_side, quality))
        if len(frames) == len(wanted):
          break
  # The container's frame count can overstate what decodes; fill from the last frame.
  if last is not None and len(frames) < len(wanted):
    frames.append(_jpeg(last, max_side, quality))
  return frames


def _jpeg(frame, max_side: int, quality: int) -> bytes:
  image = frame.to_image()
  image.thumbnail((max_side, max_side))
  buf = io.BytesIO()
  image.save(buf, format='JPEG', quality=quality)
  return buf.getvalue()


def audio_wav(path: str, sample_rate: int = media.SAMPLING_RATE) -> bytes | None:
  """The first audio stream as 16-bit mono WAV bytes at `sample_rate`, decoded as the
  training features are (`media.load_audio`); None if the file has no audio."""
  if not media.probe(path).has_audio:
    return None
  pcm = np.round(np.clip(media.load_audio(path, sample_rate), -1.0, 1.0) * 32767).astype('<i2')
  buf = io.BytesIO()
  with wave.open(buf, 'wb') as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(sample_rate)
    w.writeframes(pcm.tobytes())
  return buf.getvalue()


def build_annotation_messages(prompt: str, frames: list[bytes], wav: bytes | None) -> list[dict]:
  """The chat messages for one clip: the prompt, then each frame as an image_url data
  URL, then the audio as input_audio (base64 WAV). Pure: bytes in, JSON-able out."""
  content = [{'type': 'text', 'text': prompt}]
  for jpeg in frames:
    url = 'data:image/jpeg;base64,' + base64.b64encode(jpeg).decode('ascii')
    content.append({'type': 'image_url', 'image_url': {'url': url}})
  if wav is not None:
    content.append({'type': 'input_audio',
                    'input_audio': {'data': base64.b64encode(wav).decode('ascii'),
                                    'format': 'wav'}})
  return [{'role': 'user', 'content': content}]


# ----------------------------------------------------------------------------- language

_CJK = re.compile(r'[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]')
_LATIN = re.compile(r'[A-Za-z]')
_DESCRIPTIVE = ('video_desc', 'facial_exp_desc', 'body_lang_desc', 'sentiment_analysis')


def cjk_fraction(text: str) -> float:
  """CJK characters / (CJK characters + Latin letters); 0 for text with neither."""
  cjk, latin = len(_CJK.findall(text)), len(_LATIN.findall(text))
  return cjk / (cjk + latin) if cjk + latin else 0.0


def check_language(annotation: dict, lang: str) -> None:
  """InvalidReply unless the descriptive fields are written in `lang` (speech content
  is exempt: it is a transcript of whatever was said)."""
  texts = [annotation[k] for k in _DESCRIPTIVE] + [annotation['audio_desc']['acoustic_feat']]
  fraction = cjk_fraction(' '.join(texts))
  if lang == 'zh' and fraction < 0.5:
    raise replies.InvalidReply('the descriptions must be written in Chinese (中文)')
  if lang == 'en' and fraction >= 0.5:
    raise replies.InvalidReply('the descriptions must be written in English')


# ----------------------------------------------------------------------------- main


def wav_seconds(wav: bytes) -> float:
  with wave.open(io.BytesIO(wav)) as w:
    return w.getnframes() / w.getframerate()


def check_duration(rid: str, paths: list[str], max_seconds: float,
                   wav_seconds: float | None = None) -> None:
  """ItemError('too_long') for a clip longer than `max_seconds` (preprocessing's limit:
  such a clip never becomes a record, and sent whole it is a request of many MB), by its
  containers' headers before decoding, and by the decoded audio when a header says
  nothing."""
  lengths = [(path, media.probe(path).duration) for path in paths]
  if wav_seconds is not None:
    lengths.append(('its decoded audio', wav_seconds))
  for where, seconds in lengths:
    if seconds > max_seconds:
      raise runs.ItemError('too_long', f'clip {rid!r}: {where}: {seconds:.1f} s > '
                                       f'--max-seconds {max_seconds} s; not sent')


def make_processor(args, judge, base_dir: str):
  def resolve(path):
    return path if os.path.isabs(path) else os.path.join(base_dir, path)

  def process(item: dict) -> dict:
    rid = str(item['id'])
    lang = item.get('lang')
    if lang not in ('en', 'zh'):
      raise runs.ItemError('bad_input', f"clip {rid!r}: 'lang' must be 'en' or 'zh', got {lang!r}")
    video, audio = item.get('video'), item.get('audio')
    if not video and not audio:
      raise runs.ItemError('bad_input', f"clip {rid!r}: needs a 'video' or 'audio' path")
    try:
      check_duration(rid, [resolve(p) for p in (video, audio) if p], args.max_seconds)
      frames = decode_frames(resolve(video), args.num_frames, args.frame_size) if video else []
      wav = None
      if not args.no_audio:
        wav = audio_wav(resolve(audio or video), args.sample_rate)
        check_duration(rid, [], args.max_seconds, wav_seconds=wav and wav_seconds(wav))
    except runs.ItemError:
      raise
    except Exception as e:  # PyAV raises many types (FileNotFoundError, InvalidDataError, ...)
      raise runs.ItemError('bad_input',
                           f'clip {rid!r}: cannot decode media: {type(e).__name__}: {e}')
    if not frames and wav is None:
      raise runs.ItemError('bad_input', f'clip {rid!r}: no video frames and no audio decoded')
    prompt = annotation_prompt(lang, len(frames), wav is not None)
    def check(reply_value):
      try:
        annotation = annotation_lib.checked_annotation(reply_value, rid)
      except annotation_lib.AnnotationError as e:
        raise replies.InvalidReply(str(e)) from None
      check_language(annotation, lang)
      return annotation

    reply = judge.ask(build_annotation_messages(prompt, frames, wav), AnnotationReply,
                      name='saber_annotation', check=check)
    return {**{k: v for k, v in item.items() if k != 'annotation'},
            'annotation': reply.value, 'annotator': args.model}

  return process


def parse_args(argv=None):
  parser = _common.tool_parser(__doc__)
  parser.add_argument('--manifest', required=True, help='clips JSONL: id, video and/or audio, lang')
  parser.add_argument('--out', required=True, help='output folder')
  parser.add_argument('--num-frames', type=_common.at_least(1), default=16,
                      help='frames sent per clip (>= 1)')
  parser.add_argument('--frame-size', type=_common.at_least(28), default=448,
                      help='longer side of a frame, pixels (>= 28)')
  parser.add_argument('--sample-rate', type=_common.in_range(8000, 48000, int),
                      default=media.SAMPLING_RATE, help='Hz, in [8000, 48000]')
  parser.add_argument('--max-seconds', type=_common.positive(float),
                      default=clips.Settings.max_seconds,
                      help="clips longer than this are errors, not sent (saber-preprocess's "
                           'limit, default %(default)s)')
  parser.add_argument('--no-audio', action='store_true', help='send frames only')
  _common.add_judge_args(parser, timeout=180.0, concurrency=4)
  return parser.parse_args(_common.dashed(argv, parser))


def main(argv=None) -> runs.RunSummary:
  args = parse_args(argv)
  judge = _common.judge_from_args(args)
  items = _common.sharded(files.read_jsonl(args.manifest), args)
  return _common.run_judged(
      args, items, make_processor(args, judge, os.path.dirname(os.path.abspath(args.manifest))),
      input_path=args.manifest, out_path=os.path.join(args.out, 'annotations.jsonl'),
      total=_common.shard_total(args.manifest, args), desc='annotate',
      also=('num_frames', 'frame_size', 'sample_rate', 'no_audio'))


if __name__ == '__main__':
  main()
