"""Writes small real media files with PyAV for the media tests, and a few signals."""

import fractions

import av
import numpy as np


def sine(frequency, seconds, sampling_rate, amplitude=0.5, phase=0.0):
  """float32 [n] sine; n = round(seconds * sampling_rate)."""
  t = np.arange(round(seconds * sampling_rate)) / sampling_rate
  return (amplitude * np.sin(2 * np.pi * frequency * t + phase)).astype(np.float32)


def _encode_audio(container, samples, sampling_rate, codec, channels):
  """Adds an audio stream to `container` and encodes `samples` into it.

  samples: float [n] (copied to every channel) or [channels, n], in [-1, 1].
  """
  stream = container.add_stream(codec, rate=sampling_rate)
  stream.layout = 'stereo' if channels == 2 else 'mono'
  fmt = stream.codec_context.codec.audio_formats[0].name
  pcm = np.broadcast_to(np.atleast_2d(samples), (channels, np.shape(samples)[-1]))
  if fmt.startswith('s16'):
    pcm = np.round(np.clip(pcm, -1, 1) * 32767).astype(np.int16)
  elif fmt.startswith('s32'):
    pcm = np.round(np.clip(pcm, -1, 1) * 2147483647).astype(np.int32)
  else:
    pcm = pcm.astype(np.float32)
  chunk = stream.codec_context.frame_size or 1024
  frames = []
  for start in range(0, pcm.shape[1], chunk):
    block = pcm[:, start:start + chunk]
    if fmt.endswith('p'):
      frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block), format=fmt,
                                         layout=stream.layout.name)
    else:  # packed: interleave channels
      frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block.T.reshape(1, -1)),
                                         format=fmt, layout=stream.layout.name)
    frame.sample_rate = sampling_rate
    frame.pts = start
    frame.time_base = fractions.Fraction(1, sampling_rate)
    frames.append(frame)
  return stream, frames


def write_audio(path, samples, sampling_rate, codec='pcm_s16le', channels=2):
  """Writes `samples` (float [n] or [channels, n], in [-1, 1]) as an audio file."""
  with av.open(str(path), 'w') as container:
    stream, frames = _encode_audio(container, np.asarray(samples), sampling_rate, codec, channels)
    for frame in frames:
      container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def index_frames(num_frames, height, width):
  """uint8 [T, H, W, 3] frames whose flat grey level encodes the frame index (8 * i + 8).

  Flat frames survive lossy codecs to within a few levels, so the index of a decoded frame
  can be read back as round((mean - 8) / 8).
  """
  levels = 8 * np.arange(num_frames) + 8
  assert levels.max() < 256
  return np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3)).astype(
      np.uint8)


def write_video(path, frames, fps, codec='libx264', audio=None, audio_rate=44100,
                audio_codec='aac', pix_fmt='yuv420p'):
  """Writes uint8 frames [T, H, W, 3] at `fps`, with an optional mono audio track."""
  with av.open(str(path), 'w') as container:
    stream = container.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(1001))
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = pix_fmt
    if codec == 'libx264':
      stream.options = {'crf': '10', 'preset': 'ultrafast'}
    else:
      stream.bit_rate = 4_000_000
    audio_stream = None
    if audio is not None:
      audio_stream, audio_frames = _encode_audio(container, np.asarray(audio), audio_rate,
                                                 audio_codec, 2)
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')))
    container.mux(stream.encode(None))
    if audio_stream is not None:
      for frame in audio_frames:
        container.mux(audio_stream.encode(frame))
      container.mux(audio_stream.encode(None))
