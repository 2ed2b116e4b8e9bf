"""The reference side of the parity tests: a tiny random transformers thinker (every weight
perturbed, since the default init of zero biases and unit norms hides bugs) and batches
of processor-style inputs built from a short description of each row."""

import dataclasses

import numpy as np
import torch
from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

from saber_jax.models.audio import audio_token_count
from saber_jax.models.rope import chunk_bounds

AUD, IMG, VID, A_BOS, A_EOS, USER, V_BOS, V_EOS = 1, 2, 3, 4, 5, 6, 7, 8
FIRST_TEXT_ID = 10


def tiny_hf_config(vocab_size=99, tie_word_embeddings=False) -> Qwen2_5OmniThinkerConfig:
  """The tiny thinker of the reference notes: 2-layer towers, 16 mel bins, 2x2 patches."""
  config = Qwen2_5OmniThinkerConfig(
      audio_config=dict(d_model=32, encoder_layers=2, encoder_attention_heads=4,
                        encoder_ffn_dim=64, num_mel_bins=16, max_source_positions=1500,
                        n_window=8, output_dim=64),
      vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2,
                         in_channels=3, patch_size=2, temporal_patch_size=2,
                         spatial_merge_size=2, window_size=8, fullatt_block_indexes=[1],
                         out_hidden_size=64),
      text_config=dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       rms_norm_eps=1e-6, max_position_embeddings=4096,
                       tie_word_embeddings=tie_word_embeddings,
                       rope_parameters=dict(rope_type='default', rope_theta=1e6,
                                            mrope_section=[2, 3, 3])),
      audio_token_index=AUD, image_token_index=IMG, video_token_index=VID,
      audio_start_token_id=A_BOS, audio_end_token_id=A_EOS, vision_start_token_id=V_BOS,
      vision_end_token_id=V_EOS, user_token_id=USER, position_id_per_seconds=25,
      seconds_per_chunk=2, tie_word_embeddings=tie_word_embeddings)
  config._attn_implementation = 'eager'
  return config


def tiny_hf_model(seed=0, **config_kwargs) -> Qwen2_5OmniThinkerForConditionalGeneration:
  torch.manual_seed(seed)
  model = Qwen2_5OmniThinkerForConditionalGeneration(tiny_hf_config(**config_kwargs)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model


def tiny_full_hf_model(seed=0):
  """A tiny random full Qwen2.5-Omni (the tiny thinker above, a 2-layer talker and a
  2-block token2wav), every weight perturbed: the base of full-model exports."""
  from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration
  talker = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, embedding_size=64,
                rope_parameters=dict(rope_type='default', rope_theta=1e6, mrope_section=[1, 1, 2]),
                audio_token_index=AUD, image_token_index=IMG, video_token_index=VID,
                audio_start_token_id=A_BOS, audio_end_token_id=A_EOS,
                vision_start_token_id=V_BOS, vision_end_token_id=V_EOS,
                tts_codec_start_token_id=60, tts_codec_end_token_id=61,
                tts_codec_pad_token_id=62, tts_codec_mask_token_id=63,
                tts_text_start_token_id=10, tts_text_end_token_id=11, tts_text_pad_token_id=12)
  token2wav = dict(
      dit_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ff_mult=2,
                      emb_dim=16, head_dim=16, num_embeds=64, mel_dim=16, enc_emb_dim=16,
                      enc_dim=16, enc_channels=[16, 16, 16, 16, 32], enc_attention_channels=8,
                      enc_se_channels=8, look_ahead_layers=[1], look_backward_layers=[0]),
      bigvgan_config=dict(mel_dim=16, upsample_initial_channel=16, upsample_rates=[2, 2],
                          upsample_kernel_sizes=[4, 4]))
  config = Qwen2_5OmniConfig(thinker_config=tiny_hf_config().to_dict(), talker_config=talker,
                             token2wav_config=token2wav)
  torch.manual_seed(seed)
  model = Qwen2_5OmniForConditionalGeneration(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model


# Row descriptions: a list of segments, each one of
#   ('text', n)                            n random text tokens
#   ('audio', frames)                      an audio block of a clip with `frames` mel frames
#   ('image', (t, h, w))                   an image block (t = 1)
#   ('video', (t, h, w), second_per_grid)  a video block
#   ('video+audio', (t, h, w), second_per_grid, frames)   video with its audio interleaved


@dataclasses.dataclass
class _Builder:
  rng: np.random.Generator
  mel_bins: int = 16
  patch_dim: int = 24
  merge: int = 2
  audio: list = dataclasses.field(default_factory=list)
  images: list = dataclasses.field(default_factory=list)
  videos: list = dataclasses.field(default_factory=list)

  def text(self, n):
    return list(self.rng.integers(FIRST_TEXT_ID, 99, n))

  def add_audio(self, frames):
    self.audio.append(self.rng.standard_normal((self.mel_bins, frames)).astype(np.float32))
    return int(audio_token_count(frames))

  def add_vision(self, store, grid, second_per_grid=None):
    t, h, w = grid
    store.append((np.array(grid), self.rng.standard_normal((t * h * w, self.patch_dim))
                   .astype(np.float32), second_per_grid))
    return t * h * w // self.merge ** 2

  def row(self, segments):
    ids = []
    for kind, *args in segments:
      if kind == 'text':
        ids += self.text(args[0])
      elif kind == 'audio':
        ids += [A_BOS] + [AUD] * self.add_audio(args[0]) + [A_EOS]
      elif kind == 'image':
        ids += [V_BOS] + [IMG] * self.add_vision(self.images, args[0]) + [V_EOS]
      elif kind == 'video':
        ids += [V_BOS] + [VID] * self.add_vision(self.videos, args[0], args[1]) + [V_EOS]
      elif kind == 'video+audio':
        grid, second_per_grid, frames = args
        self.add_vision(self.videos, grid, second_per_grid)
        ids += [V_BOS, A_BOS] + _interleave(grid, second_per_grid, self.add_audio(frames),
                                            self.merge) + [A_EOS, V_EOS]
      else:
        raise ValueError(kind)
    return ids


def _interleave(grid, second_per_grid, n_audio, merge):
  """Video and audio placeholders in 2 s chunks, as Qwen2_5OmniProcessor emits them."""
  t, h, w = grid
  per_frame = h * w // merge ** 2
  t_values = np.repeat((np.arange(t) * second_per_grid * 25).astype(np.int64), per_frame)
  video_chunks = chunk_bounds(t_values, 50, 0)
  audio_chunks = chunk_bounds(np.arange(n_audio), 50, 0)
  ids = []
  for j in range(max(len(video_chunks), len(audio_chunks))):
    if j < len(video_chunks):
      ids += [VID] * (video_chunks[j][1] - video_chunks[j][0])
    if j < len(audio_chunks):
      ids += [AUD] * (audio_chunks[j][1] - audio_chunks[j][0])
  return ids


def make_batch(rows, *, padding_side='left', use_audio_in_video=False, seed=0, length=None,
               frames=None) -> dict:
  """A processor-style numpy batch of the described rows, padded to `length` tokens and
  `frames` mel frames when given (default: the longest plus 5 frames)."""
  builder = _Builder(np.random.default_rng(seed))
  id_rows = [builder.row(r) for r in rows]
  length = max(map(len, id_rows)) if length is None else length
  input_ids = np.zeros((len(rows), length), np.int64)
  attention_mask = np.zeros_like(input_ids)
  for i, ids in enumerate(id_rows):
    span = slice(length - len(ids), length) if padding_side == 'left' else slice(0, len(ids))
    input_ids[i, span] = ids
    attention_mask[i, span] = 1
  batch = dict(input_ids=input_ids, attention_mask=attention_mask)
  if builder.audio:
    if frames is None:                                     # trailing padding, as the processor
      frames = max(a.shape[1] for a in builder.audio) + 5
    batch['input_features'] = np.stack([np.pad(a, ((0, 0), (0, frames - a.shape[1])))
                                        for a in builder.audio])
    batch['feature_attention_mask'] = np.stack(
        [np.arange(frames) < a.shape[1] for a in builder.audio]).astype(np.int64)
  if builder.images:
    batch['image_grid_thw'] = np.stack([g for g, _, _ in builder.images])
    batch['pixel_values'] = np.concatenate([p for _, p, _ in builder.images])
  if builder.videos:
    batch['video_grid_thw'] = np.stack([g for g, _, _ in builder.videos])
    batch['pixel_values_videos'] = np.concatenate([p for _, p, _ in builder.videos])
    batch['video_second_per_grid'] = np.array([s for _, _, s in builder.videos], np.float32)
  if use_audio_in_video:
    batch['use_audio_in_video'] = True
  return batch


def hf_rope_index(model, batch):
  """transformers' get_rope_index on a numpy batch -> numpy (position_ids, deltas [B])."""
  t = lambda k: None if batch.get(k) is None else torch.as_tensor(batch[k])
  fm = batch.get('feature_attention_mask')
  positions, deltas = model.model.get_rope_index(
      t('input_ids'), t('image_grid_thw'), t('video_grid_thw'), t('attention_mask'),
      bool(batch.get('use_audio_in_video', False)),
      None if fm is None else torch.as_tensor(fm).sum(-1), t('video_second_per_grid'))
  return positions.numpy(), deltas.numpy().reshape(-1)


def hf_logits(model, batch) -> np.ndarray:
  """transformers' logits [B, L, V] (fp32, eager attention) of a numpy batch."""
  kwargs = {k: torch.as_tensor(v) for k, v in batch.items()
            if k != 'use_audio_in_video' and v is not None}
  with torch.no_grad():
    out = model(**kwargs, use_audio_in_video=bool(batch.get('use_audio_in_video', False)))
  return out.logits.float().numpy()
