"""Build CA-DPO preference pairs, from judged samples or by perturbing gold answers.

--strategy judge (default): input --samples JSONL, one line per prompt with its k
sampled responses (mode=generate writes them grouped, so k stays together):
  {"id": "c1", "responses": ["...", ...], "finished": [true, false, ...]?,
   "prompt": "..."?, "subset": "..."?}
`finished[i]` false marks response i as cut at max_new_tokens (no end-of-sequence): it
is scored and may be rejected but never chosen (a pair whose winner was cut is dropped).
Without "finished" every response counts as complete.
and --annotations JSONL {"id", "annotation"} (the gold evidence of each clip). The judge
scores every response 0-10 for logical consistency (the reasoning follows from the
evidence it states) and evidence alignment (its evidence agrees with the gold
annotation); a response's score is the mean of the two. Responses are ranked (stable,
index tie-break), the top-2 winners are paired with the bottom-2 losers
(--pairing product: 2x2 = 4 pairs, zipped: best-worst and second-second-worst = 2),
and a prompt whose best and worst tie, or differ by less than --min-margin, gives no
pairs (saber_jax.metrics.select_pairs). Scores are in OUT/scores.jsonl (one line per
response, resumable; failures in OUT/errors.jsonl); a prompt with an unscored response
gives no pairs until a rerun scores it. Before any judge call each
response is made what a preference record can hold: leading whitespace is removed (a
decoded sample often starts with the space of its first token; the record tokenizes the
answer right after 'assistant\\n') and an empty response is left out (never judged nor
paired); summary.json counts both ("trimmed", "empty").

--strategy perturb: no judge. From --annotations ({"id", "lang", "annotation"}), the
gold answer rendered as its SED target text (saber_jax.data.sed: visual evidence,
acoustic evidence, reasoning) is the chosen response and a perturbed copy the rejected
one, one pair per --perturbations kind:
  swap        one evidence field (video, face, body, speech or voice) replaced by
              another clip's (same language when possible): a hallucinated cue;
  drop        the visual or the acoustic evidence emptied: a missing modality;
  contradict  the sentiment reasoning's polarity words flipped (positive <-> negative,
              consistent <-> inconsistent, ...), or another clip's reasoning when no
              polarity word is found.
Deterministic for a given --seed (each record's choices are seeded by seed and id).

Output OUT/pairs.jsonl, one preference pair per line:
  {"id", "chosen", "rejected", "chosen_score", "rejected_score", "margin", "subset"?, ...}
(judge: plus chosen_index / rejected_index and "prompt" when given; perturb: scores
and margin are null, plus "perturbation" and "donor_id"), and OUT/summary.json.
Making no pair at all exits 1 naming the counts and the most frequent reason.

  saber-make-pairs --samples samples.jsonl --annotations kept.jsonl --out pairs/ \\
      --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-72B-Instruct
  saber-make-pairs --strategy perturb --annotations kept.jsonl --out pairs/ --seed 0
"""

import copy
import json
import os
import random
import re

from saber_jax import files, metrics
from saber_jax.cli import _common
from saber_jax.data import annotation as annotation_lib
from saber_jax.data import sed
from saber_jax.judge import replies, runs

class ResponseScore(replies.Reply):
  logical_consistency: replies.int_in(0, 10)
  evidence_alignment: replies.int_in(0, 10)

SCORE_PROMPT = """\
You are grading one response of a model that analyses the emotion expressed in a video clip. The \
model had to state the visual evidence, then the acoustic evidence, then reason from that evidence \
to the emotion.
Score the response on two criteria, each an integer from 0 to 10:
- "logical_consistency": does the reasoning follow from the evidence the response itself states, \
without contradictions or unsupported jumps?
- "evidence_alignment": does the visual and acoustic evidence it states agree with the reference \
evidence? Penalise cues that contradict the reference or are absent from it (hallucinated), and \
important cues it misses.
Reply with one JSON object: {{"logical_consistency": <0-10>, "evidence_alignment": <0-10>}}.
{task}
Reference evidence (verified annotation of the clip):
{reference}

Response to grade:
{response}"""


def score_messages(annotation: dict, response: str, prompt: str | None = None) -> list[dict]:
  task = f'\nThe task the model was given:\n{prompt}\n' if prompt else ''
  return [{'role': 'user', 'content': SCORE_PROMPT.format(
      task=task, reference=sed.evidence_json(annotation), response=response)}]


def response_score(scores: dict) -> float:
  """One number per response: the mean of the two judged criteria."""
  return (scores['logical_consistency'] + scores['evidence_alignment']) / 2


def responses_of(record: dict, where: str) -> list[str]:
  responses = record.get('responses')
  if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
    raise ValueError(f"{where}: 'responses' must be a list of strings")
  return responses


def normalized(response: str) -> str:
  """A response as a preference record takes it: no leading whitespace."""
  return response.lstrip()


def can_pair(responses: list[str]) -> bool:
  """Whether a prompt's responses can give a pair: two different non-empty ones."""
  return len({normalized(t) for t in responses} - {''}) >= 2


def finished_of(record: dict, where: str) -> list[bool]:
  """Which responses ended on their own (all of them when the line does not say)."""
  finished = record.get('finished', [True] * len(record['responses']))
  if (not isinstance(finished, list) or len(finished) != len(record['responses'])
      or not all(isinstance(f, bool) for f in finished)):
    raise ValueError(f"{where}: 'finished' must be a list of booleans, one per response")
  return finished


# ----------------------------------------------------------------------------- perturbations

EVIDENCE_FIELDS = (('video_desc',), ('facial_exp_desc',), ('body_lang_desc',),
                   ('audio_desc', 'speech_content'), ('audio_desc', 'acoustic_feat'))
MODALITY_FIELDS = {
    'visual': (('video_desc',), ('facial_exp_desc',), ('body_lang_desc',)),
    'acoustic': (('audio_desc', 'speech_content'), ('audio_desc', 'acoustic_feat')),
}
PERTURBATIONS = ('swap', 'drop', 'contradict')

_EN_PAIRS = [('positive', 'negative'), ('happy', 'sad'), ('happiness', 'sadness'),
             ('joyful', 'sorrowful'), ('cheerful', 'gloomy'), ('calm', 'agitated'),
             ('relaxed', 'tense'), ('pleased', 'upset'), ('friendly', 'hostile'),
             ('amused', 'annoyed'), ('confident', 'insecure'), ('excited', 'bored'),
             ('consistent', 'inconsistent'), ('consistency', 'inconsistency'),
             ('aligns', 'conflicts'), ('align', 'conflict'), ('agrees', 'clashes'),
             ('matches', 'contradicts'), ('congruent', 'incongruent')]
_EN_ONE_WAY = {'neutral': 'hostile'}
_ZH_PAIRS = [('积极', '消极'), ('正面', '负面'), ('开心', '难过'), ('高兴', '悲伤'),
             ('快乐', '痛苦'), ('愉快', '沮丧'), ('平静', '激动'), ('放松', '紧张'),
             ('友好', '敌对'), ('满意', '不满'), ('不满意', '满意'), ('一致', '矛盾'),
             ('不一致', '一致'), ('吻合', '冲突')]
_ZH_ONE_WAY = {'中性': '负面'}


def _flip_table(pairs, one_way) -> dict[str, str]:
  table = dict(one_way)
  for a, b in pairs:
    table.setdefault(a, b)
    table.setdefault(b, a)
  return table


_EN_FLIPS = _flip_table(_EN_PAIRS, _EN_ONE_WAY)
_ZH_FLIPS = _flip_table(_ZH_PAIRS, _ZH_ONE_WAY)
# Longest first, so '不一致' is replaced as a whole before '一致' could match inside it.
_EN_RE = re.compile(
    r'\b(' + '|'.join(sorted(map(re.escape, _EN_FLIPS), key=len, reverse=True)) + r')\b', re.I)
_ZH_RE = re.compile('|'.join(sorted(map(re.escape, _ZH_FLIPS), key=len, reverse=True)))


def flip_polarity(text: str) -> tuple[str, int]:
  """Swaps polarity words (English and Chinese) in one pass; returns (text, count)."""
  def en(m):
    word = m.group(0)
    out = _EN_FLIPS[word.lower()]
    return out.capitalize() if word[0].isupper() else out
  text, n_en = _EN_RE.subn(en, text)
  text, n_zh = _ZH_RE.subn(lambda m: _ZH_FLIPS[m.group(0)], text)
  return text, n_en + n_zh


def _get(annotation: dict, path: tuple[str, ...]) -> str:
  return annotation[path[0]] if len(path) == 1 else annotation[path[0]][path[1]]


def _set(annotation: dict, path: tuple[str, ...], value: str) -> None:
  if len(path) == 1:
    annotation[path[0]] = value
  else:
    annotation[path[0]][path[1]] = value


def perturb(annotation: dict, kind: str, donor: dict | None,
            rng: random.Random) -> tuple[dict, str] | None:
  """(perturbed copy, what changed), or None when `kind` cannot change this record
  (e.g. swap with no donor whose fields differ). Pure given `rng`."""
  out = copy.deepcopy(annotation)
  if kind == 'swap':
    if donor is None:
      return None
    fields = [f for f in EVIDENCE_FIELDS
              if _get(donor, f).strip() and _get(donor, f) != _get(annotation, f)]
    if not fields:
      return None
    field = rng.choice(fields)
    _set(out, field, _get(donor, field))
    return out, 'swap:' + '.'.join(field)
  if kind == 'drop':
    modalities = [m for m, fs in MODALITY_FIELDS.items() if any(_get(annotation, f) for f in fs)]
    if not modalities:
      return None
    modality = rng.choice(modalities)
    for f in MODALITY_FIELDS[modality]:
      _set(out, f, '')
    return out, 'drop:' + modality
  if kind == 'contradict':
    flipped, n = flip_polarity(annotation['sentiment_analysis'])
    if n:
      out['sentiment_analysis'] = flipped
      return out, 'contradict:flip'
    if donor is not None and donor['sentiment_analysis'] != annotation['sentiment_analysis']:
      out['sentiment_analysis'] = donor['sentiment_analysis']
      return out, 'contradict:donor'
    return None
  raise ValueError(f'unknown perturbation {kind!r} (expected one of {PERTURBATIONS})')


def render_answer(annotation: dict, lang: str) -> str:
  """The response text of an annotation: its SED target (saber_jax.data.sed), the form
  SFT taught the model to answer in. An emptied field gets no line."""
  fields = {name: _get(annotation, path) for name, path in annotation_lib.FIELD_PATHS.items()}
  return sed.response_text(sed.sed_target(annotation_lib.Annotation(**fields), lang))


def _index_annotations(path: str) -> tuple[list[tuple[str, str, int]], dict[str, list[int]]]:
  """[(id, lang, byte offset)] of every line, and line numbers per language, so donors
  are read back by seeking instead of holding every annotation in memory."""
  entries, by_lang, first = [], {}, {}
  with open(path, 'rb') as f:
    offset = 0
    for line in f:
      if line.strip():
        try:
          r = json.loads(line)
        except ValueError as e:
          raise ValueError(f'{path}: line {len(entries) + 1}: not valid JSON ({e})') from None
        rid = files.record_id(r, f'{path} record {len(entries) + 1}')
        if rid in first:    # one clip's pairs twice over, or another clip's under its id
          raise SystemExit(f'error: {path}: duplicate id {rid!r} (records {first[rid]} and '
                           f'{len(entries) + 1}); no pair was made')
        first[rid] = len(entries) + 1
        lang = str(r.get('lang', ''))
        by_lang.setdefault(lang, []).append(len(entries))
        entries.append((rid, lang, offset))
      offset += len(line)
  return entries, by_lang


def perturb_pairs(args) -> dict:
  kinds = [k.strip() for k in args.perturbations.split(',') if k.strip()]
  for k in kinds:
    if k not in PERTURBATIONS:
      raise SystemExit(f'--perturbations: unknown kind {k!r} (expected {",".join(PERTURBATIONS)})')
  entries, by_lang = _index_annotations(args.annotations)
  counts = {'records': 0, 'pairs': 0, 'skipped': {k: 0 for k in kinds}}
  with open(args.annotations, 'rb') as reader, \
       files.AtomicJsonlWriter(os.path.join(args.out, 'pairs.jsonl')) as writer:

    def load(index: int) -> tuple[str, dict]:
      rid, _, offset = entries[index]
      reader.seek(offset)
      record = json.loads(reader.readline())
      return rid, record

    for index in range(len(entries)):
      if index % args.num_shards != args.shard_index:
        continue
      rid, record = load(index)
      annotation = annotation_lib.annotation_of(record, args.annotations, rid)
      lang = record.get('lang')
      if lang not in ('en', 'zh'):
        raise ValueError(f"{args.annotations}: clip {rid!r}: 'lang' must be 'en' or 'zh', got "
                         f"{lang!r}")
      rng = random.Random(f'{args.seed}:{rid}')
      pool = by_lang.get(entries[index][1], [])
      if len(pool) < 2:
        pool = range(len(entries))
      donor_index = None
      if len(pool) >= 2:
        donor_index = index
        while donor_index == index:
          donor_index = pool[rng.randrange(len(pool))]
      donor_id, donor = None, None
      if donor_index is not None:
        donor_id, donor_record = load(donor_index)
        donor = annotation_lib.annotation_of(donor_record, args.annotations, donor_id)
      counts['records'] += 1
      for kind in kinds:
        result = perturb(annotation, kind, donor, rng)
        if result is None:
          counts['skipped'][kind] += 1
          continue
        rejected, change = result
        pair = {'id': rid, 'chosen': render_answer(annotation, lang),
                'rejected': render_answer(rejected, lang),
                'chosen_score': None, 'rejected_score': None, 'margin': None,
                'perturbation': change,
                'donor_id': donor_id if kind == 'swap' or change == 'contradict:donor' else None}
        if 'subset' in record:
          pair['subset'] = record['subset']
        writer.write(pair)
  counts['pairs'] = writer.count
  return counts


# ----------------------------------------------------------------------------- judge mode


def judge_pairs(args) -> dict:
  if not args.samples:
    raise SystemExit('--strategy judge needs --samples')
  ids, pairable, most = set(), 0, 0
  for n, r in enumerate(files.read_jsonl(args.samples)):
    where = f'{args.samples} record {n + 1}'
    ids.add(files.record_id(r, where))
    responses_of(r, where)
    finished_of(r, where)
    pairable += can_pair(r['responses'])
    most = max(most, len(r['responses']))
  if not pairable:   # k = 1 samples, or all equal: no pair can come out; judge nothing
    raise SystemExit(
        f'error: saber-make-pairs cannot make any pair from {args.samples}: none of its '
        f'{n + 1 if ids else 0} prompts has two different non-empty responses (at most '
        f'{most} per prompt); sample k >= 2 responses per prompt (generate.num_samples); '
        'nothing was sent to the judge')
  references = {rid: annotation_lib.annotation_of(r, args.annotations, rid)
                for rid, r in files.load_by_id(args.annotations, ids=ids).items()}
  judge = _common.judge_from_args(args)
  scores_path = os.path.join(args.out, 'scores.jsonl')

  def items():
    for r in _common.sharded(files.read_jsonl(args.samples), args):
      rid = str(r['id'])
      if not can_pair(r['responses']):    # no pair can come out of it: not worth a request
        continue
      for i, response in enumerate(r['responses']):
        if normalized(response):
          yield {'id': f'{rid}#{i}', 'record_id': rid, 'index': i,
                 'response': normalized(response), 'prompt': r.get('prompt')}

  def process(item):
    annotation = references.get(item['record_id'])
    if annotation is None:
      raise runs.ItemError('bad_input',
                           f"{args.annotations}: no annotation for id {item['record_id']!r}")
    reply = judge.ask(score_messages(annotation, item['response'], item['prompt']), ResponseScore,
                      name='response_score')
    return {'record_id': item['record_id'], 'index': item['index'], **reply.value,
            'score': response_score(reply.value), 'raw': reply.raw}

  run = _common.run_judged(args, items(), process, input_path=args.samples, out_path=scores_path,
                           desc='score', also=('annotations',))
  scored: dict[str, dict[int, float]] = {}
  if os.path.exists(scores_path):
    for s in files.read_jsonl(scores_path):
      scored.setdefault(str(s['record_id']), {})[int(s['index'])] = float(s['score'])
  counts = {'prompts': 0, 'incomplete': 0, 'no_pairs': 0, 'pairs': 0, 'truncated_chosen': 0,
            'no_pairs_cut': 0, 'single_response': 0, 'trimmed': 0, 'empty': 0,
            'margin_mean': None,
            'judge': {'done': run.done, 'skipped': run.skipped, 'failed': run.failed}}
  margins = []
  with files.AtomicJsonlWriter(os.path.join(args.out, 'pairs.jsonl')) as writer:
    for r in _common.sharded(files.read_jsonl(args.samples), args):
      rid, responses = str(r['id']), [normalized(t) for t in r['responses']]
      counts['prompts'] += 1
      counts['trimmed'] += sum(t != normalized(t) for t in r['responses'] if normalized(t))
      usable = [i for i, t in enumerate(responses) if t]   # index among the k samples
      counts['empty'] += len(responses) - len(usable)
      got = scored.get(rid, {})
      if not can_pair(r['responses']):
        counts['no_pairs'] += 1
        counts['single_response'] += 1
        continue
      if any(i not in got for i in usable):
        counts['incomplete'] += 1
        continue
      scores = [got[i] for i in usable]
      pairs = metrics.select_pairs(scores, pairing=args.pairing, min_margin=args.min_margin)
      # Identical texts teach nothing.
      pairs = [p for p in pairs if responses[usable[p.chosen]] != responses[usable[p.rejected]]]
      finished = r.get('finished', [True] * len(responses))
      counts['truncated_chosen'] += sum(not finished[usable[p.chosen]] for p in pairs)
      candidates = pairs
      pairs = [p for p in pairs if finished[usable[p.chosen]]]   # a cut response is never chosen
      if not pairs:
        counts['no_pairs'] += 1
        counts['no_pairs_cut'] += bool(candidates)
      for p in pairs:
        chosen, rejected = usable[p.chosen], usable[p.rejected]
        out = {'id': rid, 'chosen': responses[chosen], 'rejected': responses[rejected],
               'chosen_score': scores[p.chosen], 'rejected_score': scores[p.rejected],
               'margin': p.margin, 'chosen_index': chosen, 'rejected_index': rejected}
        for key in ('subset', 'prompt'):
          if key in r:
            out[key] = r[key]
        writer.write(out)
        margins.append(p.margin)
  counts['pairs'] = writer.count
  counts['margin_mean'] = sum(margins) / len(margins) if margins else None
  return counts


def parse_args(argv=None):
  parser = _common.tool_parser(__doc__)
  parser.add_argument('--strategy', choices=('judge', 'perturb'), default='judge')
  parser.add_argument('--samples',
                      help='judge: JSONL {"id", "responses": [...], "prompt"?, "subset"?}')
  parser.add_argument('--annotations', required=True,
                      help='JSONL {"id", "annotation"}: the gold evidence')
  parser.add_argument('--out', required=True, help='output folder')
  parser.add_argument('--pairing', choices=('product', 'zipped'), default='product',
                      help='top-2 x bottom-2 (4 pairs) or zipped (2 pairs)')
  parser.add_argument('--min-margin', type=_common.at_least(0.0, float), default=0.0,
                      help='drop pairs (and prompts) whose score margin is below this')
  parser.add_argument('--perturbations', default=','.join(PERTURBATIONS),
                      help='perturb: kinds to build, comma-separated')
  parser.add_argument('--seed', type=int, default=0, help='perturb: seed')
  _common.add_judge_args(parser, model_required=False)   # the judge: --strategy judge only
  return parser.parse_args(_common.dashed(argv, parser))


def why_no_pairs(counts: dict) -> str:
  """The most frequent reason a run made no pair, from its counts."""
  if counts['strategy'] == 'perturb':
    reasons = {f'{kind} could not change the record': n for kind, n in counts['skipped'].items()}
    reasons['no annotation records'] = 0 if counts['records'] else 1
  else:
    reasons = {'prompts waiting for a failed judge call (rerun to retry)': counts['incomplete'],
               'prompts whose best and worst tie or differ by less than --min-margin':
                   counts['no_pairs'] - counts['no_pairs_cut'] - counts['single_response'],
               'prompts with fewer than two different non-empty responses':
                   counts['single_response'],
               'prompts whose better responses were all cut at max_new_tokens (raise '
               'generate.max_new_tokens)': counts['no_pairs_cut'],
               'no samples': 0 if counts['prompts'] else 1}
  return max(reasons.items(), key=lambda kv: kv[1])[0]


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.strategy == 'judge':
    if not args.model:
      raise SystemExit('--strategy judge needs --model (and --base-url)')
    counts = judge_pairs(args)
  else:
    counts = perturb_pairs(args)
  counts['strategy'] = args.strategy
  files.write_json(os.path.join(args.out, 'summary.json'), counts)
  print(f"pairs={counts['pairs']}", flush=True)
  if not counts['pairs']:
    shown = {k: v for k, v in counts.items() if k not in ('judge', 'margin_mean', 'strategy')}
    raise SystemExit(f'error: saber-make-pairs made no pair ({json.dumps(shown)}); most frequent '
                     f'reason: {why_no_pairs(counts)}')
  return counts


if __name__ == '__main__':
  main()
