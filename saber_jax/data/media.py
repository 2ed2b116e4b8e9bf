"""Media decoding and model features for the Qwen2.5-Omni thinker (host side, numpy only).

Four jobs, each a small function:
- decode: `probe`, `load_audio` (mono float32 at 16 kHz, as `librosa.load`) and
  `load_video` (uint8 frames sampled and resized the way qwen-omni-utils' `fetch_video`
  does), through libsndfile and PyAV;
- audio features: `log_mel`, the Whisper log-mel of the Qwen2.5-Omni feature extractor
  restricted to the valid frames;
- vision features: `video_patches` / `image_patches`, the flattened patch rows and grids
  of transformers' Qwen2-VL video and image processors;
- the shared sizing rule `smart_resize`.

Reference versions: librosa 0.11 (`load`), transformers 5.24 (`WhisperFeatureExtractor`,
`Qwen2VLVideoProcessor`, `Qwen2VLImageProcessorPil`) and qwen-omni-utils (`smart_nframes`,
`fetch_video`), the helper ms-swift calls when the SABER authors run Qwen2.5-Omni.
"""

import dataclasses
import functools
import math
import os

import av
import librosa
import numpy as np
import soundfile
from PIL import Image

from saber_jax.models.config import VisionConfig

# Audio: the Qwen2.5-Omni preprocessor (WhisperFeatureExtractor, feature_size 128,
# chunk_length 300); the processor pads every clip to 300 s and truncates beyond.
SAMPLING_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
NUM_MEL_BINS = 128
MAX_AUDIO_SAMPLES = 300 * SAMPLING_RATE
# Decoded samples are nominally in [-1, 1]; lossy codecs overshoot a little. A peak over
# this is no recording at full scale 1 (`check_samples` rejects it).
MAX_AUDIO_PEAK = 4.0

# Vision: Qwen2-VL patching (the geometry is the vision tower's) and the OpenAI CLIP
# normalisation.
PATCH_SIZE = VisionConfig.patch_size
TEMPORAL_PATCH_SIZE = VisionConfig.temporal_patch_size
MERGE_SIZE = VisionConfig.spatial_merge_size
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 28 * 28 * 16384

# Video sampling: the SABER inference settings (FPS_MAX_FRAMES=40, VIDEO_MAX_PIXELS=50176,
# fps 2) and qwen-omni-utils' FPS_MIN_FRAMES. VIDEO_MIN_PIXELS is ours: qwen-omni-utils
# floors a frame at 1.05 * 128*28*28 = 105369 pixels, which silently overrides a 50176
# cap (see `load_video`); a 4-token floor keeps the 50176 cap the authors asked for.
VIDEO_FPS = 2.0
VIDEO_MIN_FRAMES = 4
VIDEO_MAX_FRAMES = 40
VIDEO_MIN_PIXELS = 56 * 56
VIDEO_MAX_PIXELS = 50176

_MAX_ASPECT_RATIO = 200


class MediaError(ValueError):
  """A media file that cannot be used; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class MediaInfo:
  """What `probe` reads from a container's header (no decoding).

  duration is in seconds (0.0 when the container does not say); width, height and fps
  describe the first video stream and are None without one.
  """
  path: str
  duration: float
  has_audio: bool
  has_video: bool
  width: int | None = None
  height: int | None = None
  fps: float | None = None


# ----------------------------------------------------------------------------- decoding


def _check_file(path):
  if not os.path.exists(path):
    raise MediaError(f'{path}: no such file')
  if os.path.getsize(path) == 0:
    raise MediaError(f'{path}: empty file')


def _open(path):
  path = os.fspath(path)
  _check_file(path)
  try:
    return av.open(path)
  except av.FFmpegError as e:
    raise MediaError(f'{path}: not a readable media container ({e})') from e


def _video_streams(container):
  # Cover art in mp3/m4a files is a one-picture "video" stream; it is not video.
  return [s for s in container.streams.video
          if not s.disposition & av.stream.Disposition.attached_pic]


def _stream_fps(stream):
  rate = stream.average_rate or stream.guessed_rate or stream.base_rate
  return float(rate) if rate else None


def probe(path) -> MediaInfo:
  """Reads duration, tracks and frame geometry of a media file without decoding it."""
  container = _open(path)
  with container:
    videos = _video_streams(container)
    if container.duration:
      duration = container.duration / av.time_base
    else:  # some containers only time their streams
      durations = [float(s.duration * s.time_base) for s in container.streams
                   if s.duration and s.time_base]
      duration = max(durations, default=0.0)
    info = dict(path=os.fspath(path), duration=float(duration),
                has_audio=bool(container.streams.audio), has_video=bool(videos))
    if videos:
      context = videos[0].codec_context
      info.update(width=context.width, height=context.height, fps=_stream_fps(videos[0]))
  return MediaInfo(**info)


def load_audio(path, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
  """Decodes the first audio stream of a file to mono float32 at `sampling_rate`.

  What `librosa.load(path, sr=sampling_rate)` returns (the SABER authors' loader, through
  ms-swift and qwen-omni-utils): native-rate float32 samples, the channel mean, soxr_hq
  resampling. Files libsndfile reads (wav, flac, mp3, ogg) are decoded by it as librosa
  does; the audio track of other containers (mp4, m4a, mkv, webm) is decoded by PyAV and
  then goes through the same downmix and resampling.

  Returns:
    waveform: float32 [n], nominally in [-1, 1].
  Raises:
    MediaError: missing or empty file, unreadable container, no audio stream, a decoding
      error, a stream without samples, or samples no recording has (`check_samples`: NaN,
      inf, |x| > MAX_AUDIO_PEAK).
  """
  path = os.fspath(path)
  _check_file(path)
  try:
    source = soundfile.SoundFile(path)
  except soundfile.LibsndfileError:  # not a format libsndfile reads: a video container
    samples, native_rate = _decode_audio_track(path)
  else:
    with source:
      try:
        samples = source.read(dtype='float32', always_2d=True).T  # [channels, n]
      except RuntimeError as e:
        raise MediaError(f'{path}: audio stream cannot be decoded ({e})') from e
      native_rate = source.samplerate
  if samples.shape[1] == 0:
    raise MediaError(f'{path}: audio stream holds no samples')
  check_samples(path, samples, native_rate)
  try:
    return librosa.resample(librosa.to_mono(samples), orig_sr=native_rate,
                            target_sr=sampling_rate, res_type='soxr_hq')
  except librosa.ParameterError as e:  # e.g. NaN in a float wav
    raise MediaError(f'{path}: unusable audio samples ({e})') from e


def check_samples(path, samples: np.ndarray, rate: int) -> None:
  """MediaError for decoded samples [channels, n] no recording gives: NaN or inf, or a peak
  far outside [-1, 1] (over MAX_AUDIO_PEAK: a float file in another scale, or garbage);
  codecs overshoot 1 a little, never by this much. Names the first offending sample."""
  bad = ~np.isfinite(samples)
  if bad.any():
    at = int(np.argmax(bad.any(0)))
    raise MediaError(f'{path}: non-finite audio sample (NaN or inf) at {at / rate:.3f} s')
  peaks = np.abs(samples).max(0)
  if peaks.max() > MAX_AUDIO_PEAK:
    at = int(np.argmax(peaks > MAX_AUDIO_PEAK))
    raise MediaError(f'{path}: audio sample {float(peaks[at]):.4g} at {at / rate:.3f} s is far '
                     f'outside [-1, 1] (more than {MAX_AUDIO_PEAK}): not a recording at full '
                     'scale 1 (rescale the file)')


def _decode_audio_track(path) -> tuple[np.ndarray, int]:
  """PyAV decode of a file's first audio stream: (float32 [channels, n], native rate)."""
  container = _open(path)
  chunks = []
  with container:
    if not container.streams.audio:
      raise MediaError(f'{path}: no audio stream')
    stream = container.streams.audio[0]
    # Planar float at the native rate and layout: the samples librosa would see.
    resampler = av.AudioResampler(format='fltp')
    try:
      for frame in container.decode(stream):
        frame.pts = None  # PyAV's resampler rejects timestamp jumps; timing is implied
        chunks += [out.to_ndarray() for out in resampler.resample(frame)]
      chunks += [out.to_ndarray() for out in resampler.resample(None)]
    except (av.FFmpegError, ValueError) as e:  # ValueError: format change mid-stream
      raise MediaError(f'{path}: audio stream cannot be decoded ({e})') from e
    native_rate = stream.codec_context.sample_rate
  channels = stream.codec_context.channels
  samples = np.concatenate(chunks, axis=1) if chunks else np.zeros((channels, 0), np.float32)
  return samples, native_rate


def smart_resize(height: int, width: int, factor: int = PATCH_SIZE * MERGE_SIZE,
                 min_pixels: int = IMAGE_MIN_PIXELS,
                 max_pixels: int = IMAGE_MAX_PIXELS) -> tuple[int, int]:
  """Qwen's frame size: both sides multiples of `factor`, area within [min, max] pixels.

  Mirrors `smart_resize` in transformers' qwen2_vl image processors (the rounding is
  Python's, half to even, as there). Keeps the aspect ratio as closely as the grid allows.
  """
  if max(height, width) / min(height, width) > _MAX_ASPECT_RATIO:
    raise ValueError(f'aspect ratio of {height}x{width} exceeds {_MAX_ASPECT_RATIO}')
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def sample_frame_indices(total_frames: int, video_fps: float, fps: float = VIDEO_FPS,
                         min_frames: int = VIDEO_MIN_FRAMES,
                         max_frames: int = VIDEO_MAX_FRAMES,
                         frame_factor: int = TEMPORAL_PATCH_SIZE) -> np.ndarray:
  """Which frames of a video the model sees: qwen-omni-utils' `smart_nframes` rule.

  n = clip(total / video_fps * fps, [min_frames, max_frames, total]) floored to a multiple
  of `frame_factor`, then n frames evenly spread over [0, total - 1] and rounded (half to
  even, as torch.round). We follow qwen-omni-utils rather than transformers'
  `Qwen2VLVideoProcessor.sample_frames` (arange(0, total, total / n)), because ms-swift,
  which the SABER authors use, samples with qwen-omni-utils and then calls the processor
  on the sampled frames.

  Returns:
    indices: int64 [n], increasing.
  """
  min_frames = math.ceil(min_frames / frame_factor) * frame_factor
  max_frames = math.floor(min(max_frames, total_frames) / frame_factor) * frame_factor
  nframes = total_frames / video_fps * fps
  nframes = min(max(nframes, min_frames), max_frames, total_frames)
  nframes = math.floor(nframes / frame_factor) * frame_factor
  if not frame_factor <= nframes <= total_frames:
    raise ValueError(f'cannot sample {nframes} frames from a video of {total_frames} frames '
                     f'(need at least {frame_factor})')
  return np.round(np.linspace(0, total_frames - 1, nframes)).astype(np.int64)


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bicubic resize of uint8 frames [T, H, W, 3] -> [T, height, width, 3] with PIL.

  PIL's antialiased bicubic is what transformers' PIL image processor uses; torchvision's
  (qwen-omni-utils, the video processor) differs from it by at most 1 in about 0.5% of
  the uint8 values (measured, torchvision 0.29).
  """
  if frames.shape[1:3] == (height, width):
    return frames
  return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC))
                   for f in frames])


def _count_frames(path, stream):
  if stream.frames:
    return stream.frames
  # webm/mkv headers carry no frame count: count the stream's packets in a second pass.
  with _open(path) as container:
    return sum(1 for packet in container.demux(container.streams[stream.index]) if packet.size)


# How much shorter than its header a decoded video may be (a header's rounding).
VIDEO_FRAME_SLACK_S = 0.1


def load_video(path, fps: float = VIDEO_FPS, max_frames: int = VIDEO_MAX_FRAMES,
               max_pixels: int = VIDEO_MAX_PIXELS, min_pixels: int = VIDEO_MIN_PIXELS,
               min_frames: int = VIDEO_MIN_FRAMES,
               factor: int = PATCH_SIZE * MERGE_SIZE) -> tuple[np.ndarray, float]:
  """Decodes, samples and resizes the frames of a video the way qwen-omni-utils does.

  Frames are chosen by `sample_frame_indices` (fps, min/max frame counts) and resized to
  `smart_resize(H, W, factor, min_pixels, max_pixels)` with bicubic `resize_frames`.

  About the pixel budget: qwen-omni-utils' `fetch_video` computes the per-frame cap as
  max(min(VIDEO_MAX_PIXELS, total / n * 2), int(1.05 * VIDEO_MIN_PIXELS)) with
  VIDEO_MIN_PIXELS = 100352, so the SABER script's VIDEO_MAX_PIXELS=50176 never binds
  there (frames land at ~100K pixels; newer releases ignore that variable altogether and
  allow up to 602112). The defaults here apply 50176 as a real cap. To reproduce the
  older qwen-omni-utils sizes pass min_pixels=100352, max_pixels=105369.

  Returns:
    frames: uint8 [T, H', W', 3] RGB, T even, H' and W' multiples of `factor`.
    sample_fps: T / total_frames * native fps, the rate the frames were taken at.
  Raises:
    MediaError: unreadable file, no video stream, too few frames, a decoding error, or
      fewer decoded frames than the header claims (beyond VIDEO_FRAME_SLACK_S).
  """
  path = os.fspath(path)
  container = _open(path)
  with container:
    videos = _video_streams(container)
    if not videos:
      raise MediaError(f'{path}: no video stream')
    stream = videos[0]
    stream.thread_type = 'AUTO'
    video_fps = _stream_fps(stream)
    if not video_fps:
      raise MediaError(f'{path}: video stream has no frame rate')
    total_frames = _count_frames(path, stream)
    try:
      indices = sample_frame_indices(total_frames, video_fps, fps, min_frames, max_frames)
    except ValueError as e:
      raise MediaError(f'{path}: {e}') from e
    wanted = set(indices.tolist())
    picked, last, decoded = {}, None, 0
    try:
      for i, frame in enumerate(container.decode(stream)):
        if i in wanted:
          picked[i] = frame.to_ndarray(format='rgb24')
        last, decoded = frame, i + 1
        if i >= indices[-1]:
          break
    except av.FFmpegError as e:
      raise MediaError(f'{path}: video stream cannot be decoded ({e})') from e
  if last is None:
    raise MediaError(f'{path}: video stream holds no decodable frames')
  if len(picked) < len(indices):
    # Headers may over-count by a frame or two; more missing means a truncated file,
    # whose frames must not be made up from its last one.
    missing_s = (total_frames - decoded) / video_fps
    if missing_s > max(VIDEO_FRAME_SLACK_S, 1 / video_fps):
      raise MediaError(f'{path}: truncated or damaged: decodes {decoded} of the '
                       f'{total_frames} frames its header claims ({missing_s:.2f} s missing, '
                       f'more than the {VIDEO_FRAME_SLACK_S} s tolerated)')
    tail = last.to_ndarray(format='rgb24')
    picked = {i: picked.get(i, tail) for i in indices.tolist()}
  frames = np.stack([picked[i] for i in indices.tolist()])
  height, width = smart_resize(frames.shape[1], frames.shape[2], factor, min_pixels, max_pixels)
  sample_fps = len(indices) / total_frames * video_fps
  return resize_frames(frames, height, width), sample_fps


# ------------------------------------------------------------------------ audio features


@functools.cache
def mel_filterbank(num_mel_bins: int = NUM_MEL_BINS, n_fft: int = N_FFT,
                   sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
  """Whisper's mel filterbank: librosa's Slaney mel, Slaney-normalised, 0 Hz to Nyquist.

  Returns:
    filters: float64 [n_fft // 2 + 1, num_mel_bins], read-only (it is cached).
  """
  filters = librosa.filters.mel(sr=sampling_rate, n_fft=n_fft, n_mels=num_mel_bins,
                                htk=False, norm='slaney', dtype=np.float64).T
  filters.flags.writeable = False
  return filters


def feature_length(num_samples: int, max_samples: int = MAX_AUDIO_SAMPLES) -> int:
  """Valid log-mel frames of a clip: ceil(n / hop) after truncation to `max_samples`.

  Equals `feature_attention_mask.sum()` of the Qwen2.5-Omni processor.
  """
  return -(-min(num_samples, max_samples) // HOP_LENGTH)


def log_mel(waveform: np.ndarray, sampling_rate: int = SAMPLING_RATE,
            num_mel_bins: int = NUM_MEL_BINS,
            max_samples: int = MAX_AUDIO_SAMPLES) -> np.ndarray:
  """Whisper log-mel features of one mono clip, valid frames only.

  Equals the first `feature_length(n)` frames of transformers' `WhisperFeatureExtractor(
  feature_size=128, chunk_length=300)` called as the Qwen2.5-Omni processor calls it
  (padding='max_length', truncation=True): periodic Hann, n_fft 400, hop 160, centred
  reflect padding, power spectrum, Slaney mel, log10(max(., 1e-10)), floor at max - 8,
  (x + 4) / 4.

  The reference takes the max of the floor over its whole padded spectrogram. Frames past
  the valid ones hold only padding zeros (log10(1e-10) = -10, never above the clamped
  valid values), except the one or two frames whose window still reaches the last
  samples; those can hold the global max (a burst at the end of a clip whose length is
  a multiple of 160 sits at the centre of the first invalid frame). So the max is taken
  over every frame that touches the signal, and only the valid ones are returned.

  Args:
    waveform: float [n] mono samples at `sampling_rate`.
  Returns:
    features: float32 [num_mel_bins, feature_length(n)].
  """
  if sampling_rate != SAMPLING_RATE:
    raise ValueError(f'log_mel expects {SAMPLING_RATE} Hz audio, got {sampling_rate} Hz')
  waveform = np.asarray(waveform, np.float32)  # the reference casts to float32 first
  if waveform.ndim != 1 or waveform.size == 0:
    raise ValueError(f'log_mel expects a non-empty 1-D waveform, got shape {waveform.shape}')
  signal_length = min(waveform.size, max_samples)
  num_valid = feature_length(waveform.size, max_samples)
  # The reference frames a signal of max_samples (clip + zeros); it keeps max_samples // hop
  # frames. Frame j covers samples [j * hop - n_fft / 2, j * hop + n_fft / 2).
  half = N_FFT // 2
  num_frames = min(max_samples // HOP_LENGTH, -(-(signal_length + half) // HOP_LENGTH))
  positions = np.arange(-half, (num_frames - 1) * HOP_LENGTH + half)
  positions = np.abs(positions)  # reflect at the start
  positions = np.where(positions >= max_samples, 2 * (max_samples - 1) - positions, positions)
  # Positions past the clip read the zero appended at index signal_length.
  source = np.append(waveform[:signal_length].astype(np.float64), 0.0)
  padded = source[np.minimum(positions, signal_length)]
  frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH]
  window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
  power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2  # [frames, n_fft // 2 + 1]
  mel = power @ mel_filterbank(num_mel_bins, N_FFT, sampling_rate)  # [frames, mels]
  log_spec = np.log10(np.maximum(mel, 1e-10))
  valid = np.maximum(log_spec[:num_valid], log_spec.max() - 8.0)
  return ((valid + 4.0) / 4.0).T.astype(np.float32)


# ----------------------------------------------------------------------- vision features


def _normalize(pixels_uint8, mean, std):
  """uint8 [..., 3] -> float32 ((x / 255) - mean) / std, through a 256-entry table per channel."""
  table = ((np.arange(256)[:, None] / 255.0 - np.asarray(mean)) / np.asarray(std))
  return table.astype(np.float32)[pixels_uint8, np.arange(3)]


def _patchify(frames, patch_size, temporal_patch_size, merge_size):
  """[T, H, W, C] float frames -> rows [T'/tp * H/p * W/p, C * tp * p * p] and the grid.

  Pads T with copies of the last frame to a multiple of tp, then orders rows by
  (t, h / merge, w / merge, merge_h, merge_w) and flattens each row as (C, tp, p, p),
  like `patchify` of transformers' `Qwen2VLVideoProcessor`.
  """
  if pad := -len(frames) % temporal_patch_size:
    frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
  t, h, w, c = frames.shape
  p, m, tp = patch_size, merge_size, temporal_patch_size
  grid = (t // tp, h // p, w // p)
  x = frames.reshape(grid[0], tp, h // (p * m), m, p, w // (p * m), m, p, c)
  # axes: 0 t, 1 tp, 2 H/m, 3 m_h, 4 p_h, 5 W/m, 6 m_w, 7 p_w, 8 C
  x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
  return x.reshape(grid[0] * grid[1] * grid[2], c * tp * p * p), grid


def _check_frames(frames, what):
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
    raise ValueError(f'{what} must be uint8 [T>0, H, W, 3] RGB, got {frames.dtype} '
                     f'{frames.shape}')


def video_patches(frames: np.ndarray, fps: float, *, patch_size: int = PATCH_SIZE,
                  temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
                  merge_size: int = MERGE_SIZE, min_pixels: int | None = None,
                  max_pixels: int | None = None, image_mean=CLIP_MEAN,
                  image_std=CLIP_STD) -> dict[str, np.ndarray]:
  """Vision-encoder input of one video, as transformers' `Qwen2VLVideoProcessor` makes it.

  Rescale by 1/255, CLIP mean/std, pad T to a multiple of temporal_patch_size with the
  last frame, rows ordered (t, h/m, w/m, m, m), each flattened (C, tp, p, p).

  With min_pixels/max_pixels left None the frames are used as they are (ms-swift calls
  the processor with do_resize=False after qwen-omni-utils resized them; `load_video`
  output is already sized) and their sides must be multiples of patch_size * merge_size.
  Given both, frames are first resized to `smart_resize(H, W, ...)` with PIL bicubic.

  Args:
    frames: uint8 [T, H, W, 3] RGB.
    fps: rate the frames stand for. The Qwen2.5-Omni processor uses the fps it was called
      with, 2.0 when none (ms-swift passes none), not the measured `sample_fps`.
  Returns:
    pixel_values_videos: float32 [T' * h * w, 3 * tp * p * p] (T' = ceil(T / tp)).
    video_grid_thw: int64 [1, 3], (T', h, w) in patches.
    video_second_per_grid: float32 [1], temporal_patch_size / fps.
  """
  frames = np.asarray(frames)
  _check_frames(frames, 'video frames')
  factor = patch_size * merge_size
  if (min_pixels is None) != (max_pixels is None):
    raise ValueError('give both min_pixels and max_pixels to resize, or neither')
  if min_pixels is not None:
    frames = resize_frames(frames, *smart_resize(frames.shape[1], frames.shape[2], factor,
                                                 min_pixels, max_pixels))
  elif frames.shape[1] % factor or frames.shape[2] % factor:
    raise ValueError(f'frame size {frames.shape[1]}x{frames.shape[2]} is not a multiple of '
                     f'{factor}; resize it (load_video does) or pass min/max_pixels')
  rows, grid = _patchify(_normalize(frames, image_mean, image_std), patch_size,
                         temporal_patch_size, merge_size)
  return {
      'pixel_values_videos': rows,
      'video_grid_thw': np.array([grid], np.int64),
      'video_second_per_grid': np.array([temporal_patch_size / fps], np.float32),
  }


def image_patches(image: np.ndarray, *, patch_size: int = PATCH_SIZE,
                  temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
                  merge_size: int = MERGE_SIZE, min_pixels: int = IMAGE_MIN_PIXELS,
                  max_pixels: int = IMAGE_MAX_PIXELS, image_mean=CLIP_MEAN,
                  image_std=CLIP_STD) -> dict[str, np.ndarray]:
  """Vision-encoder input of one image, as transformers' `Qwen2VLImageProcessorPil`.

  Resized to `smart_resize` (PIL bicubic) within [min_pixels, max_pixels] (the Omni
  processor's defaults), normalised like a video, and repeated temporal_patch_size times
  so that it forms one temporal patch.

  Args:
    image: uint8 [H, W, 3] RGB.
  Returns:
    pixel_values: float32 [h * w, 3 * tp * p * p].
    image_grid_thw: int64 [1, 3], (1, h, w) in patches.
  """
  image = np.asarray(image)
  _check_frames(image[None], 'image')
  factor = patch_size * merge_size
  frames = resize_frames(image[None], *smart_resize(image.shape[0], image.shape[1], factor,
                                                    min_pixels, max_pixels))
  rows, grid = _patchify(_normalize(frames, image_mean, image_std), patch_size,
                         temporal_patch_size, merge_size)
  return {'pixel_values': rows, 'image_grid_thw': np.array([grid], np.int64)}
