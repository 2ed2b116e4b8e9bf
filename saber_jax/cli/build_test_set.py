"""Build SABER-Test: judge each clip's audio-visual relation and pick the clearest cases.

The judge reads each clip's annotation and returns
  {"relation": "consistent" | "inconsistent", "intensity": 0-10}
-- whether the acoustic cues (words, voice) and the visual cues (face, body, scene)
convey the same emotion, and how clearly. Then the top --per-class clips of each class
by intensity are selected (ties broken by id, so reruns agree), evenly split by default
(the paper: 1,800 = 900 consistent + 900 inconsistent). A class with fewer than
--per-class clips is reported; with balancing (default) the other class is cut to match.

Input: annotations JSONL (e.g. quality.py's kept.jsonl: id, lang, annotation).
Output: OUT/judgments.jsonl (resumable; failures in OUT/errors.jsonl),
OUT/test_set.jsonl (the input record plus "subset" and "intensity", ranked within each
class; the reference file for `evaluate.py saber-test`), OUT/test_ids.txt (its ids, one a
line), OUT/summary.json. Keep the test clips out of training: `saber-preprocess
--exclude OUT/test_set.jsonl` for the SFT records, `--only OUT/test_set.jsonl` for the
test clips' own records (what mode=generate answers).

  saber-build-test-set --annotations qc/kept.jsonl --out saber_test/ \\
      --per-class 900 --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-72B-Instruct
"""

import os
from typing import Literal

from saber_jax import files, metrics
from saber_jax.cli import _common
from saber_jax.data import annotation as annotation_lib
from saber_jax.data import sed
from saber_jax.judge import replies

class Relation(replies.Reply):
  relation: Literal[metrics.SUBSETS]
  intensity: replies.int_in(0, 10)

RELATION_PROMPT = """\
Below is a structured annotation of a short video clip: what is seen (video, facial expression, \
body language), what is heard (speech content with <sound events>, acoustic features of the voice) \
and a sentiment analysis.
Judge the relation between the emotional cues of the audio (the words and the voice) and those of \
the visuals (face, body, scene):
- "consistent": they convey the same emotion;
- "inconsistent": they conflict, e.g. sarcasm, a masked or suppressed emotion, a smile with an \
angry voice, cheerful words said flatly.
Then rate the intensity of that relation from 0 to 10: how clearly and strongly the cues agree \
(for consistent) or conflict (for inconsistent). 0 = barely, 10 = unmistakable.
Reply with one JSON object: {{"relation": "consistent" or "inconsistent", \
"intensity": <integer 0-10>}}.

Annotation:
{annotation}"""


def relation_messages(annotation: dict) -> list[dict]:
  content = RELATION_PROMPT.format(annotation=sed.evidence_json(annotation))
  return [{'role': 'user', 'content': content}]


def parse_args(argv=None):
  parser = _common.tool_parser(__doc__)
  parser.add_argument('--annotations', required=True, help='JSONL with id, annotation')
  parser.add_argument('--out', required=True, help='output folder')
  parser.add_argument('--per-class', type=_common.at_least(1), default=900,
                      help='clips per class, >= 1 (paper: 900)')
  parser.add_argument('--no-balance', action='store_true',
                      help='keep every available clip of a class even when the other falls short')
  _common.add_judge_args(parser)
  return parser.parse_args(_common.dashed(argv, parser))


def main(argv=None) -> dict:
  args = parse_args(argv)
  judge = _common.judge_from_args(args)
  judged_path = os.path.join(args.out, 'judgments.jsonl')

  def items():
    for rid, r in _common.sharded(files.records_with_ids(args.annotations), args):
      yield {'id': rid, 'annotation': annotation_lib.annotation_of(r, args.annotations, rid)}

  def process(item):
    reply = judge.ask(relation_messages(item['annotation']), Relation, name='av_relation')
    return {**reply.value, 'raw': reply.raw}

  run = _common.run_judged(args, items(), process, input_path=args.annotations,
                           out_path=judged_path, desc='relation',
                           total=_common.shard_total(args.annotations, args))
  # Judgments of clips no longer in the input (an edited annotations file) are ignored.
  present = {rid for rid, _ in _common.sharded(files.records_with_ids(args.annotations), args)}
  judgments = [j for j in (files.read_jsonl(judged_path) if os.path.exists(judged_path) else [])
               if str(j['id']) in present]
  selected, counts = metrics.select_test_set(judgments, args.per_class, balance=not args.no_balance)
  rank = {i: (subset, k) for subset, ids in selected.items() for k, i in enumerate(ids)}
  intensity = {str(j['id']): j['intensity'] for j in judgments}
  chosen = {}
  for rid, r in files.records_with_ids(args.annotations):
    if rid in rank:
      chosen[rid] = {**r, 'id': rid, 'subset': rank[rid][0], 'intensity': intensity[rid]}
  ordered = [chosen[i] for subset in metrics.SUBSETS for i in selected[subset]]
  files.write_jsonl(os.path.join(args.out, 'test_set.jsonl'), ordered)
  files.write_text(os.path.join(args.out, 'test_ids.txt'),
                   ''.join(f"{r['id']}\n" for r in ordered))
  summary = {**counts, 'per_class': args.per_class, 'balanced': not args.no_balance,
             'judge': {'done': run.done, 'skipped': run.skipped, 'failed': run.failed}}
  files.write_json(os.path.join(args.out, 'summary.json'), summary)
  for subset, short in counts['shortfall'].items():
    if short:
      print(f'warning: only {counts["available"][subset]} {subset} clips judged, '
            f'{short} fewer than --per-class {args.per_class}', flush=True)
  print('selected ' + ' '.join(f'{s}={n}' for s, n in counts['selected'].items()), flush=True)
  return summary


if __name__ == '__main__':
  main()
