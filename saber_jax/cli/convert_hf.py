"""Convert thinker weights between Hugging Face checkpoints and saber_jax params.

  saber-convert-hf to-params --hf Qwen2.5-Omni-7B/ --out params/ [--dtype bfloat16]
  saber-convert-hf to-hf --params workdir/sft/final --out hf_out/ [--prefix thinker.]

`to-params` writes an Orbax params directory (what `--config.init_from` and the stages
read); `to-hf` writes safetensors + config.json that
`Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained` loads (LoRA runs are
exported merged).
"""

import argparse

import flax.linen as nn

from saber_jax import convert, weights
from saber_jax.models import abstract_params


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  to_params = sub.add_parser('to-params', help='HF checkpoint directory -> Orbax params')
  to_params.add_argument('--hf', required=True, help='transformers checkpoint directory')
  to_params.add_argument('--out', required=True, help='params directory to write')
  to_params.add_argument('--dtype', default='float32', help='dtype of the stored params')
  to_hf = sub.add_parser('to-hf', help='Orbax params -> HF checkpoint directory')
  to_hf.add_argument('--params', required=True, help='params directory (save_params)')
  to_hf.add_argument('--out', required=True, help='HF checkpoint directory to write')
  to_hf.add_argument('--prefix', default='', help="tensor name prefix ('thinker.' = hub layout)")
  to_hf.add_argument('--max-shard-gb', type=float, default=4.0)
  args = parser.parse_args(argv)
  if args.command == 'to-params':
    config, params = convert.load_hf(args.hf, args.dtype, progress=True)
    weights.save_params(args.out, params, config)
  else:
    config = weights.params_config(args.params)
    params = weights.load_params(args.params, nn.unbox(abstract_params(config)))
    convert.save_hf(config, params, args.out, prefix=args.prefix,
                    max_shard_bytes=int(args.max_shard_gb * 2**30), progress=True)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
