"""CA-DPO of the SED model with the paper's settings (train/config.py RECIPES['ca_dpo']:
1 epoch, batch 64 pairs, lr 1e-5, sigmoid loss with beta 0.1). The argument picks the
variant, comma-joined words in any order:

  model size      3b | 7b               (default 7b: Qwen2.5-Omni-7B)
  trainable mode  full | llm | lora     (default full; llm: towers frozen; lora: adapters)
  TPU slice       v5p | v6e             (default none: one host of 8 GPUs; v5p-64 / v6e-64)

First the frozen SED model's reference log-probs, then CA-DPO from the same weights:

  python -m saber_jax.main --config=configs/ca_dpo.py:7b --config.mode=ref_logps \\
      --config.init_from=workdir/sed_sft_qwen2_5_omni_7b/sft/final \\
      --config.pref_records='/data/pairs/pref-*'
  python -m saber_jax.main --config=configs/ca_dpo.py:7b \\
      --config.init_from=workdir/sed_sft_qwen2_5_omni_7b/sft/final \\
      --config.pref_records='workdir/ca_dpo_qwen2_5_omni_7b/ref_logps/pref-*'
"""

from saber_jax.train.config import paper_config


def get_config(arg=None):
  return paper_config('ca_dpo', arg)
