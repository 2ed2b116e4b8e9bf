"""SED (Structured Evidence Decomposition) targets, labels and segments.

The SFT target orders a clip's annotation as visual evidence (scene, facial
expression, body language) -> acoustic evidence (speech content, acoustic features)
-> holistic reasoning (sentiment analysis), each under a header in the clip's
language. English target with the default headers:

  Visual evidence:
  - Scene: <video_desc>
  - Facial expression: <facial_exp_desc>
  - Body language: <body_lang_desc>

  Acoustic evidence:
  - Speech content: <speech_content>
  - Acoustic features: <acoustic_feat>

  Holistic reasoning:
  <sentiment_analysis>

Segment ids (the `segments` array of a batch, `batch.SECTION_IDS`): 0 prompt, 1 visual,
2 acoustic, 3 reasoning. A section's header and the blank line after it belong to that section.
"""

import json
import re
from typing import Mapping, Sequence

import numpy as np

from saber_jax.batch import IGNORE_INDEX, PROMPT, REASONING, SECTION_IDS
from saber_jax.data.annotation import FIELD_PATHS, Annotation

SECTION_FIELDS = {
    'visual': ('video_desc', 'facial_exp_desc', 'body_lang_desc'),
    'acoustic': ('speech_content', 'acoustic_feat'),
    'reasoning': ('sentiment_analysis',),
}
DEFAULT_ORDER = ('visual', 'acoustic', 'reasoning')   # the paper's order: evidence before reasoning
SECTION_SEPARATOR = '\n\n'

DEFAULT_HEADERS = {
    'en': {'visual': 'Visual evidence:', 'acoustic': 'Acoustic evidence:',
           'reasoning': 'Holistic reasoning:'},
    'zh': {'visual': '视觉证据：', 'acoustic': '声学证据：', 'reasoning': '综合推理：'},
}
# Prefix of each field's line. The reasoning section is a single paragraph: no label.
DEFAULT_FIELD_LABELS = {
    'en': {'video_desc': '- Scene: ', 'facial_exp_desc': '- Facial expression: ',
           'body_lang_desc': '- Body language: ', 'speech_content': '- Speech content: ',
           'acoustic_feat': '- Acoustic features: ', 'sentiment_analysis': ''},
    'zh': {'video_desc': '- 场景：', 'facial_exp_desc': '- 面部表情：',
           'body_lang_desc': '- 肢体语言：', 'speech_content': '- 语音内容：',
           'acoustic_feat': '- 声学特征：', 'sentiment_analysis': ''},
}

# The user instruction of the SED task: asks for the sections in DEFAULT_ORDER.
SED_INSTRUCTIONS = {
    'en': ('Analyze the emotion of the speaker in this video clip. First describe the visual '
           'evidence: the scene, the facial expressions and the body language. Then describe the '
           'acoustic evidence: what is said and how it sounds (pitch, volume, pace and tone). '
           'Finally, reason over all of this evidence together to explain the speaker\'s overall '
           'emotional state.'),
    'zh': ('请分析这段视频中说话者的情绪。首先描述视觉证据：场景、面部表情和肢体语言；'
           '然后描述声学证据：说话内容以及声音特点（音调、音量、语速和语气）；'
           '最后综合以上所有证据进行推理，说明说话者的整体情绪状态。'),
}


def _lookup(table: Mapping, lang: str, what: str) -> Mapping:
  if lang not in table:
    raise ValueError(f'no default {what} for language {lang!r} (have {sorted(table)}); '
                     f'pass {what}=')
  return table[lang]


def sed_instruction(lang: str, instructions: Mapping[str, str] | None = None) -> str:
  """The SED user instruction for `lang` ('en' / 'zh'), from `instructions` if given."""
  return _lookup(SED_INSTRUCTIONS if instructions is None else instructions, lang, 'instructions')


def _check_order(order: Sequence[str]) -> None:
  if not order or len(set(order)) != len(order) or not set(order) <= set(SECTION_IDS):
    raise ValueError(f'order must list distinct sections from {tuple(SECTION_IDS)}, got '
                     f'{tuple(order)}')


def sed_target(annotation: Annotation, lang: str, order: Sequence[str] = DEFAULT_ORDER,
               headers: Mapping[str, str] | None = None,
               field_labels: Mapping[str, str] | None = None) -> list[tuple[int, str]]:
  """The SED response as [(segment_id, text)], one entry per section in `order`.

  ''.join(texts) is the response; every section but the last ends with a blank line.
  An empty field (possible only through `allow_empty`, e.g. a silent clip's speech
  content) gets no line.
  headers: section name -> header line; field_labels: annotation field -> line prefix
  (defaults: DEFAULT_HEADERS / DEFAULT_FIELD_LABELS of `lang`).
  """
  _check_order(order)
  headers = headers if headers is not None else _lookup(DEFAULT_HEADERS, lang, 'headers')
  labels = (field_labels if field_labels is not None
            else _lookup(DEFAULT_FIELD_LABELS, lang, 'field_labels'))
  sections = []
  for position, name in enumerate(order):
    lines = [headers[name]] + [labels[field] + getattr(annotation, field)
                               for field in SECTION_FIELDS[name] if getattr(annotation, field)]
    text = '\n'.join(lines)
    if position < len(order) - 1:
      text += SECTION_SEPARATOR
    sections.append((SECTION_IDS[name], text))
  return sections


def split_sed_response(text: str, lang: str = 'en', order: Sequence[str] = DEFAULT_ORDER,
                       headers: Mapping[str, str] | None = None) -> list[tuple[int, str]]:
  """Inverse of `sed_target` for a generated response: [(segment_id, text)] whose texts
  join back to `text`.

  Sections start at their header (at a line start, searched in `order`); a header not
  found leaves its section out, text before the first header found joins that section,
  and a response with no header at all is one reasoning segment.
  """
  _check_order(order)
  headers = headers if headers is not None else _lookup(DEFAULT_HEADERS, lang, 'headers')
  starts, position = [], 0
  for name in order:
    match = re.compile(r'(?m)^' + re.escape(headers[name])).search(text, position)
    if match:
      starts.append((match.start(), SECTION_IDS[name]))
      position = match.end()
  if not starts:
    return [(REASONING, text)]
  starts[0] = (0, starts[0][1])
  ends = [start for start, _ in starts[1:]] + [len(text)]
  return [(segment, text[start:end]) for (start, segment), end in zip(starts, ends)]


def evidence_json(annotation: Mapping, indent: int | None = 2) -> str:
  """A nested annotation dict as JSON with its fields in SED order (visual, acoustic,
  reasoning): indented for judges to read, compact (indent=None) as a response text."""
  ordered: dict = {}
  for section in DEFAULT_ORDER:
    for name in SECTION_FIELDS[section]:
      path = FIELD_PATHS[name]
      source, node = annotation, ordered
      for key in path[:-1]:
        source, node = source[key], node.setdefault(key, {})
      node[path[-1]] = source[path[-1]]
  return json.dumps(ordered, ensure_ascii=False, indent=indent)


def tokenize_response(tokenizer, target_segments: Sequence[tuple[int, str]], *,
                      response_suffix: str = '<|im_end|>\n') -> tuple[np.ndarray, np.ndarray]:
  """(ids, segments), int32 [R] each, of the response text + `response_suffix`.

  The whole string is tokenized at once and each token takes the segment of the
  character it starts at (offset mapping), so the ids are exactly those of the
  rendered conversation. The suffix tokens take the last section's segment.
  """
  if not target_segments:
    raise ValueError('target_segments is empty')
  texts = [text for _, text in target_segments]
  seg_ids = [int(segment) for segment, _ in target_segments]
  if any(s not in SECTION_IDS.values() for s in seg_ids):
    raise ValueError(f'response segment ids must be in {sorted(SECTION_IDS.values())}, got '
                     f'{seg_ids}')
  response = ''.join(texts)
  if not response or response[0].isspace():
    # The response follows 'assistant\n' in the same text piece; leading whitespace would
    # merge with that newline into other tokens than a separate tokenization gives.
    raise ValueError('the response must be non-empty and start with a non-space character, got '
                     f'{response[:20]!r}')
  encoded = tokenizer(response + response_suffix, add_special_tokens=False,
                      return_offsets_mapping=True)
  ids = np.asarray(encoded['input_ids'], dtype=np.int32)
  token_starts = np.asarray([start for start, _ in encoded['offset_mapping']], dtype=np.int64)
  section_starts = np.cumsum([0] + [len(t) for t in texts[:-1]])
  which = np.searchsorted(section_starts, token_starts, side='right') - 1
  return ids, np.asarray(seg_ids, dtype=np.int32)[which]


def build_sft_example(tokenizer, prompt_ids: np.ndarray,
                      target_segments: Sequence[tuple[int, str]], *,
                      response_suffix: str = '<|im_end|>\n') -> dict[str, np.ndarray]:
  """One SFT sequence: prompt (from `prompt.build_prompt`) then the SED response.

  Returns int32 [L] arrays:
    input_ids: prompt ids, then the response ids.
    labels: -100 on every prompt token (system, user turn, '<|im_start|>assistant\\n');
      equal to input_ids on every response token: the section texts, then
      `response_suffix`. The default '<|im_end|>\\n' trains the closing <|im_end|> and the
      newline after it, i.e. everything the chat template renders after the
      generation prompt (what TRL's completion-only loss trains); ms-swift trains
      '<|im_end|>' without the newline: pass response_suffix='<|im_end|>'. Labels are
      not shifted; the loss shifts them.
    segments: 0 on the prompt, the section's id (1 visual, 2 acoustic, 3 reasoning) on
      each response token, the last section's id on the suffix tokens.
  """
  prompt_ids = np.asarray(prompt_ids)
  if prompt_ids.ndim != 1 or not np.issubdtype(prompt_ids.dtype, np.integer):
    raise ValueError('prompt_ids must be a 1-D integer array, got '
                     f'{prompt_ids.dtype}{list(prompt_ids.shape)}')
  response_ids, response_segments = tokenize_response(tokenizer, target_segments,
                                                      response_suffix=response_suffix)
  input_ids = np.concatenate([prompt_ids.astype(np.int32), response_ids])
  labels = np.concatenate([np.full(len(prompt_ids), IGNORE_INDEX, np.int32), response_ids])
  segments = np.concatenate([np.full(len(prompt_ids), PROMPT, np.int32), response_segments])
  return {'input_ids': input_ids, 'labels': labels, 'segments': segments}


def response_text(target_segments: Sequence[tuple[int, str]]) -> str:
  """The plain response text of a target (what a judge or a reader sees)."""
  return ''.join(text for _, text in target_segments)

