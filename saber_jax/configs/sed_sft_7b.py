"""SED fine-tuning of Qwen2.5-Omni-7B with the paper's settings (`:lora` for LoRA).

  python -m saber_jax.main --config=configs/sed_sft_7b.py \
      --config.init_from=/ckpt/Qwen2.5-Omni-7B --config.sft_records='/data/sft/sft-*'
"""

from saber_jax.train.config import sed_sft_config


def get_config(arg=None):
  return sed_sft_config('qwen2_5_omni_7b', arg or 'full')
