"""CA-DPO of the SED model (Qwen2.5-Omni-7B) on a TPU slice with the paper's settings:
`:v5p` (v5p-64) or `:v6e` (v6e-64), `,lora` or `,llm` to train LoRA adapters or the LLM alone; see `ca_dpo_7b.py` for the stages
and `sed_sft_7b_tpu.py` for running on a slice.

  python -m saber_jax.main --config=configs/ca_dpo_7b_tpu.py:v6e,lora --config.dry_run=True \
      --config.dry_run_topology=v6e-64
"""

from saber_jax.train.config import ca_dpo_config, on_tpu_slice, tpu_slice_arg


def get_config(arg=None):
  name, trainable = tpu_slice_arg(arg)
  return on_tpu_slice(ca_dpo_config('qwen2_5_omni_7b', trainable), name,
                      examples_per_update=64)
