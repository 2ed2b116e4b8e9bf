"""Generate a small synthetic emotion data set: real mp4/wav files and SABER annotations.

  saber-make-demo-data --out DIR [--n 32] [--seed 0]

Writes DIR/clips.jsonl (the manifest saber-preprocess reads), DIR/annotations.jsonl
and DIR/media/. Each clip is a cartoon face on a coloured background (160x128, 10 fps,
1.5-4 s) whose eyebrows and mouth show the *face emotion* and whose head motion shows the
matching body language, with a hummed voice whose pitch, contour, pace, loudness and
timbre encode the *voice emotion*:

  emotion   face                         motion            voice
  happy     raised brows, smile          quick bouncing    high rising pitch, fast, bright
  sad       inner brows up, frown        slow sinking      low falling pitch, slow, soft
  angry     brows down-in, open mouth    fast shaking      mid pitch, harsh, loud, fast
  neutral   flat brows, straight mouth   still             mid flat pitch, even pace

'consistent' clips (subset) have face == voice; 'inconsistent' ones (about a third)
a different voice emotion, so the holistic reasoning has to weigh conflicting cues.
The annotation texts (English or Chinese, alternating) are built from these generated
attributes (background colour, duration, syllable count, emotions), so a tiny model
trained on them has something real to learn. Most clips carry their audio as an AAC
track; every fourth is a silent mp4 plus a separate wav. The manifest lines also hold
the ground truth ('face', 'voice'). Deterministic for a seed; no downloads.
"""

import argparse
import fractions
import json
import os

import av
import numpy as np
from PIL import Image, ImageDraw

from saber_jax.cli import _common
from saber_jax.data.media import SAMPLING_RATE

EMOTIONS = ('happy', 'sad', 'angry', 'neutral')
WIDTH, HEIGHT, FPS = 160, 128, 10

BACKGROUNDS = {  # name -> (rgb, English, Chinese)
    'blue': ((70, 110, 200), 'blue', '蓝色'),
    'green': ((80, 160, 90), 'green', '绿色'),
    'grey': ((128, 128, 128), 'grey', '灰色'),
    'purple': ((140, 90, 170), 'purple', '紫色'),
    'orange': ((220, 140, 60), 'orange', '橙色'),
}

# Voice: base pitch (Hz), pitch change across a syllable (ratio), syllables per second,
# amplitude, harmonic weight (timbre).
VOICE = {
    'happy': dict(pitch=320.0, glide=1.25, rate=4.0, amplitude=0.5, harmonics=0.2),
    'sad': dict(pitch=140.0, glide=0.8, rate=1.5, amplitude=0.2, harmonics=0.1),
    'angry': dict(pitch=240.0, glide=1.0, rate=5.0, amplitude=0.8, harmonics=0.9),
    'neutral': dict(pitch=200.0, glide=1.0, rate=2.5, amplitude=0.4, harmonics=0.2),
}

TEXT = {
    'en': {
        'video': ('A cartoon face on a plain {bg} background fills the centre of the frame for '
                  'about {seconds:.1f} seconds.'),
        'face': {
            'happy': 'The eyebrows are raised in soft arcs and the mouth curves up into a wide '
                     'smile.',
            'sad': 'The inner ends of the eyebrows are lifted and the mouth turns down into a '
                   'frown.',
            'angry': 'The eyebrows are pulled down towards the centre and the mouth is open and '
                     'tense.',
            'neutral': 'The eyebrows are level and the mouth is a straight, relaxed line.',
        },
        'body': {
            'happy': 'The head bounces up and down quickly and lightly.',
            'sad': 'The head slowly sinks towards the bottom of the frame.',
            'angry': 'The head shakes rapidly from side to side.',
            'neutral': 'The head stays still in the centre of the frame.',
        },
        'speech': 'No words are spoken; the speaker hums {syllables} short syllables.',
        'voice': {
            'happy': 'A high pitch that rises within each syllable, a quick pace and a bright, '
                     'lively tone.',
            'sad': 'A low pitch that falls within each syllable, a slow pace and a soft, quiet '
                   'voice.',
            'angry': 'A loud, harsh and buzzing voice at a fast pace, with abrupt syllables.',
            'neutral': 'A medium, steady pitch at an even pace and a moderate volume.',
        },
        'emotion': {'happy': 'happy', 'sad': 'sad', 'angry': 'angry', 'neutral': 'calm'},
        'consistent': ('The face, the head movement and the voice all agree: the expression and '
                       'motion look {face}, and the voice sounds {voice} as well. The speaker is '
                       '{face}.'),
        'inconsistent': ('The cues conflict: the face and the head movement look {face}, but the '
                         'voice sounds {voice}. The emotion is mixed; the {face} expression does '
                         'not match the {voice} voice, which suggests a masked or ambivalent '
                         'feeling.'),
    },
    'zh': {
        'video': '一张卡通人脸位于纯{bg}背景的画面中央，持续约{seconds:.1f}秒。',
        'face': {
            'happy': '眉毛呈柔和的弧形上扬，嘴角上翘，露出灿烂的笑容。',
            'sad': '眉毛内端上挑，嘴角向下，呈现皱眉苦脸的样子。',
            'angry': '眉毛向中间下压，嘴巴张开且紧绷。',
            'neutral': '眉毛平直，嘴巴是一条放松的直线。',
        },
        'body': {
            'happy': '头部轻快地上下跳动。',
            'sad': '头部缓慢地向画面下方沉落。',
            'angry': '头部快速地左右摇晃。',
            'neutral': '头部静止在画面中央。',
        },
        'speech': '没有说话内容；说话者哼出了{syllables}个短音节。',
        'voice': {
            'happy': '音调较高且在每个音节中上扬，语速较快，语气明亮活泼。',
            'sad': '音调较低且在每个音节中下降，语速缓慢，声音轻柔低沉。',
            'angry': '声音响亮、粗糙且带有嗡嗡声，语速很快，音节短促。',
            'neutral': '音调适中平稳，语速均匀，音量适中。',
        },
        'emotion': {'happy': '开心', 'sad': '悲伤', 'angry': '愤怒', 'neutral': '平静'},
        'consistent': '面部表情、头部动作和声音完全一致：表情和动作显得{face}，声音听起来也很'
                      '{voice}。说话者的情绪是{face}。',
        'inconsistent': ('线索相互矛盾：面部表情和头部动作显得{face}，但声音听起来{voice}。'
                         '情绪是复杂的；{face}的表情与{voice}的声音不符，暗示一种被掩饰或矛盾的情感。'),
    },
}


# ----------------------------------------------------------------------------- pictures


def _head_offset(emotion: str, t: float) -> tuple[float, float]:
  """(dx, dy) pixels of the head at time t: the body language."""
  if emotion == 'happy':
    return 0.0, -8.0 * abs(np.sin(2 * np.pi * 2.0 * t))
  if emotion == 'sad':
    return 0.0, min(14.0, 6.0 * t)
  if emotion == 'angry':
    return 10.0 * np.sin(2 * np.pi * 4.0 * t), 0.0
  return 0.0, 0.0


def draw_frame(emotion: str, background, t: float) -> np.ndarray:
  """uint8 [HEIGHT, WIDTH, 3]: the face showing `emotion` at time t."""
  image = Image.new('RGB', (WIDTH, HEIGHT), background)
  draw = ImageDraw.Draw(image)
  dx, dy = _head_offset(emotion, t)
  cx, cy, r = WIDTH / 2 + dx, HEIGHT / 2 + dy, 44
  draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(250, 215, 90), outline=(60, 40, 20), width=2)
  for side in (-1, 1):
    ex, ey = cx + side * 16, cy - 8
    draw.ellipse((ex - 4, ey - 4, ex + 4, ey + 4), fill=(30, 30, 30))
    inner, outer = ex - side * 8, ex + side * 10   # brow ends near and away from the nose
    if emotion == 'happy':
      draw.arc((ex - 10, ey - 24, ex + 10, ey - 10), 200, 340, fill=(60, 40, 20), width=3)
    else:
      inner_y, outer_y = {'sad': (-21, -14), 'angry': (-12, -20), 'neutral': (-16, -16)}[emotion]
      draw.line((inner, ey + inner_y, outer, ey + outer_y), fill=(60, 40, 20), width=3)
  if emotion == 'happy':
    draw.arc((cx - 20, cy, cx + 20, cy + 26), 20, 160, fill=(150, 30, 30), width=4)
  elif emotion == 'sad':
    draw.arc((cx - 18, cy + 16, cx + 18, cy + 36), 200, 340, fill=(150, 30, 30), width=4)
  elif emotion == 'angry':
    draw.rectangle((cx - 18, cy + 10, cx + 18, cy + 30), fill=(110, 20, 20), outline=(60, 10, 10),
                   width=2)
  else:
    draw.line((cx - 16, cy + 20, cx + 16, cy + 20), fill=(150, 30, 30), width=4)
  return np.asarray(image)


# ----------------------------------------------------------------------------- sounds


def hum(emotion: str, seconds: float, rng: np.random.Generator) -> tuple[np.ndarray, int]:
  """(float32 [n] mono waveform, number of syllables) of a hummed voice."""
  v = VOICE[emotion]
  n = int(round(seconds * SAMPLING_RATE))
  syllables = max(1, int(seconds * v['rate']))
  period = n // syllables
  out = np.zeros(n, np.float64)
  for k in range(syllables):
    length = int(period * 0.7)
    start = k * period + int(rng.integers(0, max(1, period - length)))
    t = np.arange(length) / SAMPLING_RATE
    pitch = v['pitch'] * (1 + 0.05 * rng.standard_normal())
    # Pitch glides exponentially from `pitch` to `pitch * glide` over the syllable.
    frequency = pitch * v['glide'] ** (t / t[-1])
    phase = 2 * np.pi * np.cumsum(frequency) / SAMPLING_RATE
    tone = np.sin(phase) + v['harmonics'] * (np.sin(2 * phase) / 2 + np.sin(3 * phase) / 3)
    envelope = np.sin(np.pi * np.arange(length) / length) ** (0.5 if emotion == 'angry' else 1.5)
    out[start:start + length] += v['amplitude'] * envelope * tone / (1 + v['harmonics'])
  out += 0.005 * rng.standard_normal(n)   # a little room noise
  return np.clip(out, -1, 1).astype(np.float32), syllables


# ----------------------------------------------------------------------------- files


def _audio_frames(stream, samples):
  pcm = np.round(np.clip(samples, -1, 1) * 32767).astype(np.int16)
  fmt = stream.codec_context.codec.audio_formats[0].name
  chunk = stream.codec_context.frame_size or 1024
  for start in range(0, len(pcm), chunk):
    block = pcm[start:start + chunk]
    if fmt == 'fltp':
      frame = av.AudioFrame.from_ndarray(block[None].astype(np.float32) / 32767, format='fltp',
                                         layout='mono')
    else:
      frame = av.AudioFrame.from_ndarray(block[None], format='s16', layout='mono')
    frame.sample_rate = SAMPLING_RATE
    frame.pts = start
    frame.time_base = fractions.Fraction(1, SAMPLING_RATE)
    yield frame


def write_mp4(path: str, frames: np.ndarray, audio: np.ndarray | None) -> None:
  """H.264 video at FPS, with an AAC track when `audio` is given."""
  with av.open(path, 'w') as container:
    video = container.add_stream('libx264', rate=FPS)
    video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, 'yuv420p'
    video.options = {'crf': '18', 'preset': 'ultrafast', 'threads': '1'}
    sound = None
    if audio is not None:
      sound = container.add_stream('aac', rate=SAMPLING_RATE)
      sound.layout = 'mono'
    for frame in frames:
      container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')))
    container.mux(video.encode(None))
    if sound is not None:
      for frame in _audio_frames(sound, audio):
        container.mux(sound.encode(frame))
      container.mux(sound.encode(None))


def write_wav(path: str, audio: np.ndarray) -> None:
  with av.open(path, 'w') as container:
    sound = container.add_stream('pcm_s16le', rate=SAMPLING_RATE)
    sound.layout = 'mono'
    for frame in _audio_frames(sound, audio):
      container.mux(sound.encode(frame))
    container.mux(sound.encode(None))


# ----------------------------------------------------------------------------- data set


def annotation(lang: str, *, face: str, voice: str, background: str, seconds: float,
               syllables: int) -> dict:
  """The SABER six-dimension annotation of a generated clip."""
  text = TEXT[lang]
  bg = BACKGROUNDS[background][1 if lang == 'en' else 2]
  template = text['consistent' if face == voice else 'inconsistent']
  return {
      'video_desc': text['video'].format(bg=bg, seconds=seconds),
      'audio_desc': {'speech_content': text['speech'].format(syllables=syllables),
                     'acoustic_feat': text['voice'][voice]},
      'facial_exp_desc': text['face'][face],
      'body_lang_desc': text['body'][face],
      'sentiment_analysis': template.format(face=text['emotion'][face],
                                            voice=text['emotion'][voice]),
  }


def make_clip(out: str, index: int, seed: int) -> tuple[dict, dict]:
  """Writes one clip's media; returns (manifest line, annotation line)."""
  rng = np.random.default_rng([seed, index])
  clip_id = f'demo-{index:04d}'
  face = EMOTIONS[int(rng.integers(len(EMOTIONS)))]
  inconsistent = rng.random() < 1 / 3
  voice = (EMOTIONS[int(rng.choice([i for i, e in enumerate(EMOTIONS) if e != face]))]
           if inconsistent else face)
  background = sorted(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
  seconds = float(np.round(rng.uniform(1.5, 4.0), 1))
  lang = 'en' if index % 2 == 0 else 'zh'
  frames = np.stack([draw_frame(face, BACKGROUNDS[background][0], k / FPS)
                     for k in range(int(round(seconds * FPS)))])
  audio, syllables = hum(voice, seconds, rng)
  entry = {'id': clip_id, 'video': f'media/{clip_id}.mp4', 'lang': lang,
           'subset': 'inconsistent' if inconsistent else 'consistent', 'face': face, 'voice': voice}
  if index % 4 == 3:   # a silent video with its sound in a separate wav
    write_mp4(os.path.join(out, entry['video']), frames, None)
    entry['audio'] = f'media/{clip_id}.wav'
    write_wav(os.path.join(out, entry['audio']), audio)
  else:
    write_mp4(os.path.join(out, entry['video']), frames, audio)
  labels = annotation(lang, face=face, voice=voice, background=background, seconds=seconds,
                      syllables=syllables)
  # Annotation lines carry the clip's language and subset, as saber-annotate writes them.
  return entry, {'id': clip_id, 'lang': lang, 'subset': entry['subset'], 'annotation': labels}


def make_demo_data(out: str, n: int = 32, seed: int = 0) -> tuple[str, str]:
  """Writes the data set; returns (manifest path, annotations path)."""
  os.makedirs(os.path.join(out, 'media'), exist_ok=True)
  clips, annotations = zip(*(make_clip(out, i, seed) for i in range(n))) if n else ((), ())
  manifest, labels = os.path.join(out, 'clips.jsonl'), os.path.join(out, 'annotations.jsonl')
  for path, rows in ((manifest, clips), (labels, annotations)):
    with open(path, 'w', encoding='utf-8') as f:
      f.writelines(json.dumps(r, ensure_ascii=False) + '\n' for r in rows)
  return manifest, labels


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--n', type=_common.at_least(1), default=32, help='number of clips (>= 1)')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  manifest, labels = make_demo_data(args.out, args.n, args.seed)
  print(f'wrote {args.n} clips: {manifest}, {labels}')


if __name__ == '__main__':
  main()
