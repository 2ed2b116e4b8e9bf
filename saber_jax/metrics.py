"""Pure metric and selection functions behind the data/eval tools (no I/O, no judge).

- speech QC: WER (English words) / CER (Chinese characters) after stripping `<...>`
  sound-event tags (the SABER annotation prompt marks sound events that way);
- SABER-Test: per-dimension means for the consistent / inconsistent subsets and the
  drop between them (the paper's Table IV);
- test-set selection: top-N per audio-visual relation class by judged intensity;
- CA-DPO pairs: rank k judged samples, pair top-2 winners with bottom-2 losers;
- EmoBench-M: `{'emotion': ...}` answer parsing and accuracy per task / category.
"""

import ast
import dataclasses
import math
import re
import unicodedata
from typing import Iterable, Mapping, Sequence

import jiwer

# ----------------------------------------------------------------------------- speech QC

_SOUND_TAG = re.compile(r'<[^<>]*>')


def strip_sound_tags(text: str) -> str:
  """Removes `<laughter>`-style sound-event tags (replaced by a space, so the words
  either side do not fuse)."""
  return _SOUND_TAG.sub(' ', text)


def _is_punctuation(ch: str) -> bool:
  # Unicode P* covers ASCII and CJK punctuation (，。！？「」) alike, as jiwer's
  # RemovePunctuation does.
  return unicodedata.category(ch).startswith('P')


def english_words(text: str) -> list[str]:
  """Tags stripped, NFKC, lowercased; apostrophes dropped ("don't" -> "dont") and all
  other punctuation turned into spaces ("well-known" -> "well known"); split on space."""
  text = unicodedata.normalize('NFKC', strip_sound_tags(text)).lower()
  text = text.replace("'", '').replace('\u2019', '')
  return ''.join(' ' if _is_punctuation(c) else c for c in text).split()


def chinese_chars(text: str) -> str:
  """Tags stripped, NFKC (full-width -> half-width), lowercased, punctuation and all
  whitespace removed: the string CER is computed on. (No traditional -> simplified
  conversion: that needs OpenCC, which is not a dependency.)"""
  text = unicodedata.normalize('NFKC', strip_sound_tags(text)).lower()
  return ''.join(c for c in text if not _is_punctuation(c) and not c.isspace())


@dataclasses.dataclass(frozen=True)
class SpeechMatch:
  """Edit distance between a reference (ASR) and a hypothesis (annotation) transcript."""
  error_rate: float  # (S + D + I) / N_ref; 0.0 when both are empty, 1.0 when only ref is
  unit: str          # 'word' or 'char'
  ref_len: int
  edits: int


def speech_error_rate(reference: str, hypothesis: str, lang: str) -> SpeechMatch:
  """WER for 'en' (words), CER for 'zh' (characters), via jiwer 4.

  reference: the ASR transcript; hypothesis: the annotation's `speech_content`.
  An empty reference is defined here (jiwer would divide the insertions by 1): no
  speech on either side is a perfect match, speech only in the annotation is 1.0.
  """
  if lang == 'en':
    ref, hyp = english_words(reference), english_words(hypothesis)
    unit = 'word'
  elif lang == 'zh':
    ref, hyp = chinese_chars(reference), chinese_chars(hypothesis)
    unit = 'char'
  else:
    raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")
  if not ref:
    return SpeechMatch(0.0 if not hyp else 1.0, unit, 0, len(hyp))
  if not hyp:
    return SpeechMatch(1.0, unit, len(ref), len(ref))
  if unit == 'word':
    out = jiwer.process_words(' '.join(ref), ' '.join(hyp))
    rate = out.wer
  else:
    out = jiwer.process_characters(ref, hyp)
    rate = out.cer
  edits = out.substitutions + out.deletions + out.insertions
  return SpeechMatch(float(rate), unit, len(ref), edits)


# ----------------------------------------------------------------------------- SABER-Test

# Video description, speech content description, acoustic feature description,
# facial expression, body language, consistency reasoning (paper, Table IV).
SABER_TEST_DIMS = ('VD', 'SCD', 'AFD', 'FE', 'BL', 'CR')
SUBSETS = ('consistent', 'inconsistent')


def _mean(values: Sequence[float]) -> float | None:
  return sum(values) / len(values) if values else None


def table_iv_summary(rows: Iterable[tuple[str, Mapping[str, float]]],
                     dims: Sequence[str] = SABER_TEST_DIMS) -> dict:
  """rows: (subset, {dim: score}) per judged prediction.

  Returns {'consistent': {dim: mean}, 'inconsistent': {dim: mean},
  'drop': {dim: consistent - inconsistent}, 'n': {subset: count},
  'average': {subset / 'drop': mean over dims}}; means are None for an empty subset.
  """
  scores = {s: {d: [] for d in dims} for s in SUBSETS}
  for subset, row in rows:
    if subset not in scores:
      raise ValueError(f'subset must be one of {SUBSETS}, got {subset!r}')
    for d in dims:
      scores[subset][d].append(float(row[d]))
  out = {s: {d: _mean(scores[s][d]) for d in dims} for s in SUBSETS}
  out['drop'] = {d: (None if out['consistent'][d] is None or out['inconsistent'][d] is None
                     else out['consistent'][d] - out['inconsistent'][d]) for d in dims}
  out['n'] = {s: len(scores[s][dims[0]]) for s in SUBSETS}
  out['average'] = {k: (None if any(v is None for v in out[k].values())
                        else sum(out[k].values()) / len(dims))
                    for k in (*SUBSETS, 'drop')}
  return out


# ----------------------------------------------------------------------------- test set

def select_test_set(judgments: Iterable[Mapping], per_class: int, *,
                    balance: bool = True) -> tuple[dict[str, list[str]], dict]:
  """Top `per_class` ids per relation class by judged intensity.

  judgments: {'id', 'relation' in SUBSETS, 'intensity'} records. Ties on intensity are
  broken by id (ascending), so reruns select the same clips. With `balance`, both
  classes are cut to the smaller one's count, keeping the split even (900 + 900 in the
  paper). Returns ({class: [ids, highest intensity first]}, counts) where counts holds
  'available', 'selected' and 'shortfall' (per_class - available, where positive).
  """
  by_class = {s: [] for s in SUBSETS}
  for j in judgments:
    by_class[j['relation']].append((-j['intensity'], str(j['id'])))
  ranked = {s: [i for _, i in sorted(v)] for s, v in by_class.items()}
  available = {s: len(v) for s, v in ranked.items()}
  take = {s: min(per_class, available[s]) for s in SUBSETS}
  if balance:
    n = min(take.values())
    take = {s: n for s in SUBSETS}
  selected = {s: ranked[s][:take[s]] for s in SUBSETS}
  counts = {'available': available, 'selected': take,
            'shortfall': {s: max(0, per_class - available[s]) for s in SUBSETS}}
  return selected, counts


# ----------------------------------------------------------------------------- CA-DPO pairs

@dataclasses.dataclass(frozen=True)
class Pair:
  chosen: int    # index into the sampled responses
  rejected: int
  margin: float  # score[chosen] - score[rejected] > 0


def rank_responses(scores: Sequence[float]) -> list[int]:
  """Indices best first; equal scores keep index order (stable, reproducible)."""
  return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def select_pairs(scores: Sequence[float], *, pairing: str = 'product', n_top: int = 2,
                 min_margin: float = 0.0) -> list[Pair]:
  """Preference pairs from the judged scores of k samples of one prompt.

  winners = the top `n_top`, losers = the bottom `n_top` (worst first), with n_top cut
  to k // 2 so the two groups never overlap. 'product' pairs every winner with every
  loser (2x2 = 4 pairs); 'zipped' pairs best-worst, second-second-worst (2 pairs).
  The prompt gives nothing when best - worst < max(min_margin, >0); a pair is kept
  only if its own margin is > 0 and >= min_margin (ties are not preferences).
  """
  if pairing not in ('product', 'zipped'):
    raise ValueError(f"pairing must be 'product' or 'zipped', got {pairing!r}")
  n = min(n_top, len(scores) // 2)
  if n == 0:
    return []
  order = rank_responses(scores)
  best, worst = scores[order[0]], scores[order[-1]]
  if best - worst <= 0 or best - worst < min_margin:
    return []
  winners, losers = order[:n], order[::-1][:n]
  if pairing == 'product':
    candidates = [(w, lose) for w in winners for lose in losers]
  else:
    candidates = list(zip(winners, losers))
  pairs = []
  for w, lose in candidates:
    margin = scores[w] - scores[lose]
    if margin > 0 and margin >= min_margin:
      pairs.append(Pair(w, lose, margin))
  return pairs


# ----------------------------------------------------------------------------- EmoBench-M

# Task -> category (FER / CEU / SCEA). From the EmoBench-M paper as summarised in the
# reference notes; the exact task mapping there is marked unverified, so records may
# carry their own 'category' instead.
EMOBENCH_CATEGORIES = {
    'ravdsssong': 'FER', 'ravdssspeech': 'FER',
    'ravdesssong': 'FER', 'ravdessspeech': 'FER', 'mosi': 'FER', 'mosei': 'FER',
    'fgmsa': 'FER', 'fmsasc': 'FER',
    'sims': 'CEU', 'chsimsv2s': 'CEU', 'chsimsv2': 'CEU', 'mer2023': 'CEU',
    'mceiu': 'CEU', 'meld': 'CEU',
    'funny': 'SCEA', 'urfunny': 'SCEA', 'mustard': 'SCEA', 'smile': 'SCEA',
}


def task_key(task: str) -> str:
  """'RAVDSS_song' / 'ch-simsv2s' -> 'ravdsssong' / 'chsimsv2s' (lowercase alnum)."""
  return re.sub(r'[^0-9a-z]', '', task.lower())


def normalize_label(text: str) -> str:
  return ' '.join(str(text).strip().strip('.。!！').lower().split())


def _label_pattern(label: str) -> re.Pattern:
  # Whole-word match for Latin labels ('sad' must not hit 'sadness'); CJK labels have
  # no word boundaries, so a plain substring.
  escaped = re.escape(label).replace(r'\ ', r'[\s_-]+')
  if re.search(r'[a-z0-9]', label):
    return re.compile(rf'(?<![a-z0-9]){escaped}(?![a-z0-9])')
  return re.compile(escaped)


def unique_label_match(text: str, labels: Sequence[str]) -> str | None:
  """The one label that occurs in `text`, else None (none or several).

  A match inside a longer matched label does not count ('negative' inside
  'weak negative'), so overlapping label sets still resolve.
  """
  text = text.lower()
  spans = []
  for label in labels:
    for m in _label_pattern(label).finditer(text):
      spans.append((m.start(), m.end(), label))
  kept = {lab for s, e, lab in spans
          if not any(s2 <= s and e <= e2 and (e2 - s2) > (e - s) for s2, e2, _ in spans)}
  return kept.pop() if len(kept) == 1 else None


_DICT_LITERAL = re.compile(r'\{[^{}]*\}')
_EMOTION_FIELD = re.compile(r"""['"]?emotion['"]?\s*[:：]\s*['"]?([^'"{}\n,]+)""", re.I)


def _answer_from_dict(d: dict) -> str | None:
  keys = {str(k).strip().lower(): v for k, v in d.items()}
  if 'emotion' in keys and 'intent' in keys:  # MC-EIU joint label, emotion_intent
    return f"{normalize_label(keys['emotion'])}_{normalize_label(keys['intent'])}"
  if 'emotion' in keys:
    return str(keys['emotion'])
  return None


def parse_emotion_answer(response: str, labels: Sequence[str]) -> str | None:
  """The label a free-text answer gives, or None when it cannot be told.

  1. a `{'emotion': ...}` dict literal (ast.literal_eval; JSON also parses), taking
     `emotion_intent` when an 'intent' key is there too;
  2. a regex for `emotion: value` when the dict is not a valid literal;
  3. else a unique label occurring in the whole response.
  A parsed value must be a label, or contain exactly one; otherwise None.
  """
  labels = [normalize_label(label) for label in labels]
  candidate = None
  for m in _DICT_LITERAL.finditer(response):
    try:
      value = ast.literal_eval(m.group(0))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
      continue
    if isinstance(value, dict):
      candidate = _answer_from_dict(value)
      if candidate is not None:
        break
  if candidate is None:
    m = _EMOTION_FIELD.search(response)
    if m:
      candidate = m.group(1)
  if candidate is None:
    return unique_label_match(response, labels)
  candidate = normalize_label(candidate)
  if candidate in labels:
    return candidate
  return unique_label_match(candidate, labels)


def emobench_summary(rows: Iterable[tuple[str, str, str | None]],
                     categories: Mapping[str, str] | None = None) -> dict:
  """rows: (task, gold label, parsed prediction or None).

  Accuracy per task (exact match after lowercasing, as EmoBench-M_eval.py; an
  unparseable answer counts as wrong), 'average' = mean over tasks, 'categories' =
  mean of the task accuracies in each category, 'invalid_rate' over all answers.
  categories: task -> category name; defaults to EMOBENCH_CATEGORIES by task_key.
  """
  correct, total, invalid = {}, {}, {}
  for task, gold, pred in rows:
    total[task] = total.get(task, 0) + 1
    invalid[task] = invalid.get(task, 0) + (pred is None)
    hit = pred is not None and normalize_label(pred) == normalize_label(gold)
    correct[task] = correct.get(task, 0) + hit
  tasks = {t: correct[t] / total[t] for t in sorted(total)}
  by_category = {}
  for t, acc in tasks.items():
    cat = (categories or {}).get(t) or EMOBENCH_CATEGORIES.get(task_key(t))
    if cat:
      by_category.setdefault(cat, []).append(acc)
  n_all = sum(total.values())
  return {
      'tasks': tasks,
      'average': _mean(list(tasks.values())),
      'categories': {c: _mean(v) for c, v in sorted(by_category.items())},
      'invalid_rate': (sum(invalid.values()) / n_all) if n_all else None,
      'n': {t: total[t] for t in sorted(total)},
      'invalid': {t: invalid[t] for t in sorted(total)},
  }


def finite_mean(values: Iterable[float]) -> float | None:
  vals = [float(v) for v in values]
  if any(not math.isfinite(v) for v in vals):
    raise ValueError('non-finite score')
  return _mean(vals)
