"""saber_jax.data.sed: SED targets, labels and segments."""

import dataclasses
import json

import numpy as np
import pytest

from saber_jax.batch import ACOUSTIC, IGNORE_INDEX, PROMPT, REASONING, VISUAL
from saber_jax.data import annotation, prompt, sed

try:
  from tests import tokenizer_helpers as th
except ImportError:
  import tokenizer_helpers as th

# The Chinese example annotation of the SABER release (samplenew3_00000004.json).
ZH_ANNOTATION = annotation.Annotation(
    video_desc='视频特写了一位身着古代中式服饰、留有胡须的男性。他身处一个装饰有复杂木雕的室内环境中，背景是一个深色的木质屏风或墙壁。',
    speech_content='子敬果真是江东第一善人。我...我替刘琦公子拜谢了。',
    acoustic_feat='说话人为成年男性，声音洪亮，音调中等。语速适中，吐字清晰。整体语气显得非常真诚、恭敬，带有一种感激的情绪。',
    facial_exp_desc='说话人面带温和而真诚的微笑，眼神明亮，注视着对话者，显得十分专注。',
    body_lang_desc='说话人将双手在胸前合拢，呈作揖状。在说出“拜谢了”时，他身体微微前倾。',
    sentiment_analysis='综合分析，该视频片段中的说话人主要表达了极其诚挚的感激和高度的尊敬。')


@pytest.fixture(scope='module')
def tok():
  return th.omni_tokenizer()


@pytest.fixture(scope='module')
def fixture_annotation():
  return annotation.parse_annotation(th.FIXTURE_EN_TEXT, 'fixture_en')


def _example(tok, ann, lang, **kwargs):
  target = sed.sed_target(ann, lang)
  prompt_ids = prompt.build_prompt(tok, text=sed.sed_instruction(lang))
  return prompt_ids, target, sed.build_sft_example(tok, prompt_ids, target, **kwargs)


# ------------------------------------------------------------------------------- targets

def test_default_target_orders_visual_acoustic_reasoning(fixture_annotation):
  target = sed.sed_target(fixture_annotation, 'en')
  assert [segment for segment, _ in target] == [VISUAL, ACOUSTIC, REASONING]
  text = sed.response_text(target)
  a = fixture_annotation
  positions = [text.index(s) for s in ('Visual evidence:', a.video_desc, a.facial_exp_desc,
                                       a.body_lang_desc,
                                       'Acoustic evidence:', a.speech_content, a.acoustic_feat,
                                       'Holistic reasoning:', a.sentiment_analysis)]
  assert positions == sorted(positions)
  visual, acoustic, reasoning = (t for _, t in target)
  assert visual.startswith('Visual evidence:\n- Scene: ') and visual.endswith('\n\n')
  assert acoustic == (f'Acoustic evidence:\n- Speech content: {a.speech_content}\n'
                      f'- Acoustic features: {a.acoustic_feat}\n\n')
  assert reasoning == f'Holistic reasoning:\n{a.sentiment_analysis}'


def test_chinese_target_uses_chinese_headers_and_labels():
  target = sed.sed_target(ZH_ANNOTATION, 'zh')
  visual, acoustic, reasoning = (t for _, t in target)
  assert visual.startswith('视觉证据：\n- 场景：' + ZH_ANNOTATION.video_desc)
  assert '- 面部表情：' in visual and '- 肢体语言：' in visual
  assert acoustic.startswith('声学证据：\n- 语音内容：' + ZH_ANNOTATION.speech_content)
  assert reasoning == '综合推理：\n' + ZH_ANNOTATION.sentiment_analysis
  assert 'evidence' not in sed.response_text(target)


def test_order_and_headers_are_configurable(fixture_annotation):
  headers = {'visual': '[SEE]', 'acoustic': '[HEAR]', 'reasoning': '[THINK]'}
  target = sed.sed_target(fixture_annotation, 'en', order=('acoustic', 'visual', 'reasoning'),
                          headers=headers)
  assert [segment for segment, _ in target] == [ACOUSTIC, VISUAL, REASONING]
  assert [t.split('\n')[0] for _, t in target] == ['[HEAR]', '[SEE]', '[THINK]']
  reasoning_only = sed.sed_target(fixture_annotation, 'en', order=('reasoning',))
  assert reasoning_only == [
      (REASONING, 'Holistic reasoning:\n' + fixture_annotation.sentiment_analysis)]


def test_bad_order_or_language_is_rejected(fixture_annotation):
  with pytest.raises(ValueError, match='distinct sections'):
    sed.sed_target(fixture_annotation, 'en', order=('visual', 'visual'))
  with pytest.raises(ValueError, match='audio'):
    sed.sed_target(fixture_annotation, 'en', order=('visual', 'audio'))
  with pytest.raises(ValueError, match="language 'fr'"):
    sed.sed_target(fixture_annotation, 'fr')
  with pytest.raises(ValueError, match="language 'fr'"):
    sed.sed_instruction('fr')


def test_instruction_defaults_and_override():
  assert sed.sed_instruction('en').startswith('Analyze the emotion')
  assert '视觉证据' in sed.sed_instruction('zh') and '声学证据' in sed.sed_instruction('zh')
  assert sed.sed_instruction('en', {'en': 'Go.'}) == 'Go.'


@pytest.mark.parametrize('lang', ['en', 'zh'])
def test_split_sed_response_inverts_sed_target(fixture_annotation, lang):
  ann = fixture_annotation if lang == 'en' else ZH_ANNOTATION
  target = sed.sed_target(ann, lang)
  assert sed.split_sed_response(sed.response_text(target), lang) == target


def test_split_sed_response_handles_missing_and_unstructured_sections():
  text = 'Preamble.\nAcoustic evidence:\n- x\n\nHolistic reasoning:\nsad'
  assert sed.split_sed_response(text) == [(ACOUSTIC, 'Preamble.\nAcoustic evidence:\n- x\n\n'),
                                          (REASONING, 'Holistic reasoning:\nsad')]
  assert sed.split_sed_response('just sad') == [(REASONING, 'just sad')]


# ----------------------------------------------------------------------- labels, segments

@pytest.mark.parametrize('lang', ['en', 'zh'])
def test_labels_are_ignored_exactly_on_the_prompt(tok, fixture_annotation, lang):
  ann = fixture_annotation if lang == 'en' else ZH_ANNOTATION
  prompt_ids, _, example = _example(tok, ann, lang)
  n = len(prompt_ids)
  assert {k: (v.dtype, v.shape) for k, v in example.items()} == {
      k: (np.dtype(np.int32), example['input_ids'].shape)
      for k in ('input_ids', 'labels', 'segments')}
  np.testing.assert_array_equal(example['input_ids'][:n], prompt_ids)
  assert (example['labels'][:n] == IGNORE_INDEX).all()
  np.testing.assert_array_equal(example['labels'][n:], example['input_ids'][n:])
  assert (example['labels'][n:] != IGNORE_INDEX).all()
  # The trained tail: the last text token, then <|im_end|> and '\n'.
  assert tok.decode(example['input_ids'][-2:]) == '<|im_end|>\n'


@pytest.mark.parametrize('lang', ['en', 'zh'])
def test_segments_cover_every_response_token(tok, fixture_annotation, lang):
  ann = fixture_annotation if lang == 'en' else ZH_ANNOTATION
  prompt_ids, target, example = _example(tok, ann, lang)
  segments, ids = example['segments'], example['input_ids']
  n = len(prompt_ids)
  assert (segments[:n] == PROMPT).all()
  assert set(segments[n:]) == {VISUAL, ACOUSTIC, REASONING}
  assert (np.diff(segments[n:]) >= 0).all()     # one contiguous run per section, in order
  # Decoding each segment's tokens gives back exactly its section text (header included):
  # no token straddles two sections.
  for segment, text in target:
    decoded = tok.decode(ids[segments == segment])
    assert decoded == (text + '<|im_end|>\n' if segment == target[-1][0] else text)


def test_response_tokens_equal_those_of_the_whole_conversation(tok, fixture_annotation):
  # Tokenizing the response apart (after build_prompt) must give the ids of the fully
  # rendered conversation, which is how HF / TRL tokenize an SFT example.
  proc = th.hf_processor()
  for ann, lang in ((fixture_annotation, 'en'), (ZH_ANNOTATION, 'zh')):
    response = sed.response_text(sed.sed_target(ann, lang))
    messages = th.messages(sed.sed_instruction(lang), media=('video', 'audio'), assistant=response)
    rendered = proc.apply_chat_template(messages, tokenize=False)
    assert rendered.endswith(response + '<|im_end|>\n')
    video, wave = np.zeros((4, 56, 56, 3), np.uint8), np.zeros(16000 * 2, np.float32)
    out = proc(text=rendered, videos=[video], audio=[wave])
    prompt_ids = prompt.build_prompt(tok, text=sed.sed_instruction(lang),
                                     video_grids=out['video_grid_thw'],
                                     audio_lengths=np.asarray(out['feature_attention_mask']).sum(-1))
    example = sed.build_sft_example(tok, prompt_ids, sed.sed_target(ann, lang))
    np.testing.assert_array_equal(example['input_ids'], np.asarray(out['input_ids'][0]))


def test_ms_swift_suffix_trains_im_end_without_newline(tok, fixture_annotation):
  _, _, example = _example(tok, fixture_annotation, 'en', response_suffix='<|im_end|>')
  assert example['input_ids'][-1] == 151645 and example['labels'][-1] == 151645
  assert example['segments'][-1] == REASONING


def test_custom_order_segments_follow_the_order(tok, fixture_annotation):
  target = sed.sed_target(fixture_annotation, 'en', order=('reasoning', 'visual'))
  example = sed.build_sft_example(tok, np.array([1, 2, 3]), target)
  response_segments = example['segments'][3:]
  first_visual = np.argmax(response_segments == VISUAL)
  assert (response_segments[:first_visual] == REASONING).all()
  assert (response_segments[first_visual:] == VISUAL).all()
  assert ACOUSTIC not in response_segments


def test_build_sft_example_rejects_bad_inputs(tok):
  with pytest.raises(ValueError, match='empty'):
    sed.build_sft_example(tok, np.array([1]), [])
  with pytest.raises(ValueError, match='segment ids'):
    sed.build_sft_example(tok, np.array([1]), [(0, 'x')])
  with pytest.raises(ValueError, match='non-space'):
    sed.build_sft_example(tok, np.array([1]), [(1, '\nx')])
  with pytest.raises(ValueError, match='1-D integer'):
    sed.build_sft_example(tok, np.array([[1]]), [(1, 'x')])


def test_fixture_annotation_round_trips(fixture_annotation):
  raw = json.loads(th.FIXTURE_EN_TEXT)
  assert fixture_annotation.to_dict() == raw
  assert annotation.validate_annotation(fixture_annotation.to_dict(), 'again') == fixture_annotation
  target = sed.sed_target(fixture_annotation, 'en')
  for field in annotation.FIELD_PATHS:
    assert sed.response_text(target).count(getattr(fixture_annotation, field)) == 1


def test_empty_field_gets_no_line(fixture_annotation):
  silent = dataclasses.replace(fixture_annotation, speech_content='')
  acoustic = sed.sed_target(silent, 'en')[1][1]
  assert acoustic == f'Acoustic evidence:\n- Acoustic features: {silent.acoustic_feat}\n\n'
