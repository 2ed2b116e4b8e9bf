"""SED fine-tuning with the paper's settings (train/config.py RECIPES['sed_sft']: 2 epochs,
batch 128 clips, lr 1e-4). The argument picks the variant, comma-joined words in any order:

  model size      3b | 7b               (default 7b: Qwen2.5-Omni-7B)
  trainable mode  full | llm | lora     (default full; llm: towers frozen; lora: adapters)
  TPU slice       v5p | v6e             (default none: one host of 8 GPUs; v5p-64 / v6e-64)

  python -m saber_jax.main --config=configs/sed_sft.py:7b,lora \\
      --config.init_from=/ckpt/Qwen2.5-Omni-7B --config.sft_records='/data/sft/sft-*'

On a TPU slice run the same command on every host (JAX finds the other hosts itself); plan
it first from any machine with libtpu installed:

  python -m saber_jax.main --config=configs/sed_sft.py:v5p --config.dry_run=True \\
      --config.dry_run_topology=v5p-64
"""

from saber_jax.train.config import paper_config


def get_config(arg=None):
  return paper_config('sed_sft', arg)
