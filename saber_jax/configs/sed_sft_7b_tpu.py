"""SED fine-tuning of Qwen2.5-Omni-7B on a TPU slice with the paper's settings:
`:v5p` (v5p-64, 32 chips) or `:v6e` (v6e-64, 64 chips), `,lora` or `,llm` to train LoRA adapters or the LLM alone. Run the same
command on every host of the slice (JAX finds the other hosts itself); plan it first from
any machine with libtpu installed:

  python -m saber_jax.main --config=configs/sed_sft_7b_tpu.py:v5p --config.dry_run=True \
      --config.dry_run_topology=v5p-64
  python -m saber_jax.main --config=configs/sed_sft_7b_tpu.py:v5p \
      --config.init_from=/ckpt/Qwen2.5-Omni-7B --config.sft_records='/data/sft/sft-*'
"""

from saber_jax.train.config import on_tpu_slice, sed_sft_config, tpu_slice_arg


def get_config(arg=None):
  name, trainable = tpu_slice_arg(arg)
  return on_tpu_slice(sed_sft_config('qwen2_5_omni_7b', trainable), name,
                      examples_per_update=128)
