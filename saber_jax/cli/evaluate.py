"""Evaluate model predictions: SABER-Test (judged), EMER (judged), EmoBench-M (parsed).

  saber-test  A judge scores each prediction against its reference annotation 0-3 on
              VD, SCD, AFD, FE, BL, CR (video description, speech content description,
              acoustic feature description, facial expression, body language,
              consistency reasoning); the summary gives the mean per dimension for the
              consistent and inconsistent subsets and the drop between them (Table IV).
              --references: {"id", "subset", "annotation"} (build_test_set.py's
              test_set.jsonl).
  emer        EMER Clue Overlap and Label Overlap (0-10): the judge scores the overlap
              of the emotional states described by reference and prediction (clue),
              then summarises emotion words from each text and scores the overlap of
              the two word sets (label), following AffectGPT's evaluation.py steps.
              --references: {"id", "reference"}. Raw judge texts are kept. Scores from
              a judge other than the original gpt-3.5-turbo-16k-0613 (retired) are not
              directly comparable with published numbers.
  emobench    EmoBench-M accuracy, no judge: `{'emotion': ...}` answers parsed
              (ast.literal_eval / regex, else a unique label in the text), unparseable
              answers count as wrong and their rate is reported; accuracy per task,
              the mean over tasks, and per category (FER / CEU / SCEA) where known.

--predictions: {"id", "response"} (+ "task", "label" for emobench; "category"
optional). Each writes OUT/summary.json, OUT/report.md and PNG bar charts; judged
subcommands keep per-item results in OUT/judgments.jsonl (resumable; failures in
OUT/errors.jsonl, retried on the next run).

  saber-evaluate saber-test --predictions preds.jsonl \\
      --references saber_test/test_set.jsonl --out eval/saber_test --model Qwen/Qwen2.5-72B-Instruct
  saber-evaluate emobench --predictions emobench_preds.jsonl --out eval/emobench
"""

import json
import os
from typing import Mapping

import pydantic

from saber_jax import files, metrics
from saber_jax.cli import _common
from saber_jax.data import annotation as annotation_lib
from saber_jax.data import sed
from saber_jax.judge import replies, runs

# ----------------------------------------------------------------------------- SABER-Test

DIM_NAMES = {
    'VD': 'video description (scene, people, actions) -- reference "video_desc"',
    'SCD': 'speech content description (the words said and the <sound events>) -- reference '
           '"audio_desc.speech_content"',
    'AFD': 'acoustic feature description (voice: gender, pitch, loudness, rate, tone) -- reference '
           '"audio_desc.acoustic_feat"',
    'FE': 'facial expression -- reference "facial_exp_desc"',
    'BL': 'body language (posture, gestures, movement) -- reference "body_lang_desc"',
    'CR': 'consistency reasoning: does the prediction correctly tell whether the audio and visual '
          'cues agree or conflict, and reach the emotional conclusion of the reference -- '
          'reference "sentiment_analysis"',
}
SaberScores = pydantic.create_model(
    'SaberScores', __base__=replies.Reply,
    **{d: (replies.int_in(0, 3), ...) for d in metrics.SABER_TEST_DIMS})

SABER_PROMPT = """\
You are evaluating a model's multimodal emotion analysis of a video clip against a reference \
annotation of the same clip.
Score how well the prediction agrees with the reference on each dimension, as an integer from \
0 to 3:
{dims}
Scale: 0 = missing, or contradicts the reference; 1 = mostly wrong or very incomplete; 2 = largely \
correct with minor errors or omissions; 3 = fully consistent with the reference.
Judge content, not wording or format. Reply with one JSON object with exactly the keys {keys}.

Reference annotation:
{reference}

Prediction:
{prediction}"""


def saber_messages(annotation: dict, prediction: str) -> list[dict]:
  dims = '\n'.join(f'- {d}: {DIM_NAMES[d]}' for d in metrics.SABER_TEST_DIMS)
  return [{'role': 'user', 'content': SABER_PROMPT.format(
      dims=dims, keys=', '.join(metrics.SABER_TEST_DIMS),
      reference=sed.evidence_json(annotation), prediction=prediction)}]


# ----------------------------------------------------------------------------- EMER
# Own wording of the three AffectGPT judge steps (clue scoring, emotion summarising,
# label scoring); Chinese by default, as EMER's reasons are scored in Chinese.

EMER_PROMPTS = {
    'zh': {
        'clue': '请为「预测描述」打分，分数为0到10。步骤：1. 概括「真实描述」中人物的情绪状态；2. '
                '概括「预测描述」中人物的情绪状态；3. 比较两者的重合程度，重合越多分数越高。只输出'
                'JSON：{{"clue_overlap": 分数}}。\n真实描述：{reference}\n预测描述：{prediction}',
        'emotions': '根据下面的描述，推断人物最可能的情绪状态，只给出情绪词。例如：描述"她嘴上说没'
                    '事，但声音发抖、眼眶泛红"，输出{{"emotions": ["难过"]}}。只输出JSON：'
                    '{{"emotions": [情绪词, ...]}}。\n描述：{text}',
        'label': '下面是两组情绪词。请按0到10分评估它们的重合程度，重合越多分数越高。只输出JSON：'
                 '{{"label_overlap": 分数}}。\n真实情绪：{reference}\n预测情绪：{prediction}',
    },
    'en': {
        'clue': 'Score the "predicted description" from 0 to 10. Steps: 1. summarise the emotional '
                'state of the person in the "true description"; 2. do the same for the "predicted '
                'description"; 3. compare the two: the more they overlap, the higher the score. '
                'Output only JSON: {{"clue_overlap": score}}.\nTrue description: '
                '{reference}\nPredicted description: {prediction}',
        'emotions': 'From the description below, infer the most likely emotional state of the '
                    'person and give only emotion words. For example, for "she says she is fine, '
                    'but her voice trembles and her eyes are red", output {{"emotions": ["sad"]}}. '
                    'Output only JSON: {{"emotions": [word, ...]}}.\nDescription: {text}',
        'label': 'Below are two sets of emotion words. Score their overlap from 0 to 10: the more '
                 'they overlap, the higher the score. Output only JSON: {{"label_overlap": '
                 'score}}.\nTrue emotions: {reference}\nPredicted emotions: {prediction}',
    },
}
class ClueOverlap(replies.Reply):
  clue_overlap: replies.number_in(0, 10)


class Emotions(replies.Reply):
  emotions: list[str]


class LabelOverlap(replies.Reply):
  label_overlap: replies.number_in(0, 10)


def _user(text: str) -> list[dict]:
  return [{'role': 'user', 'content': text}]


def emer_item(judge, reference: str, prediction: str, lang: str) -> dict:
  """Clue overlap, then label overlap via summarised emotion words (4 judge calls)."""
  p = EMER_PROMPTS[lang]
  clue = judge.ask(_user(p['clue'].format(reference=reference, prediction=prediction)),
                   ClueOverlap, name='clue_overlap')
  ref_em = judge.ask(_user(p['emotions'].format(text=reference)), Emotions, name='emotions')
  pred_em = judge.ask(_user(p['emotions'].format(text=prediction)), Emotions, name='emotions')
  sep = '、' if lang == 'zh' else ', '
  label = judge.ask(_user(p['label'].format(reference=sep.join(ref_em.value['emotions']),
                                            prediction=sep.join(pred_em.value['emotions']))),
                    LabelOverlap, name='label_overlap')
  return {'clue_overlap': clue.value['clue_overlap'], 'label_overlap': label.value['label_overlap'],
          'reference_emotions': ref_em.value['emotions'],
          'predicted_emotions': pred_em.value['emotions'],
          'raw': {'clue': clue.raw, 'reference_emotions': ref_em.raw,
                  'predicted_emotions': pred_em.raw, 'label': label.raw}}


# ----------------------------------------------------------------------------- EmoBench-M

# Label sets from the comments of EmoBench-M_eval.py (keyed by metrics.task_key); the
# gold labels seen for a task and --label-sets are added to these.
EMOBENCH_LABELS = {
    'fgmsa': ['weak negative', 'strong negative', 'neutral', 'weak positive', 'strong positive'],
    'chsimsv2s': ['neutral', 'negative', 'positive'], 'mosi': ['neutral', 'negative', 'positive'],
    'sims': ['neutral', 'negative', 'positive'], 'mosei': ['neutral', 'negative', 'positive'],
    'funny': ['true', 'false'], 'mustard': ['true', 'false'],
    'meld': ['neutral', 'surprise', 'fear', 'sadness', 'joy', 'disgust', 'anger'],
    'mer2023': ['happy', 'sad', 'neutral', 'angry', 'worried', 'surprise'],
    'ravdsssong': ['neutral', 'calm', 'happy', 'sad', 'angry', 'fearful'],
    'ravdssspeech': ['neutral', 'calm', 'happy', 'sad', 'angry', 'fearful', 'surprised', 'disgust'],
}


def emobench(args) -> dict:
  rows = []
  for rid, r in files.records_with_ids(args.predictions):
    for field in ('response', 'task', 'label'):
      if not isinstance(r.get(field), str):
        raise ValueError(f'{args.predictions}: record {rid!r}: {field!r} must be a string')
    rows.append(r)
  extra = {}
  if args.label_sets:
    with open(args.label_sets, encoding='utf-8') as f:
      extra = json.load(f)
  labels: dict[str, list[str]] = {}
  for r in rows:
    task = r['task']
    if task not in labels:
      labels[task] = (list(EMOBENCH_LABELS.get(metrics.task_key(task), []))
                      + list(extra.get(task, [])))
    gold = metrics.normalize_label(r['label'])
    if gold not in labels[task]:
      labels[task].append(gold)
  categories = {r['task']: r['category'] for r in rows if r.get('category')}
  parsed_rows = []
  with files.AtomicJsonlWriter(os.path.join(args.out, 'parsed.jsonl')) as writer:
    for r in rows:
      pred = metrics.parse_emotion_answer(r['response'], labels[r['task']])
      parsed_rows.append((r['task'], r['label'], pred))
      writer.write({'id': str(r['id']), 'task': r['task'], 'label': r['label'], 'parsed': pred,
                    'correct': pred is not None and pred == metrics.normalize_label(r['label'])})
  summary = metrics.emobench_summary(parsed_rows, categories)
  summary['label_sets'] = labels
  table = [[t, str(summary['n'][t]), fmt(100 * acc, 1), str(summary['invalid'][t])]
           for t, acc in summary['tasks'].items()]
  report = ['# EmoBench-M\n', f"Predictions: `{args.predictions}`\n",
            markdown_table(['task', 'n', 'accuracy %', 'unparseable'], table)]
  if summary['categories']:
    report.append('\n' + markdown_table(
        ['category', 'mean accuracy %'],
        [[c, fmt(100 * a, 1)] for c, a in summary['categories'].items()]))
  average = fmt(100 * summary['average'], 1) if summary['average'] is not None else '-'
  report.append(f"\nAverage over tasks: {average}%; "
                f"unparseable answers: {fmt(100 * (summary['invalid_rate'] or 0), 1)}%.\n")
  files.write_text(os.path.join(args.out, 'report.md'), ''.join(report))
  bar_chart(os.path.join(args.out, 'emobench_tasks.png'), 'EmoBench-M accuracy per task',
                    {'accuracy': summary['tasks']}, 'accuracy', (0, 1))
  if summary['categories']:
    bar_chart(os.path.join(args.out, 'emobench_categories.png'), 'EmoBench-M accuracy per category',
                      {'accuracy': summary['categories']}, 'accuracy', (0, 1))
  return summary


# ----------------------------------------------------------------------------- judged runs


def _run_judged(args, references: dict, process, desc: str) -> runs.RunSummary:
  def items():
    for rid, r in _common.sharded(files.records_with_ids(args.predictions), args):
      if not isinstance(r.get('response'), str):
        raise ValueError(f"{args.predictions}: record {rid!r}: 'response' must be a string")
      yield {'id': rid, 'response': r['response']}

  def guarded(item):
    if item['id'] not in references:
      raise runs.ItemError('bad_input', f"{args.references}: no reference for id {item['id']!r}")
    return process(item, references[item['id']])

  return _common.run_judged(args, items(), guarded, input_path=args.predictions,
                            out_path=os.path.join(args.out, 'judgments.jsonl'),
                            total=_common.shard_total(args.predictions, args), desc=desc,
                            also=('references', 'command') + (('lang',) if 'lang' in args else ()))


def _judgments(args) -> list[dict]:
  path = os.path.join(args.out, 'judgments.jsonl')
  return list(files.read_jsonl(path)) if os.path.exists(path) else []


def _run_counts(run: runs.RunSummary) -> dict:
  return {'done': run.done, 'skipped': run.skipped, 'failed': run.failed}


def saber_test(args) -> dict:
  references = {}
  for rid, r in files.load_by_id(args.references, required=('subset', 'annotation')).items():
    if r['subset'] not in metrics.SUBSETS:
      raise ValueError(f"{args.references}: record {rid!r}: 'subset' must be one of "
                       f"{metrics.SUBSETS}, got {r['subset']!r}")
    references[rid] = {'subset': r['subset'],
                       'annotation': annotation_lib.annotation_of(r, args.references, rid)}
  judge = _common.judge_from_args(args)

  def process(item, ref):
    reply = judge.ask(saber_messages(ref['annotation'], item['response']), SaberScores,
                      name='saber_test')
    return {'subset': ref['subset'], 'scores': reply.value, 'raw': reply.raw}

  run = _run_judged(args, references, process, 'saber-test')
  judged = [j for j in _judgments(args) if j['id'] in references]
  summary = metrics.table_iv_summary((j['subset'], j['scores']) for j in judged)
  summary['missing'] = len(references) - len(judged)
  summary['judge_model'] = args.model
  summary['run'] = _run_counts(run)
  dims = metrics.SABER_TEST_DIMS
  rows = [[name] + [fmt(summary[name][d], 2) for d in dims] + [fmt(summary['average'][name], 2)]
          for name in (*metrics.SUBSETS, 'drop')]
  report = ('# SABER-Test\n\n'
            f"Judge: `{args.model}`; n = {summary['n']['consistent']} consistent + "
            f"{summary['n']['inconsistent']} inconsistent; "
            f"{summary['missing']} references unjudged.\n\n"
            'Mean judge score per dimension (0-3); drop = consistent - inconsistent.\n\n'
            + markdown_table(['subset', *dims, 'mean'], rows))
  files.write_text(os.path.join(args.out, 'report.md'), report)
  bar_chart(os.path.join(args.out, 'saber_test.png'), 'SABER-Test: mean judge score',
                    {s: summary[s] for s in metrics.SUBSETS}, 'score (0-3)', (0, 3))
  return summary


def emer(args) -> dict:
  references = {rid: r['reference'] for rid, r in
                files.load_by_id(args.references, required=('reference',)).items()}
  judge = _common.judge_from_args(args)
  run = _run_judged(args, references,
                    lambda item, ref: emer_item(judge, ref, item['response'], args.lang), 'emer')
  judged = [j for j in _judgments(args) if j['id'] in references]
  summary = {'clue_overlap': metrics.finite_mean(j['clue_overlap'] for j in judged),
             'label_overlap': metrics.finite_mean(j['label_overlap'] for j in judged),
             'n': len(judged), 'missing': len(references) - len(judged),
             'judge_model': args.model, 'lang': args.lang, 'run': _run_counts(run)}
  report = ('# EMER\n\n'
            f"Judge: `{args.model}` (prompts: {args.lang}); n = {summary['n']}, "
            f"{summary['missing']} references unjudged.\n\n"
            + markdown_table(['metric', 'mean (0-10)'],
                                     [['Clue Overlap', fmt(summary['clue_overlap'], 2)],
                                      ['Label Overlap', fmt(summary['label_overlap'], 2)]]))
  files.write_text(os.path.join(args.out, 'report.md'), report)
  bar_chart(os.path.join(args.out, 'emer.png'), 'EMER',
                    {'mean': {'Clue Overlap': summary['clue_overlap'],
                              'Label Overlap': summary['label_overlap']}}, 'score (0-10)', (0, 10))
  return summary


# ------------------------------------------------------------------------ report helpers

def bar_chart(path: str, title: str, groups: Mapping[str, Mapping[str, float | None]],
              ylabel: str = '', ylim: tuple[float, float] | None = None) -> None:
  """Grouped bar chart: groups = {series name: {category: value}} (None drawn as 0)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  categories = list(dict.fromkeys(c for series in groups.values() for c in series))
  n = max(1, len(groups))
  width = 0.8 / n
  fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(categories) * n + 1.5), 3.5))
  for k, (name, series) in enumerate(groups.items()):
    xs = [i + (k - (n - 1) / 2) * width for i in range(len(categories))]
    ax.bar(xs, [series.get(c) or 0.0 for c in categories], width, label=name)
  ax.set_xticks(range(len(categories)), categories, rotation=30 if len(categories) > 6 else 0)
  ax.set_title(title)
  ax.set_ylabel(ylabel)
  if ylim:
    ax.set_ylim(*ylim)
  if len(groups) > 1:
    ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def fmt(value: float | None, digits: int = 3) -> str:
  return '-' if value is None else f'{value:.{digits}f}'


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
  return '\n'.join(lines) + '\n'


def parse_args(argv=None):
  parser = _common.tool_parser(__doc__)
  sub = parser.add_subparsers(dest='command', required=True)
  for name, helptext in (('saber-test', 'judged 0-3 scores on six dimensions (Table IV)'),
                         ('emer', 'judged Clue / Label Overlap (0-10)')):
    p = sub.add_parser(name, help=helptext, description=helptext)
    p.add_argument('--predictions', required=True, help='JSONL {"id", "response"}')
    p.add_argument('--references', required=True,
                   help='JSONL {"id", "subset", "annotation"}' if name == 'saber-test'
                   else 'JSONL {"id", "reference"}')
    p.add_argument('--out', required=True, help='output folder')
    if name == 'emer':
      p.add_argument('--lang', choices=('zh', 'en'), default='zh', help='judge prompt language')
    _common.add_judge_args(p)
  p = sub.add_parser('emobench', help='EmoBench-M accuracy (no judge)')
  p.add_argument('--predictions', required=True,
                 help='JSONL {"id", "response", "task", "label", "category"?}')
  p.add_argument('--out', required=True, help='output folder')
  p.add_argument('--label-sets', help='JSON {task: [labels]} added to the built-in label sets')
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  run = {'saber-test': saber_test, 'emer': emer, 'emobench': emobench}[args.command]
  summary = run(args)
  files.write_json(os.path.join(args.out, 'summary.json'), summary)
  return summary


if __name__ == '__main__':
  main()
