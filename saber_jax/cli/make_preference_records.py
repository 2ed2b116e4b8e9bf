"""Preference records for CA-DPO: each pair of a pairs JSONL (make_pairs.py) joined with the
prompt and media of its clip's SFT record (preprocess.py).

  saber-make-preference-records --pairs pairs/pairs.jsonl \
      --sft-records records/sft --out pref/

Writes `OUT/pref-00000-of-00001.array_record` (ref log-probs empty until the reference
pass), `OUT/rejects.jsonl` (pairs that cannot become a record, with the reason) and
`OUT/stats.json`. A pair's `id` is its clip id; the record id is `<clip id>#<k>`.
Pairs with equal answers or a chosen answer scored below the rejected one are rejects
(`records.degenerate_pair`). OUT/fingerprint.json names the pairs file, the SFT shards
(path, size, mtime) and the tokenizer: a rerun with the same inputs finds the output done
(stats.json present); with other inputs (another --pairs) it is an error naming what
differs, or --overwrite rebuilds it. Writing no record at all exits 1 naming the counts
and the most frequent reject reason.
"""

import argparse
import collections
import json
import os

import tqdm

from saber_jax import files, fingerprint
from saber_jax.cli import _common
from saber_jax.data import prompt, records


def read_pairs(path: str) -> dict[str, list[dict]]:
  """Pairs grouped by clip id, in file order; a malformed line names the file and line."""
  by_clip = collections.defaultdict(list)
  for rid, pair in files.records_with_ids(path, unique=False):   # several pairs per clip
    by_clip[rid].append(pair)
  return by_clip


def make_records(pairs_path: str, sft_records: str, out: str, tokenizer) -> dict:
  pairs = read_pairs(pairs_path)
  rejects, made = [], collections.Counter()

  paths = records.shard_paths(sft_records)
  repeats = set(records.repeated_records(paths))   # two records of one id: refused here

  def blobs():
    for position, (where, blob) in enumerate(records.read_records(paths)):
      if position in repeats:
        continue
      record = records.decode_record(blob, where)
      for k, pair in enumerate(pairs.pop(record['id'], [])):
        try:
          yield records.preference_from_sft(
              record, tokenizer, chosen=pair['chosen'], rejected=pair['rejected'],
              pair_id=f'{record["id"]}#{k}', subset=pair.get('subset'),
              chosen_score=pair.get('chosen_score'), rejected_score=pair.get('rejected_score'),
              margin=pair.get('margin'))
          made[record.get('subset') or 'all'] += 1
        except (KeyError, ValueError) as e:
          rejects.append({'id': f'{record["id"]}#{k}', 'reason': f'{type(e).__name__}: {e}'})

  os.makedirs(out, exist_ok=True)
  records.write_records(os.path.join(out, records.shard_name('pref', 0, 1)),
                        tqdm.tqdm(blobs(), desc='pairs', unit=' records'))
  for clip_id, left in pairs.items():
    rejects += [{'id': f'{clip_id}#{k}', 'reason': 'no SFT record for this clip'}
                for k in range(len(left))]
  files.write_jsonl(os.path.join(out, 'rejects.jsonl'), rejects)
  reasons = collections.Counter(r['reason'].split(': ', 2)[-1].split(',')[0] for r in rejects)
  stats = {'records': sum(made.values()), 'by_subset': dict(made), 'rejected': len(rejects),
           'most_frequent_reject': reasons.most_common(1)[0][0] if reasons else None}
  files.write_json(os.path.join(out, 'stats.json'), stats)   # written last: the done mark
  return stats


def _outputs(out: str) -> list[str]:
  """What a run leaves in OUT (the shard, its size index, rejects, stats)."""
  if not os.path.isdir(out):
    return []
  return [os.path.join(out, n) for n in sorted(os.listdir(out))
          if n in ('rejects.jsonl', 'stats.json') or n.startswith('pref-')]


def claim_output(args) -> str:
  """OUT belongs to these pairs, SFT shards and tokenizer (`fingerprint.ensure`): 'resume'
  or 'fresh'; other inputs are an error (exit 1) unless --overwrite clears OUT first."""
  produced_by = {
      'pairs': fingerprint.tree_identity(args.pairs),
      'sft_records': fingerprint.files_identity(records.shard_paths(args.sft_records)),
      'tokenizer': fingerprint.tree_identity(args.tokenizer) if args.tokenizer else 'offline'}
  outputs = _outputs(args.out)

  def clear():
    for path in outputs:
      os.remove(path)

  os.makedirs(args.out, exist_ok=True)
  try:
    return fingerprint.ensure(os.path.join(args.out, fingerprint.FILE), produced_by,
                              has_output=bool(outputs), overwrite=args.overwrite, clear=clear)
  except (fingerprint.Mismatch, files.LockHeld) as e:
    raise SystemExit(f'error: {e}') from None


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--pairs', required=True, help='pairs JSONL of make_pairs.py')
  parser.add_argument('--sft-records', required=True, help='SFT shard prefix or files')
  parser.add_argument('--out', required=True)
  parser.add_argument('--tokenizer', default=None, help='HF tokenizer dir (default: offline Qwen)')
  parser.add_argument('--overwrite', '--force', action='store_true',
                      help='replace an output made from other inputs')
  args = parser.parse_args(_common.dashed(argv, parser))
  stats_path = os.path.join(args.out, 'stats.json')
  if claim_output(args) == 'resume' and os.path.exists(stats_path):
    print(f'{args.out} is done (stats.json present, same inputs); --overwrite to rebuild')
    return files.read_json(stats_path)
  try:   # a damaged shard, two SFT records of one id: one line naming the place
    stats = make_records(args.pairs, args.sft_records, args.out,
                         prompt.load_tokenizer(args.tokenizer))
  except (records.RecordError, files.DuplicateId) as e:
    raise SystemExit(f'error: {e}') from None
  print(json.dumps(stats))
  if not stats['records']:
    raise _common.produced_nothing('saber-make-preference-records wrote no record',
                                   f"{stats['rejected']} pairs rejected",
                                   stats['most_frequent_reject'],
                                   os.path.join(args.out, 'rejects.jsonl'))
  return stats


if __name__ == '__main__':
  main()
