"""Shared test fixtures: the offline Omni tokenizer, a real Qwen2_5OmniProcessor and the
English SABER annotation fixture.

The processor is transformers' own class with a real tokenizer, WhisperFeatureExtractor
and Qwen2VLImageProcessorPil. Its video processor (Qwen2VLVideoProcessor) needs
torchvision, which is not installed, so `GridVideoProcessor` stands in for it: it
only turns already-sized frames [T, H, W, 3] into `video_grid_thw` (T padded to the
temporal patch, H and W in patches), which is all of the video processor that the
placeholder expansion reads. Everything downstream -- `replace_video_token`,
`replace_video_with_audio_token`, `get_chunked_index`, the fps -> second_per_grid
default, the string replacement and the tokenizer call -- is transformers' code.
"""

import functools
import math

import numpy as np
from transformers import Qwen2_5OmniProcessor, Qwen2VLImageProcessorPil, WhisperFeatureExtractor
from transformers.feature_extraction_utils import BatchFeature

from saber_jax.data import prompt

# The chat template of Qwen/Qwen2.5-Omni-7B (chat_template.json), the reference format
# render_chat_text and build_prompt must reproduce.
OMNI_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio "
    "{{ audio_count.value }}: {% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class GridVideoProcessor:
  """Stand-in for Qwen2VLVideoProcessor (needs torchvision): frames -> video_grid_thw."""
  patch_size = 14
  temporal_patch_size = 2
  merge_size = 2
  model_input_names = ['pixel_values_videos']

  def __call__(self, videos, **unused_kwargs):
    grids = []
    for frames in videos:
      t, h, w, _ = frames.shape
      assert (h % (self.patch_size * self.merge_size) == 0
              and w % (self.patch_size * self.merge_size) == 0)
      grids.append([math.ceil(t / self.temporal_patch_size), h // self.patch_size,
                    w // self.patch_size])
    return BatchFeature({'video_grid_thw': np.asarray(grids, dtype=np.int64)})


class _OmniProcessor(Qwen2_5OmniProcessor):
  """Qwen2_5OmniProcessor accepting the stand-in video processor (class check only)."""

  def check_argument_for_proper_class(self, argument_name, argument):
    if argument_name == 'video_processor':
      return type(argument)
    return super().check_argument_for_proper_class(argument_name, argument)


@functools.lru_cache(maxsize=None)
def omni_tokenizer():
  return prompt.load_tokenizer()


@functools.lru_cache(maxsize=None)
def hf_processor():
  return _OmniProcessor(
      image_processor=Qwen2VLImageProcessorPil(),
      video_processor=GridVideoProcessor(),
      # Omni's preprocessor
      feature_extractor=WhisperFeatureExtractor(feature_size=128, chunk_length=300),
      tokenizer=omni_tokenizer(),
      chat_template=OMNI_CHAT_TEMPLATE)


def messages(text, *, system=prompt.DEFAULT_SYSTEM_PROMPT, media=(), assistant=None):
  """A one-turn conversation: media items (names 'video' / 'audio' / 'image'), then text."""
  content = [{'type': kind, kind: f'{kind}{i}'} for i, kind in enumerate(media)]
  if text:
    content.append({'type': 'text', 'text': text})
  out = ([] if system is None
         else [{'role': 'system', 'content': [{'type': 'text', 'text': system}]}])
  out.append({'role': 'user', 'content': content})
  if assistant is not None:
    out.append({'role': 'assistant', 'content': [{'type': 'text', 'text': assistant}]})
  return out


# /work/shared/fixtures/saber_annotation_en.json (a real SABER annotation), verbatim, so
# the tests also run where the shared folder is absent; test_annotation checks the copy.
SHARED_FIXTURE_PATH = '/work/shared/fixtures/saber_annotation_en.json'
FIXTURE_EN_TEXT = (
    '{\n'
    '    "audio_desc": {\n'
    '        "speech_content": "Why do all your coffee mugs have numbers on the bottom?",\n'
    '        "acoustic_feat": "The speaker has a male voice with a moderate pitch and a '
    'conversational volume. His tone is inquisitive and slightly puzzled, delivering the line in a '
    'smooth, even cadence."\n'
    '    },\n'
    '    "video_desc": "A man and a woman are standing in a colorful kitchen, both holding dark '
    'coffee mugs. The man, dressed in a black suit jacket over a green shirt, is looking down at '
    'the bottom of his mug. The woman, wearing a light-colored patterned dress, stands beside him '
    'by the turquoise kitchen counter and looks at him. The kitchen is well-lit and appears to be '
    'part of an apartment set, with shelves full of items and a refrigerator on the right.",\n'
    '    "facial_exp_desc": "The man\'s eyebrows are slightly furrowed as he looks down at the '
    'mug, conveying curiosity and concentration. His mouth is slightly agape as he speaks. The '
    'woman has a relatively neutral expression, looking at the man as he asks his question, her '
    'lips slightly parted as if she is about to respond.",\n'
    '    "sentiment_analysis": "The overall sentiment of the clip is neutral and inquisitive. The '
    'speaker\'s tone of voice, which is purely questioning, aligns perfectly with his focused body '
    'language (examining the mug) and curious facial expression (furrowed brow). There is no '
    'indication of negative or positive emotion; it\'s a simple, lighthearted moment of inquiry in '
    'a casual, friendly setting. The woman\'s neutral reaction suggests this is the beginning of a '
    'normal conversation. The atmosphere is calm and conversational.",\n'
    '    "body_lang_desc": "The man holds the coffee mug with both hands, tilting it to examine '
    'the bottom. His posture is relaxed and focused on the object of his curiosity. The woman '
    'stands with one hand on the counter and the other holding her own mug. She makes a slight, '
    'subtle gesture with her free hand as she listens."\n'
    '}'
)
