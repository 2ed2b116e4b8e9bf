"""The tiny thinker and data options the input pipeline tests share (data.examples,
data.collate, data.plan, data.datasets)."""

from saber_jax.data.examples import DataConfig
from saber_jax.models.config import AudioConfig, TextConfig, ThinkerConfig, VisionConfig

# Real Omni token ids (up to 151656) need the real vocabulary size; everything else is tiny.
TINY = ThinkerConfig(
    audio=AudioConfig(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                      n_window=50, output_dim=32),
    vision=VisionConfig(depth=2, hidden_size=16, intermediate_size=32, num_heads=2,
                        fullatt_block_indexes=(1,), out_hidden_size=32),
    text=TextConfig(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, mrope_section=(2, 3, 3)))
BASE = DataConfig(batch_size=4, num_data_shards=2, length_buckets=(384, 512),
                  min_patches=64, min_frame_len=16, min_vision_blocks=2, read_threads=1)
