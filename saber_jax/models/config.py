"""Architecture configs of the Qwen2.5-Omni thinker (audio tower, vision tower, Qwen2 decoder).

Field names follow transformers' `Qwen2_5OmniThinkerConfig` so a `config.json` maps over
one to one; `ThinkerConfig.from_hf` does that mapping.
"""

import dataclasses
import json
import os
from typing import Any


@dataclasses.dataclass(frozen=True)
class AudioConfig:
  num_mel_bins: int = 128
  d_model: int = 1280
  encoder_layers: int = 32
  encoder_attention_heads: int = 20
  encoder_ffn_dim: int = 5120
  n_window: int = 100              # chunks of 2 * n_window mel frames attend only within themselves
  max_source_positions: int = 1500
  output_dim: int = 3584


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112           # in pixels: window_size // (merge * patch) merge units per side
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  out_hidden_size: int = 3584
  rope_theta: float = 10000.0

  @property
  def patch_dim(self) -> int:
    """Values in one flattened patch: channels x temporal patch x patch side^2."""
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_hidden_layers: int = 28
  num_attention_heads: int = 28
  num_key_value_heads: int = 4
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1e6
  mrope_section: tuple[int, int, int] = (16, 24, 24)   # rotary pairs per axis (T, H, W)
  tie_word_embeddings: bool = False

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class ThinkerConfig:
  """The whole thinker: three towers, the placeholder token ids and TMRoPE timing.

  `dtype` is the compute dtype, `param_dtype` the storage dtype of the weights, `remat`
  the rematerialisation policy of every scanned layer stack ('none', 'full' or
  'dots', see `layers.remat_policy`). `attention` is the decoder's attention outside
  generation: 'xla' (an explicit mask: any padding, any device), 'cudnn' (cuDNN flash
  attention on NVIDIA GPUs, causal within each row's valid length: rows must be right
  padded, as training batches are; `model_inputs` checks) or 'splash' (Pallas' splash
  flash attention on TPUs, any padding; on CPU it runs in Pallas' interpreter, for tests).
  """
  audio: AudioConfig = AudioConfig()
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  audio_token_id: int = 151646
  image_token_id: int = 151655
  video_token_id: int = 151656
  audio_start_token_id: int = 151647
  audio_end_token_id: int = 151648
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  position_id_per_seconds: int = 25
  seconds_per_chunk: int = 2
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  remat: str = 'none'
  attention: str = 'xla'

  @classmethod
  def qwen2_5_omni_7b(cls, **overrides) -> 'ThinkerConfig':
    return dataclasses.replace(cls(), **overrides)

  @classmethod
  def qwen2_5_omni_3b(cls, **overrides) -> 'ThinkerConfig':
    # Values of Qwen/Qwen2.5-Omni-3B's config.json: same towers, a Qwen2.5-3B decoder.
    text = TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                      num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                      mrope_section=(16, 24, 24))
    return dataclasses.replace(
        cls(audio=AudioConfig(output_dim=2048), vision=VisionConfig(out_hidden_size=2048),
            text=text), **overrides)

  @classmethod
  def tiny(cls, **overrides) -> 'ThinkerConfig':
    """A thinker of a few million parameters with the real token ids, vocabulary, mel bins
    and patch geometry: for the demo and tests on a laptop CPU."""
    return dataclasses.replace(cls(
        audio=AudioConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4,
                          encoder_ffn_dim=64, output_dim=64),
        vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                            fullatt_block_indexes=(1,), out_hidden_size=64),
        text=TextConfig(vocab_size=151936, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        mrope_section=(2, 3, 3), tie_word_embeddings=True)), **overrides)

  @classmethod
  def from_hf(cls, config: str | os.PathLike | dict[str, Any], **overrides) -> 'ThinkerConfig':
    """From a transformers `config.json` (path, directory or dict) of the Omni model or its
    thinker."""
    if not isinstance(config, dict):
      path = os.fspath(config)
      if os.path.isdir(path):
        path = os.path.join(path, 'config.json')
      with open(path) as f:
        config = json.load(f)
    thinker = config.get('thinker_config', config)
    text = dict(thinker['text_config'])
    rope = text.get('rope_parameters') or text.get('rope_scaling') or {}
    rope_theta = rope.get('rope_theta', text.get('rope_theta', 1e6))
    # transformers falls back to [16, 24, 24] when the config names no section.
    mrope_section = tuple(rope.get('mrope_section', (16, 24, 24)))
    vision = dict(thinker['vision_config'])
    vision_rope = vision.get('rope_parameters') or {}
    return cls(
        audio=_from_fields(AudioConfig, thinker['audio_config']),
        vision=_from_fields(VisionConfig, vision, fullatt_block_indexes=tuple(
            vision.get('fullatt_block_indexes', VisionConfig.fullatt_block_indexes)),
                            rope_theta=vision_rope.get('rope_theta', 10000.0)),
        text=_from_fields(TextConfig, text, rope_theta=rope_theta, mrope_section=mrope_section,
                          # The thinker's flag decides, not the text config's default of True.
                          tie_word_embeddings=thinker.get('tie_word_embeddings', False)),
        audio_token_id=_first(thinker, 'audio_token_id', 'audio_token_index'),
        image_token_id=_first(thinker, 'image_token_id', 'image_token_index'),
        video_token_id=_first(thinker, 'video_token_id', 'video_token_index'),
        audio_start_token_id=thinker['audio_start_token_id'],
        audio_end_token_id=thinker['audio_end_token_id'],
        vision_start_token_id=thinker.get('vision_start_token_id', cls.vision_start_token_id),
        vision_end_token_id=thinker.get('vision_end_token_id', cls.vision_end_token_id),
        position_id_per_seconds=thinker.get('position_id_per_seconds', 25),
        seconds_per_chunk=thinker.get('seconds_per_chunk', 2),
        **overrides)

  def to_hf(self) -> dict[str, Any]:
    """The thinker `config.json` that transformers loads (`Qwen2_5OmniThinkerConfig`)."""
    text = dataclasses.asdict(self.text)
    text.update(rope_parameters=dict(rope_type='default', rope_theta=self.text.rope_theta,
                                     mrope_section=list(self.text.mrope_section)),
                hidden_act='silu', max_position_embeddings=32768,
                model_type='qwen2_5_omni_text')
    del text['rope_theta'], text['mrope_section']
    vision = dataclasses.asdict(self.vision)
    vision.update(fullatt_block_indexes=list(self.vision.fullatt_block_indexes), hidden_act='silu',
                  rope_parameters=dict(rope_type='axial', rope_theta=self.vision.rope_theta))
    del vision['rope_theta']
    return dict(
        model_type='qwen2_5_omni_thinker',
        architectures=['Qwen2_5OmniThinkerForConditionalGeneration'],
        audio_config=dict(dataclasses.asdict(self.audio), activation_function='gelu'),
        vision_config=vision, text_config=text,
        audio_token_index=self.audio_token_id, image_token_index=self.image_token_id,
        video_token_index=self.video_token_id,
        audio_start_token_id=self.audio_start_token_id, audio_end_token_id=self.audio_end_token_id,
        vision_start_token_id=self.vision_start_token_id,
        vision_end_token_id=self.vision_end_token_id,
        position_id_per_seconds=self.position_id_per_seconds,
        seconds_per_chunk=self.seconds_per_chunk,
        tie_word_embeddings=self.text.tie_word_embeddings)


def _from_fields(cls, values: dict[str, Any], **explicit):
  names = {f.name for f in dataclasses.fields(cls)}
  return cls(**{**{k: v for k, v in values.items() if k in names}, **explicit})


def _first(values: dict[str, Any], *keys: str):
  for key in keys:
    if key in values:
      return values[key]
  raise KeyError(f'config has none of {keys}')
