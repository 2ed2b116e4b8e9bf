"""Quality control for annotations: speech transcript agreement + semantic consistency.

(a) WER between an independent ASR transcript (reference) and the annotation's
    `speech_content` (hypothesis), `<...>` sound-event tags stripped: word level for
    English (lowercased, punctuation removed), character level for Chinese (jiwer 4
    CER, punctuation and whitespace removed). A clip is dropped when the rate exceeds
    --wer-threshold (default 0.3: ASR alone typically errs on 10-20% of the words of
    conversational film audio, so 0.3 leaves room for both transcribers' honest
    mistakes while a wrong or hallucinated transcript -- a different sentence, half
    the speech missing -- lands far above it; on a 5-word line 0.3 allows one error).
    The transcript comes from --transcripts JSONL {"id", "transcript"} (what
    saber-transcribe writes) or from a `transcript` field of the record (a manifest
    column, carried through by annotate.py); without --transcripts every record must
    have that field (else a usage error naming saber-transcribe), and a clip in neither
    is dropped ("no ASR transcript").
(b) With --descriptions JSONL {"id", "description"} (an independent description of
    the clip, e.g. from another captioning model), an LLM judge decides whether it
    and the annotation are semantically consistent: {"consistent": bool, "reason": str}
    (judged results in OUT/consistency.jsonl, resumable; failures in OUT/errors.jsonl).
    Only clips that pass (a) are judged; a clip without a description is dropped when
    --descriptions is given.

Writes OUT/kept.jsonl and OUT/dropped.jsonl (the input record plus "qc": {wer,
wer_unit, consistent, consistency_reason} and, when dropped, "drop_reasons"), and
OUT/summary.json. Clips whose judge call failed are in neither file until a rerun
succeeds ("pending"). Keeping no clip at all exits 1 naming the counts and the most
frequent reason.

  saber-transcribe --manifest clips.jsonl --model openai/whisper-large-v3 --out asr/
  saber-quality --annotations ann/annotations.jsonl --transcripts asr/transcripts.jsonl \\
      --out qc/ --descriptions captions.jsonl \\
      --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-72B-Instruct
"""

import os

from saber_jax import files, metrics
from saber_jax.cli import _common
from saber_jax.data import annotation as annotation_lib
from saber_jax.data import sed
from saber_jax.judge import replies

DEFAULT_WER_THRESHOLD = 0.3

class Consistency(replies.Reply):
  consistent: bool
  reason: replies.NonEmpty

CONSISTENCY_PROMPT = """\
Two descriptions of the same short video clip follow: a structured annotation (JSON) and an \
independent description written by another observer.
Decide whether they are semantically consistent: they describe the same scene, the same people and \
actions, and a compatible emotional tone. Differences in detail, emphasis or wording are fine; a \
contradiction (different people, setting, events or speech, or an opposite emotion) makes them \
inconsistent.
Reply with one JSON object: {{"consistent": true or false, "reason": "<one sentence>"}}.

Annotation:
{annotation}

Independent description:
{description}"""


def consistency_messages(annotation: dict, description: str) -> list[dict]:
  return [{'role': 'user', 'content': CONSISTENCY_PROMPT.format(
      annotation=sed.evidence_json(annotation), description=description)}]


def speech_qc(record: dict, transcript: str | None,
              wer_threshold: float) -> tuple[dict, list[tuple[str, str]]]:
  """(qc fields, [(reason code, message)]) of check (a); codes 'no_transcript', 'wer'."""
  if transcript is None:
    return {}, [('no_transcript', 'no ASR transcript')]
  speech = record['annotation']['audio_desc']['speech_content']
  match = metrics.speech_error_rate(transcript, speech, record['lang'])
  qc = {'wer': match.error_rate, 'wer_unit': match.unit}
  if match.error_rate > wer_threshold:
    name = 'WER' if match.unit == 'word' else 'CER'
    return qc, [('wer', f'{name} {match.error_rate:.3f} > {wer_threshold}')]
  return qc, []


def consistency_qc(judged: dict | None) -> tuple[dict, list[tuple[str, str]]]:
  """The same for check (b); codes 'no_description', 'inconsistent'."""
  if judged is None:
    return {}, [('no_description', 'no independent description')]
  qc = {'consistent': judged['consistent'], 'consistency_reason': judged['reason']}
  if not judged['consistent']:
    reason = judged['reason']
    return qc, [('inconsistent', f'inconsistent with the independent description: {reason}')]
  return qc, []


def checked_records(args, transcripts: dict):
  """(id, record, speech qc, speech reasons) per annotation of this shard."""
  for rid, r in _common.sharded(files.records_with_ids(args.annotations), args):
    r = {**r, 'annotation': annotation_lib.annotation_of(r, args.annotations, rid)}
    if r.get('lang') not in ('en', 'zh'):
      raise ValueError(f"{args.annotations}: clip {rid!r}: 'lang' must be 'en' or 'zh', got "
                       f"{r.get('lang')!r}")
    qc, reasons = speech_qc(r, transcripts.get(rid, r.get('transcript')), args.wer_threshold)
    yield rid, r, qc, reasons


def parse_args(argv=None):
  parser = _common.tool_parser(__doc__)
  parser.add_argument('--annotations', required=True,
                      help='annotate.py output (id, lang, annotation)')
  parser.add_argument('--out', required=True, help='output folder')
  parser.add_argument('--transcripts',
                      help='JSONL {"id", "transcript"} from an ASR model (saber-transcribe)')
  parser.add_argument('--descriptions', help='JSONL {"id", "description"}; enables the LLM check')
  parser.add_argument('--wer-threshold', type=_common.at_least(0.0, float),
                      default=DEFAULT_WER_THRESHOLD,
                      help='drop when WER (en) / CER (zh) exceeds this (default %(default)s)')
  _common.add_judge_args(parser, model_required=False)   # the judge: --descriptions only
  args = parser.parse_args(_common.dashed(argv, parser))
  if not args.transcripts:
    missing = first_without_transcript(args.annotations)
    if missing is not None:
      parser.error(f'{args.annotations}: clip {missing!r} has no "transcript" field and no '
                   '--transcripts file was given; make one with `saber-transcribe --manifest '
                   'clips.jsonl --model openai/whisper-large-v3 --out asr/` and pass '
                   '--transcripts asr/transcripts.jsonl')
  return args


def first_without_transcript(path: str) -> str | None:
  """The id of the first record of `path` without a `transcript` field, else None."""
  for n, r in enumerate(files.read_jsonl(path), 1):
    if 'transcript' not in r:
      return files.record_id(r, f'{path} record {n}')
  return None


def most_frequent(reasons: dict) -> str:
  return max(reasons.items(), key=lambda kv: kv[1])[0] if reasons else 'none'


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.descriptions and not args.model:
    raise SystemExit('--descriptions needs a judge: pass --model (and --base-url)')
  transcripts = {}
  if args.transcripts:
    transcripts = {k: r['transcript'] for k, r in
                   files.load_by_id(args.transcripts, required=('transcript',)).items()}
  descriptions = {}
  judged_path = os.path.join(args.out, 'consistency.jsonl')
  run = None
  if args.descriptions:
    descriptions = {k: r['description'] for k, r in
                    files.load_by_id(args.descriptions, required=('description',)).items()}
    judge = _common.judge_from_args(args)

    def items():
      # Only clips that passed (a) cost a judge call.
      for rid, r, _, speech_reasons in checked_records(args, transcripts):
        if rid in descriptions and not speech_reasons:
          yield {'id': rid, 'annotation': r['annotation']}

    def process(item):
      reply = judge.ask(consistency_messages(item['annotation'], descriptions[item['id']]),
                        Consistency, name='consistency')
      return {**reply.value, 'raw': reply.raw}

    run = _common.run_judged(args, items(), process, input_path=args.annotations,
                             out_path=judged_path, desc='consistency', also=('descriptions',))
  judged = {}
  if args.descriptions and os.path.exists(judged_path):
    judged = {files.record_id(r, judged_path): r for r in files.read_jsonl(judged_path)}

  counts = {'kept': 0, 'dropped': 0, 'pending': 0, 'reasons': {}}
  with files.AtomicJsonlWriter(os.path.join(args.out, 'kept.jsonl')) as kept, \
       files.AtomicJsonlWriter(os.path.join(args.out, 'dropped.jsonl')) as dropped:
    for rid, r, qc, reasons in checked_records(args, transcripts):
      if args.descriptions and not reasons:
        if rid in descriptions and rid not in judged:
          counts['pending'] += 1  # the judge failed (or the run stopped); rerun to retry
          continue
        more_qc, more_reasons = consistency_qc(judged.get(rid))
        qc, reasons = {**qc, **more_qc}, reasons + more_reasons
      if reasons:
        dropped.write({**r, 'qc': qc, 'drop_reasons': [m for _, m in reasons]})
        for code, _ in reasons:
          counts['reasons'][code] = counts['reasons'].get(code, 0) + 1
      else:
        kept.write({**r, 'qc': qc})
  counts['kept'], counts['dropped'] = kept.count, dropped.count
  counts['wer_threshold'] = args.wer_threshold
  if run is not None:
    counts['judge'] = {'done': run.done, 'skipped': run.skipped, 'failed': run.failed}
  files.write_json(os.path.join(args.out, 'summary.json'), counts)
  print(f"kept={counts['kept']} dropped={counts['dropped']} "
        f"pending={counts['pending']}", flush=True)
  if not counts['kept']:
    raise _common.produced_nothing(
        'saber-quality kept no clip', f"dropped {counts['dropped']}, pending {counts['pending']}",
        most_frequent(counts['reasons']), f'{args.out}/dropped.jsonl')
  return counts


if __name__ == '__main__':
  main()
