"""One clip -> one SFT record: the paper's filters, then features, prompt and SED target.

The recipe `saber-preprocess` runs on every manifest line (and what a user calls to build
a record of their own). Filters, in order (the first that applies is the clip's reject
reason): no_annotation / bad_annotation, missing_file / unreadable_media, no_video /
no_audio (SABER needs both tracks), too_short / too_long (video or decoded audio outside
0.5-30 s), av_mismatch (decoded audio and video lengths differ by more than 1 s), low_resolution
(short side < 112 px: four merge units of 28 px; below that a face spans a handful of
14-px patches).
"""

import dataclasses
import math
import os

from saber_jax.data import annotation as annotation_lib
from saber_jax.data import media
from saber_jax.data import prompt as prompt_lib
from saber_jax.data import records
from saber_jax.data import sed


@dataclasses.dataclass(frozen=True)
class Settings:
  """The paper's filters and the feature settings of a record."""
  min_seconds: float = 0.5
  max_seconds: float = 30.0
  max_av_gap_seconds: float = 1.0   # decoded audio vs video length (encoder priming, a last frame)
  min_side: int = 112
  fps: float = media.VIDEO_FPS
  max_frames: int = media.VIDEO_MAX_FRAMES
  max_pixels: int = media.VIDEO_MAX_PIXELS
  system: str | None = prompt_lib.DEFAULT_SYSTEM_PROMPT


class Reject(Exception):
  """A clip that cannot become a record: `reason` (one of the filters above) and `message`
  (naming the file or clip)."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason, self.message = reason, message


def _probe(path):
  if not os.path.exists(path):
    raise Reject('missing_file', f'{path}: no such file')
  try:
    return media.probe(path)
  except media.MediaError as e:
    raise Reject('unreadable_media', str(e)) from None


def _decode(fn, *args, **kwargs):
  try:
    return fn(*args, **kwargs)
  except media.MediaError as e:
    raise Reject('unreadable_media', str(e)) from None


def build_record(entry: dict, annotation, settings: Settings, tokenizer) -> tuple[bytes, dict]:
  """(record blob, info for stats) of one clip, or Reject(reason, message).

  entry: a manifest entry {"id", "lang", "subset", "video"?, "audio"?} with absolute paths.
  annotation: the clip's Annotation, its schema error (or that error's message), or None.
  """
  clip_id = entry['id']
  if annotation is None:
    raise Reject('no_annotation', f'clip {clip_id!r}: no annotation line')
  if isinstance(annotation, (str, annotation_lib.AnnotationError)):
    raise Reject('bad_annotation', str(annotation))
  if 'video' not in entry:
    raise Reject('no_video', f'clip {clip_id!r}: the manifest gives no video')
  video_info = _probe(entry['video'])
  if not video_info.has_video:
    raise Reject('no_video', f'{entry["video"]}: no video stream')
  audio_path = entry.get('audio', entry['video'])
  audio_info = _probe(audio_path) if 'audio' in entry else video_info
  if not audio_info.has_audio:
    raise Reject('no_audio', f'{audio_path}: no audio stream')
  duration = video_info.duration
  if duration < settings.min_seconds:
    raise Reject('too_short', f'{entry["video"]}: {duration:.2f} s < {settings.min_seconds} s')
  if duration > settings.max_seconds:
    raise Reject('too_long', f'{entry["video"]}: {duration:.2f} s > {settings.max_seconds} s')
  short_side = min(video_info.width or 0, video_info.height or 0)
  if short_side < settings.min_side:
    raise Reject('low_resolution', f'{entry["video"]}: {video_info.width}x{video_info.height}, '
                                   f'short side < {settings.min_side} px')

  waveform = _decode(media.load_audio, audio_path)
  audio_seconds = len(waveform) / media.SAMPLING_RATE
  if audio_seconds < settings.min_seconds:
    raise Reject('too_short', f'{audio_path}: {audio_seconds:.2f} s of audio < '
                              f'{settings.min_seconds} s')
  if audio_seconds > settings.max_seconds:
    raise Reject('too_long', f'{audio_path}: {audio_seconds:.2f} s of audio > '
                             f'{settings.max_seconds} s')
  frames, sample_fps = _decode(media.load_video, entry['video'], fps=settings.fps,
                               max_frames=settings.max_frames, max_pixels=settings.max_pixels)
  video_seconds = len(frames) / sample_fps      # the frames the file really holds
  if abs(audio_seconds - video_seconds) > settings.max_av_gap_seconds:
    raise Reject('av_mismatch', f'{audio_path}: {audio_seconds:.2f} s of audio, '
                                f'{entry["video"]}: {video_seconds:.2f} s of video; they differ '
                                f'by more than {settings.max_av_gap_seconds} s')
  features = media.log_mel(waveform)
  grid = (math.ceil(len(frames) / media.TEMPORAL_PATCH_SIZE), frames.shape[1] // media.PATCH_SIZE,
          frames.shape[2] // media.PATCH_SIZE)
  # The processor's video_second_per_grid: temporal_patch_size / the fps it was called with
  # (2.0, as ms-swift calls it), not the measured sampling rate.
  prompt_ids = prompt_lib.build_prompt(
      tokenizer, text=sed.sed_instruction(entry['lang']), system=settings.system,
      audio_lengths=[features.shape[1]], video_grids=[grid],
      video_second_per_grid=[media.TEMPORAL_PATCH_SIZE / settings.fps], use_audio_in_video=True)
  example = sed.build_sft_example(tokenizer, prompt_ids, sed.sed_target(annotation, entry['lang']))
  blob = records.encode_sft_record(
      id=clip_id, lang=entry['lang'], subset=entry['subset'], duration=duration,
      input_ids=example['input_ids'], labels=example['labels'], segments=example['segments'],
      input_features=features, frames=frames, video_fps=settings.fps, use_audio_in_video=True)
  info = {'duration': duration, 'prompt_tokens': len(prompt_ids),
          'response_tokens': len(example['input_ids']) - len(prompt_ids),
          'total_tokens': len(example['input_ids'])}
  return blob, info
