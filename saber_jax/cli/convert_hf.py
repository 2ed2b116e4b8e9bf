"""Convert thinker weights between Hugging Face checkpoints and saber_jax params.

  saber-convert-hf to-params --hf Qwen2.5-Omni-7B/ --out params/ [--dtype bfloat16]
  saber-convert-hf to-hf --params workdir/sft/final --out hf_out/ [--prefix thinker.]
  saber-convert-hf to-hf --params workdir/dpo/final --base Qwen2.5-Omni-7B/ --out omni_out/
  saber-convert-hf to-peft --params workdir/sft/final --out adapter/ [--base-model NAME]

`to-params` writes an Orbax params directory (what `--config.init_from` and the stages
read); `to-hf` writes safetensors + config.json that
`Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained` loads (LoRA runs are
exported merged). With `--base` (the full Qwen2.5-Omni checkpoint the run started from)
it writes the complete model `Qwen2_5OmniForConditionalGeneration.from_pretrained` and
`vllm serve` load: the run's thinker, the base's talker, token2wav, config, speakers,
tokenizer and processor files; streamed, about one shard in host memory. `to-peft`
writes the adapter a LoRA stage keeps in `final/adapter/` as a PEFT adapter
(adapter_config.json + adapter_model.safetensors) for the thinker the run started from.
"""

import flax.linen as nn
import jax

from saber_jax import convert, files, weights
from saber_jax.cli import _common
from saber_jax.models import abstract_params
from saber_jax.train import adapters


def main(argv=None):
  parser = _common.tool_parser(__doc__)
  sub = parser.add_subparsers(dest='command', required=True)
  to_params = sub.add_parser('to-params', help='HF checkpoint directory -> Orbax params')
  to_params.add_argument('--hf', required=True, help='transformers checkpoint directory')
  to_params.add_argument('--out', required=True, help='params directory to write')
  to_params.add_argument('--dtype', default='float32', help='dtype of the stored params')
  to_hf = sub.add_parser('to-hf', help='Orbax params -> HF checkpoint directory')
  to_hf.add_argument('--params', required=True, help='params directory (save_params)')
  to_hf.add_argument('--out', required=True, help='HF checkpoint directory to write')
  to_hf.add_argument('--prefix', default='', help="tensor name prefix ('thinker.' = hub layout)")
  to_hf.add_argument('--base', help='full Qwen2.5-Omni checkpoint directory whose talker, '
                     'token2wav, config and tokenizer files complete the export')
  to_hf.add_argument('--dtype', help='cast the thinker tensors (default: as stored; with '
                     "--base, the base's thinker dtype)")
  to_hf.add_argument('--max-shard-gb', type=_common.positive(float), default=4.0,
                     help='largest safetensors shard, GB (> 0)')
  to_peft = sub.add_parser('to-peft', help="a LoRA stage's adapter -> PEFT adapter directory")
  to_peft.add_argument('--params', required=True, help='final/ of a stage run with trainable=lora')
  to_peft.add_argument('--out', required=True, help='PEFT adapter directory to write')
  to_peft.add_argument('--base-model', help='base_model_name_or_path (default: the init_from '
                       'the run started from)')
  args = parser.parse_args(argv)
  if args.command == 'to-params':
    config, params = convert.load_hf(args.hf, args.dtype, progress=True)
    weights.save_params(args.out, params, config)
  elif args.command == 'to-peft':
    adapters.stage_adapter_to_peft(args.params, args.out, args.base_model)
  elif args.base:
    if args.prefix not in ('', 'thinker.'):
      parser.error('--prefix does not apply with --base: the full model names the thinker '
                   "'thinker.'")
    config = weights.params_config(args.params)
    leaf = weights.params_leaf_reader(args.params, nn.unbox(abstract_params(config)))
    with files.local_copy(args.base) as base:     # a gs:// base: read from a local copy
      convert.save_full_hf(config, leaf, base, args.out, dtype=args.dtype,
                           max_shard_bytes=int(args.max_shard_gb * 2**30), progress=True)
  else:
    config = weights.params_config(args.params)
    params = weights.load_params(args.params, nn.unbox(abstract_params(config)))
    if args.dtype:
      params = jax.tree.map(lambda x: x.astype(args.dtype), params)
    convert.save_hf(config, params, args.out, prefix=args.prefix,
                    max_shard_bytes=int(args.max_shard_gb * 2**30), progress=True)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
