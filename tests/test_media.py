"""saber_jax.data.media against transformers' processors and real files written with PyAV."""

import wave

import av
import librosa
import numpy as np
import pytest
import soundfile
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen2_vl

from media_helpers import index_frames, sine, write_audio, write_video
from saber_jax.data import media

# --------------------------------------------------------------------------- log-mel


@pytest.fixture(scope='module')
def omni_feature_extractor():
  # The Qwen2.5-Omni preprocessor_config: 128 mel bins, 300 s chunks (n_samples 4.8M).
  return WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160,
                                 chunk_length=300, n_fft=400)


def reference_log_mel(extractor, waveform):
  """(features [128, 30000], valid frames) as Qwen2_5OmniProcessor._process_audio calls it."""
  out = extractor(waveform, sampling_rate=16000, padding='max_length', truncation=True,
                  return_attention_mask=True, return_tensors='np')
  return out['input_features'][0], int(out['attention_mask'][0].sum())


def _signals():
  rng = np.random.default_rng(0)
  sweep_hz = np.linspace(50, 7900, 80000)
  return {
      'noise': rng.standard_normal(52817) * 0.1,  # 52817 % 160 != 0
      'sine_sweep': 0.5 * np.sin(2 * np.pi * np.cumsum(sweep_hz) / 16000),
      'silence_at_end': np.concatenate([rng.standard_normal(32000) * 0.1, np.zeros(16003)]),
      'half_second': rng.standard_normal(8000) * 0.3,
      'thirty_seconds': sine(220, 30.0, 16000) + rng.standard_normal(480000) * 0.01,
      'shorter_than_window': rng.standard_normal(150),
      'length_161': rng.standard_normal(161),
  }


@pytest.mark.parametrize('name', list(_signals()))
def test_log_mel_equals_whisper_feature_extractor_on_valid_frames(name, omni_feature_extractor):
  waveform = _signals()[name].astype(np.float32)
  expected, num_valid = reference_log_mel(omni_feature_extractor, waveform)
  got = media.log_mel(waveform)
  assert got.dtype == np.float32
  assert got.shape == (128, num_valid) == (128, media.feature_length(waveform.size))
  np.testing.assert_allclose(got, expected[:, :num_valid], rtol=0, atol=1e-4)


def test_log_mel_floor_uses_the_frame_past_the_end(omni_feature_extractor):
  # Silence and a burst in the last 10 samples of a clip whose length is a multiple of 160:
  # the burst sits at the centre of the first invalid frame, which holds the global max.
  rng = np.random.default_rng(1)
  waveform = np.concatenate([np.zeros(15990), rng.standard_normal(10) * 0.5]).astype(np.float32)
  expected, num_valid = reference_log_mel(omni_feature_extractor, waveform)
  got = media.log_mel(waveform)
  np.testing.assert_allclose(got, expected[:, :num_valid], rtol=0, atol=1e-4)
  # A floor from the valid frames alone is visibly different here, so the case is real.
  valid_max_floor = (expected[:, :num_valid].max() * 4 - 4) - 8
  floored_everywhere = (np.maximum(-10.0, valid_max_floor) + 4) / 4
  assert abs(expected[:, 0].min() - floored_everywhere) > 0.1


@pytest.mark.parametrize('num_samples', [4_800_000 - 100, 4_800_000 + 37])
def test_log_mel_at_the_300_second_limit(num_samples, omni_feature_extractor):
  # At the limit the end reflection reads the clip itself; beyond it the reference truncates.
  waveform = (np.random.default_rng(2).standard_normal(num_samples) * 0.05).astype(np.float32)
  expected, num_valid = reference_log_mel(omni_feature_extractor, waveform)
  got = media.log_mel(waveform)
  assert got.shape == (128, num_valid) == (128, 30000)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_feature_length_is_the_processor_mask_length(omni_feature_extractor):
  for n in [1, 159, 160, 161, 8000, 16001, 479_999]:
    _, num_valid = reference_log_mel(omni_feature_extractor, np.zeros(n, np.float32) + 0.1)
    assert media.feature_length(n) == num_valid, n


def test_mel_filterbank_equals_transformers():
  expected = mel_filter_bank(num_frequency_bins=201, num_mel_filters=128, min_frequency=0.0,
                             max_frequency=8000.0, sampling_rate=16000, norm='slaney',
                             mel_scale='slaney')
  np.testing.assert_allclose(media.mel_filterbank(), expected, rtol=1e-10, atol=1e-15)


def test_log_mel_rejects_bad_input():
  with pytest.raises(ValueError, match='non-empty'):
    media.log_mel(np.zeros(0, np.float32))
  with pytest.raises(ValueError, match='16000'):
    media.log_mel(np.zeros(100, np.float32), sampling_rate=8000)


# -------------------------------------------------------------------------- decoding

TONE_HZ = 440.0


def _assert_lossless_tone(waveform, seconds):
  expected = sine(TONE_HZ, seconds, 16000)
  assert waveform.dtype == np.float32 and waveform.ndim == 1
  assert waveform.size == expected.size
  # 16-bit quantisation (3e-5) plus soxr_hq's passband ripple; the edges hold the
  # resampler's start-up and the signal's hard stop.
  inner = slice(400, -400)
  np.testing.assert_allclose(waveform[inner], expected[inner], rtol=0, atol=1e-4)


def _assert_lossy_tone(waveform, seconds):
  # Lossy codecs change the level a little (LAME: -0.45 dB here) and add noise, but must
  # keep length and timing: correlation at lag 0 above 0.999 rules out a shift of a
  # quarter sample (a one-sample shift at 440 Hz gives 0.985).
  expected = sine(TONE_HZ, seconds, 16000)
  assert abs(waveform.size - expected.size) <= 0.05 * 16000
  n = min(waveform.size, expected.size)
  got, want = waveform[1600:n - 1600], expected[1600:n - 1600]
  correlation = got @ want / np.sqrt((got @ got) * (want @ want))
  assert correlation > 0.999
  assert 0.9 < np.sqrt((got @ got) / (want @ want)) < 1.1


@pytest.mark.parametrize('suffix,codec,rate', [('wav', 'pcm_s16le', 44100),
                                               ('flac', 'flac', 44100),
                                               ('wav', 'pcm_s16le', 16000)])
def test_load_audio_lossless_stereo_file(tmp_path, suffix, codec, rate):
  path = tmp_path / f'tone.{suffix}'
  write_audio(path, sine(TONE_HZ, 2.0, rate), rate, codec, channels=2)
  _assert_lossless_tone(media.load_audio(path), 2.0)


def test_load_audio_averages_the_channels(tmp_path):
  # librosa.load (ms-swift's loader) downmixes to the channel mean; FFmpeg's own stereo ->
  # mono matrix would weight the channels differently.
  path = tmp_path / 'left_only.wav'
  left = sine(TONE_HZ, 1.0, 16000)
  write_audio(path, np.stack([left, np.zeros_like(left)]), 16000, channels=2)
  np.testing.assert_allclose(media.load_audio(path), left / 2, rtol=0, atol=1e-4)


@pytest.mark.parametrize('suffix,codec,rate', [('mp3', 'libmp3lame', 44100),
                                               ('m4a', 'aac', 44100),
                                               ('ogg', 'libopus', 48000)])
def test_load_audio_lossy_file(tmp_path, suffix, codec, rate):
  path = tmp_path / f'tone.{suffix}'
  write_audio(path, sine(TONE_HZ, 2.0, rate), rate, codec, channels=2)
  _assert_lossy_tone(media.load_audio(path), 2.0)


def _two_channel_signal(seconds, rate):
  """float32 [2, n]: a different chirp plus noise on each channel, within [-0.6, 0.6]."""
  rng = np.random.default_rng(rate)
  t = np.arange(round(seconds * rate)) / rate
  sweep = 0.4 * np.sin(2 * np.pi * (100 + 1500 * t) * t)
  tone = 0.4 * np.sin(2 * np.pi * 3000 * t + 1.0)
  noise = rng.standard_normal((2, t.size)) * 0.05
  return (np.stack([sweep, tone]) + noise).astype(np.float32)


@pytest.mark.parametrize('channels', [1, 2])
@pytest.mark.parametrize('rate', [8000, 22050, 44100, 48000])
@pytest.mark.parametrize('suffix,codec', [('wav', 'pcm_s16le'), ('flac', 'flac'),
                                          ('mp3', 'libmp3lame')])
def test_load_audio_and_log_mel_equal_librosa_and_whisper(tmp_path, suffix, codec, rate, channels,
                                                          omni_feature_extractor):
  # The SABER authors' features: librosa.load(path, sr=16000) (ms-swift, qwen-omni-utils),
  # then the Omni processor's WhisperFeatureExtractor.
  path = tmp_path / f'clip.{suffix}'
  write_audio(path, _two_channel_signal(1.3, rate)[:channels], rate, codec, channels)
  expected_waveform, _ = librosa.load(path, sr=16000)
  waveform = media.load_audio(path)
  assert waveform.dtype == np.float32
  np.testing.assert_array_equal(waveform, expected_waveform)
  expected, num_valid = reference_log_mel(omni_feature_extractor, expected_waveform)
  np.testing.assert_allclose(media.log_mel(waveform), expected[:, :num_valid], rtol=0, atol=1e-4)


def _decoded_audio_track(path):
  """float32 [channels, n] and rate of a file's first audio stream, decoded frame by frame."""
  with av.open(str(path)) as container:
    stream = container.streams.audio[0]
    frames = [frame.to_ndarray() for frame in container.decode(stream)]
    assert stream.codec_context.format.name == 'fltp'  # aac decodes to planar float
    return np.concatenate(frames, axis=1), stream.codec_context.sample_rate


def test_load_audio_of_video_containers_equals_librosa_on_the_same_samples(tmp_path):
  # librosa cannot open mp4: its audio track is decoded with PyAV, then downmixed and
  # resampled as librosa.load does. The same samples in a float wav must load identically.
  signal = _two_channel_signal(1.3, 44100)
  mp4 = tmp_path / 'clip.mp4'
  write_video(mp4, index_frames(4, 56, 56), 4, audio=signal, audio_rate=44100)
  samples, rate = _decoded_audio_track(mp4)
  assert samples.shape[0] == 2 and rate == 44100
  wav = tmp_path / 'same_samples.wav'
  soundfile.write(wav, samples.T, rate, subtype='FLOAT')
  np.testing.assert_array_equal(media.load_audio(mp4), librosa.load(wav, sr=16000)[0])

  # An integer (flac) track in mkv against the same PCM in a wav that libsndfile decodes:
  # the two decoders must agree on the int -> float scaling too.
  mkv = tmp_path / 'clip.mkv'
  write_video(mkv, index_frames(4, 56, 56), 4, 'libx264', audio=signal, audio_rate=48000,
              audio_codec='flac')
  pcm = tmp_path / 'same_pcm.wav'
  write_audio(pcm, signal, 48000, 'pcm_s16le', channels=2)
  np.testing.assert_array_equal(media.load_audio(mkv), librosa.load(pcm, sr=16000)[0])


VIDEO_FORMATS = [('mp4', 'libx264', 'aac'), ('mp4', 'mpeg4', 'aac'),
                 ('webm', 'libvpx-vp9', 'libopus'), ('mkv', 'libx264', 'flac')]


@pytest.mark.parametrize('suffix,video_codec,audio_codec', VIDEO_FORMATS)
def test_video_file_audio_track_and_frames(tmp_path, suffix, video_codec, audio_codec):
  path = tmp_path / f'clip.{suffix}'
  audio_rate = 48000
  write_video(path, index_frames(30, 64, 96), 10, video_codec,
              audio=sine(TONE_HZ, 3.0, audio_rate), audio_rate=audio_rate,
              audio_codec=audio_codec)

  info = media.probe(path)
  assert info.has_audio and info.has_video
  assert (info.width, info.height, info.fps) == (96, 64, 10.0)
  assert abs(info.duration - 3.0) < 0.05

  waveform = media.load_audio(path)
  if audio_codec == 'flac':
    _assert_lossless_tone(waveform, 3.0)
  else:
    _assert_lossy_tone(waveform, 3.0)

  frames, sample_fps = media.load_video(path)
  # 30 frames at 10 fps, sampled at 2 fps: n = 6, linspace(0, 29, 6) = 0, 5.8, 11.6, 17.4,
  # 23.2, 29 -> rounded; 64x96 -> smart_resize -> 56x84.
  assert frames.dtype == np.uint8 and frames.shape == (6, 56, 84, 3)
  decoded_index = np.round((frames.reshape(6, -1).mean(axis=1) - 8) / 8)
  np.testing.assert_array_equal(decoded_index, [0, 6, 12, 17, 23, 29])
  assert sample_fps == pytest.approx(2.0)


def test_load_video_caps_frame_count_and_pixels(tmp_path):
  path = tmp_path / 'clip.webm'  # webm headers carry no frame count: the packets are counted
  write_video(path, index_frames(30, 160, 300), 10, 'libvpx')
  frames, sample_fps = media.load_video(path, fps=8.0, max_frames=10, max_pixels=28 * 28 * 20)
  # min(30 / 10 * 8, 10, 30) = 10 frames at linspace(0, 29, 10) = 0, 3.2, 6.4, ... 29.
  decoded_index = np.round((frames.reshape(10, -1).mean(axis=1) - 8) / 8)
  np.testing.assert_array_equal(decoded_index, [0, 3, 6, 10, 13, 16, 19, 23, 26, 29])
  assert frames.shape[1:3] == hf_qwen2_vl.smart_resize(160, 300, 28, 3136, 28 * 28 * 20)
  assert sample_fps == pytest.approx(10 / 30 * 10)


def test_sample_frame_indices_follow_smart_nframes():
  # 10 s at 30 fps, 2 fps -> 20 frames spread over 0..299.
  np.testing.assert_array_equal(media.sample_frame_indices(300, 30.0)[:4], [0, 16, 31, 47])
  assert len(media.sample_frame_indices(300, 30.0)) == 20
  assert len(media.sample_frame_indices(30 * 60, 30.0)) == 40  # capped at FPS_MAX_FRAMES
  assert len(media.sample_frame_indices(15, 30.0)) == 4  # at least FPS_MIN_FRAMES
  assert len(media.sample_frame_indices(5, 30.0)) == 4  # min_frames, floored to even
  assert len(media.sample_frame_indices(3, 30.0)) == 2  # never more than the video has
  with pytest.raises(ValueError, match='1 frames'):
    media.sample_frame_indices(1, 30.0)


def test_probe_audio_only_and_video_only(tmp_path):
  audio_path = tmp_path / 'speech.wav'
  write_audio(audio_path, sine(TONE_HZ, 0.4, 16000), 16000, channels=1)
  info = media.probe(audio_path)
  assert info.has_audio and not info.has_video and info.width is None
  assert info.duration == pytest.approx(0.4, abs=1e-3)

  video_path = tmp_path / 'mute.mp4'
  write_video(video_path, index_frames(12, 56, 56), 4)
  info = media.probe(video_path)
  assert info.has_video and not info.has_audio
  assert info.duration == pytest.approx(3.0, abs=0.05)


def test_errors_name_the_file_and_the_problem(tmp_path):
  corrupt = tmp_path / 'corrupt.mp4'
  corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
  for load in (media.load_audio, media.load_video, media.probe):
    with pytest.raises(media.MediaError, match='corrupt.mp4.*not a readable media container'):
      load(corrupt)

  empty_wav = tmp_path / 'empty.wav'  # a valid RIFF header announcing zero frames
  with wave.open(str(empty_wav), 'wb') as f:
    f.setnchannels(1)
    f.setsampwidth(2)
    f.setframerate(16000)
  with pytest.raises(media.MediaError, match='empty.wav: audio stream holds no samples'):
    media.load_audio(empty_wav)

  mute = tmp_path / 'mute.mp4'
  write_video(mute, index_frames(8, 56, 56), 4)
  with pytest.raises(media.MediaError, match='mute.mp4: no audio stream'):
    media.load_audio(mute)

  tone = tmp_path / 'tone.flac'
  write_audio(tone, sine(TONE_HZ, 0.5, 16000), 16000, 'flac', channels=1)
  with pytest.raises(media.MediaError, match='tone.flac: no video stream'):
    media.load_video(tone)

  zero_bytes = tmp_path / 'zero.wav'
  zero_bytes.write_bytes(b'')
  with pytest.raises(media.MediaError, match='zero.wav: empty file'):
    media.load_audio(zero_bytes)
  with pytest.raises(media.MediaError, match='missing.mp4: no such file'):
    media.probe(tmp_path / 'missing.mp4')


def test_audio_samples_no_recording_has_are_rejected_with_the_reason(tmp_path):
  rate = 16000
  loud = np.sin(np.arange(rate) / 5).astype(np.float32)
  loud[rate // 2] = 1000.0              # a float file in another scale, or garbage
  soundfile.write(tmp_path / 'loud.wav', loud, rate, subtype='FLOAT')
  with pytest.raises(media.MediaError, match=r'loud.wav: audio sample 1000 at 0.500 s is far '
                                             r'outside \[-1, 1\] \(more than 4.0\)'):
    media.load_audio(tmp_path / 'loud.wav')
  for value, name in ((np.nan, 'nan'), (np.inf, 'inf')):
    bad = loud.copy()
    bad[rate // 2] = 0.1
    bad[rate // 4] = value
    soundfile.write(tmp_path / f'{name}.wav', bad, rate, subtype='FLOAT')
    with pytest.raises(media.MediaError, match=rf'{name}.wav: non-finite audio sample \(NaN or '
                                               r'inf\) at 0.250 s'):
      media.load_audio(tmp_path / f'{name}.wav')
  # A lossy codec's small overshoot of full scale is a recording.
  fine = np.clip(loud, -1, 1) * 1.2
  soundfile.write(tmp_path / 'hot.wav', fine, rate, subtype='FLOAT')
  assert np.abs(media.load_audio(tmp_path / 'hot.wav')).max() > 1


# ------------------------------------------------------------------- vision features

OMNI_VIDEO_SIZE = {'shortest_edge': 128 * 28 * 28, 'longest_edge': 768 * 28 * 28}


def test_smart_resize_equals_transformers():
  rng = np.random.default_rng(0)
  sizes = [(int(h), int(w)) for h, w in rng.integers(1, 4000, (400, 2))
           if max(h, w) / min(h, w) <= 200]
  sizes += [(14, 14), (28, 28), (42, 70), (720, 1280), (1080, 1920), (224, 224), (13, 2600)]
  for min_pixels, max_pixels in [(3136, 12845056), (3136, 50176), (100352, 602112)]:
    for h, w in sizes:
      assert media.smart_resize(h, w, 28, min_pixels, max_pixels) == hf_qwen2_vl.smart_resize(
          h, w, 28, min_pixels, max_pixels), (h, w, min_pixels, max_pixels)
  with pytest.raises(ValueError, match='aspect ratio'):
    media.smart_resize(10, 2500)


def reference_video_patches(frames, size=None, image_processor_class=None):
  """Qwen2VLVideoProcessor output, rebuilt from a Qwen2-VL image processor.

  The video processor (which needs torchvision) pads T with the last frame to a multiple
  of 2, resizes, rescales and normalises each frame exactly as the image processor does,
  and lays the rows out as the image processor with temporal_patch_size=1 does per frame;
  the only difference is that a row stacks frames 2k and 2k+1 on the tp axis of
  (C, tp, p, p), which this function does. With the torchvision image processor this
  equals the real video processor bit for bit, resizing included (checked by
  test_video_patches_equal_the_real_video_processor, transformers 5.24 and torchvision
  0.29.1). By default it uses Qwen2VLImageProcessorPil, which needs no torchvision and
  resizes with PIL, as saber_jax does.
  """
  if image_processor_class is None:
    image_processor_class = hf_qwen2_vl.Qwen2VLImageProcessorPil
  if len(frames) % 2:
    frames = np.concatenate([frames, frames[-1:]])
  processor = image_processor_class(temporal_patch_size=1)
  per_frame = []
  for frame in frames:
    out = processor(images=[frame], do_resize=size is not None, size=size, return_tensors='np')
    per_frame.append(out['pixel_values'])  # [h * w, 3 * 14 * 14]
    _, grid_h, grid_w = out['image_grid_thw'][0]
  per_frame = np.stack(per_frame)
  t, hw = len(frames) // 2, per_frame.shape[1]
  rows = per_frame.reshape(t, 2, hw, 3, 14 * 14).transpose(0, 2, 3, 1, 4).reshape(t * hw, -1)
  return rows, [t, grid_h, grid_w]


@pytest.mark.parametrize('num_frames,height,width', [(4, 56, 84), (5, 112, 56), (1, 28, 28),
                                                     (7, 224, 224)])
def test_video_patches_without_resize(num_frames, height, width):
  frames = np.random.default_rng(num_frames).integers(0, 256, (num_frames, height, width, 3),
                                                      dtype=np.uint8)
  out = media.video_patches(frames, fps=2.0)
  rows, grid = reference_video_patches(frames)
  assert out['video_grid_thw'].tolist() == [grid]
  assert out['pixel_values_videos'].dtype == np.float32
  np.testing.assert_allclose(out['pixel_values_videos'], rows, rtol=0, atol=1e-5)
  np.testing.assert_allclose(out['video_second_per_grid'], [1.0])


@pytest.mark.parametrize('num_frames,height,width,size', [
    (4, 56, 84, OMNI_VIDEO_SIZE), (3, 100, 60, {'shortest_edge': 3136, 'longest_edge': 50176}),
    (2, 360, 640, {'shortest_edge': 3136, 'longest_edge': 50176})])
def test_video_patches_with_resize(num_frames, height, width, size):
  frames = np.random.default_rng(7).integers(0, 256, (num_frames, height, width, 3),
                                             dtype=np.uint8)
  out = media.video_patches(frames, fps=0.5, min_pixels=size['shortest_edge'],
                            max_pixels=size['longest_edge'])
  rows, grid = reference_video_patches(frames, size)
  assert out['video_grid_thw'].tolist() == [grid]
  np.testing.assert_allclose(out['pixel_values_videos'], rows, rtol=0, atol=1e-5)
  np.testing.assert_allclose(out['video_second_per_grid'], [4.0])


def test_video_patches_rejects_unsized_frames():
  with pytest.raises(ValueError, match='not a multiple of 28'):
    media.video_patches(np.zeros((2, 30, 56, 3), np.uint8), fps=2.0)
  with pytest.raises(ValueError, match='uint8'):
    media.video_patches(np.zeros((2, 28, 28, 3), np.float32), fps=2.0)


def test_video_patches_equal_the_real_video_processor():
  """Needs torchvision, which does not import beside torch 2.13: skipped there.

  Run it in an environment with torch 2.14.1 + torchvision 0.29.1 + transformers 5.24.
  """
  pytest.importorskip('torchvision')
  from transformers import Qwen2VLVideoProcessor
  from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
  processor = Qwen2VLVideoProcessor()
  rng = np.random.default_rng(0)
  for (t, h, w) in [(4, 56, 84), (5, 112, 56), (1, 28, 28), (7, 224, 224), (6, 252, 448),
                    (3, 100, 60)]:
    frames = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    for size in [None, OMNI_VIDEO_SIZE, {'shortest_edge': 3136, 'longest_edge': 50176}]:
      if size is None and (h % 28 or w % 28):
        continue
      expected = processor(videos=[frames], do_resize=size is not None, size=size,
                           cap_pixels_per_frame=False, return_tensors='np')
      expected_rows = expected['pixel_values_videos']
      # The composition the other tests use is the video processor's computation.
      rows, grid = reference_video_patches(frames, size, Qwen2VLImageProcessor)
      assert expected['video_grid_thw'].tolist() == [grid]
      np.testing.assert_allclose(rows, expected_rows, rtol=0, atol=1e-5)

      kwargs = {} if size is None else dict(min_pixels=size['shortest_edge'],
                                            max_pixels=size['longest_edge'])
      got = media.video_patches(frames, fps=2.0, **kwargs)
      np.testing.assert_array_equal(got['video_grid_thw'], expected['video_grid_thw'])
      # Where frames are resized, PIL's bicubic (ours, Qwen2VLImageProcessorPil's) and
      # torchvision's differ by a uint8 level or two in under 1% of the values; allow
      # exactly the gap between transformers' own two backends on these frames.
      pil_rows, _ = reference_video_patches(frames, size)
      backend_gap = np.abs(pil_rows - expected_rows).max()
      diff = np.abs(got['pixel_values_videos'] - expected_rows)
      assert diff.max() <= backend_gap + 1e-5, (t, h, w, size)
      assert (diff > 1e-5).mean() < 0.01, (t, h, w, size)


@pytest.mark.parametrize('height,width', [(56, 84), (100, 150), (30, 40), (448, 280), (1000, 13)])
def test_image_patches_equal_the_pil_image_processor(height, width):
  image = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
  expected = hf_qwen2_vl.Qwen2VLImageProcessorPil()(images=[image], return_tensors='np')
  got = media.image_patches(image)
  np.testing.assert_array_equal(got['image_grid_thw'], expected['image_grid_thw'])
  np.testing.assert_allclose(got['pixel_values'], expected['pixel_values'], rtol=0, atol=1e-5)


def test_load_video_output_feeds_video_patches(tmp_path):
  path = tmp_path / 'clip.mp4'
  write_video(path, index_frames(20, 100, 180), 10)
  frames, sample_fps = media.load_video(path)
  out = media.video_patches(frames, fps=media.VIDEO_FPS)
  t, h, w = out['video_grid_thw'][0]
  assert t == len(frames) // 2 and (h * 14, w * 14) == frames.shape[1:3]
  assert out['pixel_values_videos'].shape == (t * h * w, 1176)
