"""The Qwen2.5-Omni thinker in Flax."""

from saber_jax.models.config import AudioConfig, TextConfig, ThinkerConfig, VisionConfig
from saber_jax.models.rope import rope_index
from saber_jax.models.thinker import (Thinker, abstract_params, init_params, model_inputs,
                                      thinker_logits)
