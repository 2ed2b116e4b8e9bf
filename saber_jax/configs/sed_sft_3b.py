"""SED fine-tuning of Qwen2.5-Omni-3B with the paper's settings (`:lora` for LoRA).

  python -m saber_jax.main --config=configs/sed_sft_3b.py \
      --config.init_from=/ckpt/Qwen2.5-Omni-3B --config.sft_records='/data/sft/sft-*'
"""

from saber_jax.train.config import sed_sft_config


def get_config(arg=None):
  return sed_sft_config('qwen2_5_omni_3b', arg or 'full')
