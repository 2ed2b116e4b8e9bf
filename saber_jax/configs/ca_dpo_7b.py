"""CA-DPO of the SED model (Qwen2.5-Omni-7B) with the paper's settings (`:lora` for LoRA).

  python -m saber_jax.main --config=configs/ca_dpo_7b.py --config.mode=ref_logps \
      --config.init_from=workdir/sed_sft_qwen2_5_omni_7b/sft/final \
      --config.pref_records='/data/pairs/pref-*'
  python -m saber_jax.main --config=configs/ca_dpo_7b.py \
      --config.init_from=workdir/sed_sft_qwen2_5_omni_7b/sft/final \
      --config.pref_records='workdir/ca_dpo_qwen2_5_omni_7b/ref_logps/pref-*'
"""

from saber_jax.train.config import ca_dpo_config


def get_config(arg=None):
  return ca_dpo_config('qwen2_5_omni_7b', arg or 'full')
