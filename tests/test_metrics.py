"""saber_jax.metrics on hand-computed examples (expected values worked out by hand in
the comments, not by the code under test)."""

import pytest

from saber_jax import metrics


# ----------------------------------------------------------------------------- WER / CER

def test_english_wer_strips_tags_case_and_punctuation():
  # ref: the cat sat on the mat / hyp: the cat sat on a mat -> 1 substitution / 6 words
  m = metrics.speech_error_rate('The cat sat on the mat.', '<laughs> the cat sat on a mat', 'en')
  assert m.unit == 'word' and m.ref_len == 6 and m.edits == 1
  assert m.error_rate == pytest.approx(1 / 6)


def test_english_wer_counts_insertions_and_deletions():
  # [i, dont, know, really] vs [i, do, not, know]: the best alignment needs 3 edits
  # (e.g. dont->do, +not, -really) -> 3 / 4.
  m = metrics.speech_error_rate("I don't know, really.", 'I do not know', 'en')
  assert m.edits == 3 and m.error_rate == pytest.approx(0.75)


def test_a_tag_between_words_separates_them():
  assert metrics.english_words('Hello<laughter>world!') == ['hello', 'world']
  assert metrics.speech_error_rate('hello world', 'Hello<laughter>world!', 'en').error_rate == 0.0


def test_chinese_cer_on_characters_without_punctuation_or_spaces():
  # 今天天气很好 vs 今天天气不好: 1 substitution / 6 characters.
  m = metrics.speech_error_rate('今天天气很好。', '今天天气不好<笑声>！', 'zh')
  assert m.unit == 'char' and m.ref_len == 6 and m.error_rate == pytest.approx(1 / 6)
  # Spaces and full-width punctuation do not count.
  assert metrics.speech_error_rate('你 好，世界', '你好世界', 'zh').error_rate == 0.0
  # 我们走吧 vs 我们走: 1 deletion / 4.
  assert metrics.speech_error_rate('我们走吧', '我们走', 'zh').error_rate == pytest.approx(0.25)
  # Latin letters inside Chinese are lowercased before comparing.
  assert metrics.speech_error_rate('我用iPhone', '我用iphone', 'zh').error_rate == 0.0


def test_empty_transcripts():
  assert metrics.speech_error_rate('', '<music>', 'en').error_rate == 0.0
  assert metrics.speech_error_rate('', 'hi', 'en').error_rate == 1.0
  assert metrics.speech_error_rate('hi there', '<music>', 'en').error_rate == 1.0
  assert metrics.speech_error_rate('。', '', 'zh').error_rate == 0.0


def test_unknown_language_is_an_error():
  with pytest.raises(ValueError, match="'en' or 'zh'"):
    metrics.speech_error_rate('a', 'a', 'fr')


# ----------------------------------------------------------------------------- Table IV

def _row(vd, scd, afd, fe, bl, cr):
  return dict(zip(metrics.SABER_TEST_DIMS, (vd, scd, afd, fe, bl, cr)))


def test_table_iv_means_and_drop():
  rows = [('consistent', _row(3, 3, 2, 2, 1, 3)),
          ('consistent', _row(2, 3, 2, 1, 1, 2)),
          ('inconsistent', _row(1, 3, 1, 0, 1, 0)),
          ('inconsistent', _row(2, 2, 1, 1, 1, 1)),
          ('inconsistent', _row(0, 1, 1, 2, 1, 2))]
  s = metrics.table_iv_summary(rows)
  assert s['n'] == {'consistent': 2, 'inconsistent': 3}
  # consistent: VD (3+2)/2=2.5 SCD 3 AFD 2 FE 1.5 BL 1 CR 2.5
  assert s['consistent'] == pytest.approx(_row(2.5, 3.0, 2.0, 1.5, 1.0, 2.5))
  # inconsistent: VD 3/3=1 SCD 6/3=2 AFD 1 FE 3/3=1 BL 1 CR 3/3=1
  assert s['inconsistent'] == pytest.approx(_row(1.0, 2.0, 1.0, 1.0, 1.0, 1.0))
  assert s['drop'] == pytest.approx(_row(1.5, 1.0, 1.0, 0.5, 0.0, 1.5))
  # averages over the six dimensions: 12.5/6, 7/6, 5.5/6
  assert s['average']['consistent'] == pytest.approx(12.5 / 6)
  assert s['average']['inconsistent'] == pytest.approx(7 / 6)
  assert s['average']['drop'] == pytest.approx(5.5 / 6)


def test_table_iv_empty_subset_gives_none():
  s = metrics.table_iv_summary([('consistent', _row(1, 1, 1, 1, 1, 1))])
  assert s['inconsistent']['VD'] is None and s['drop']['VD'] is None
  assert s['n']['inconsistent'] == 0
  with pytest.raises(ValueError, match='subset'):
    metrics.table_iv_summary([('other', _row(1, 1, 1, 1, 1, 1))])


# ----------------------------------------------------------------------------- test set

def test_select_test_set_ranks_by_intensity_then_id():
  j = [{'id': 'a', 'relation': 'consistent', 'intensity': 5},
       {'id': 'c', 'relation': 'consistent', 'intensity': 9},
       {'id': 'b', 'relation': 'consistent', 'intensity': 9},
       {'id': 'd', 'relation': 'consistent', 'intensity': 1},
       {'id': 'x', 'relation': 'inconsistent', 'intensity': 3},
       {'id': 'y', 'relation': 'inconsistent', 'intensity': 7}]
  sel, counts = metrics.select_test_set(j, 2)
  assert sel == {'consistent': ['b', 'c'], 'inconsistent': ['y', 'x']}
  assert counts['shortfall'] == {'consistent': 0, 'inconsistent': 0}
  sel, counts = metrics.select_test_set(j, 3)  # balanced: cut to the smaller class (2)
  assert sel == {'consistent': ['b', 'c'], 'inconsistent': ['y', 'x']}
  assert counts['shortfall'] == {'consistent': 0, 'inconsistent': 1}
  assert counts['available'] == {'consistent': 4, 'inconsistent': 2}
  sel, _ = metrics.select_test_set(j, 3, balance=False)
  assert sel['consistent'] == ['b', 'c', 'a']


# ----------------------------------------------------------------------------- pairs

def _as_tuples(pairs):
  return [(p.chosen, p.rejected, p.margin) for p in pairs]


def test_pairs_product_and_zipped():
  scores = [7, 9, 3, 9, 1, 5]
  # rank: 1(9) 3(9) 0(7) 5(5) 2(3) 4(1); winners [1, 3], losers worst first [4, 2]
  assert _as_tuples(metrics.select_pairs(scores, pairing='product')) == [
      (1, 4, 8), (1, 2, 6), (3, 4, 8), (3, 2, 6)]
  assert _as_tuples(metrics.select_pairs(scores, pairing='zipped')) == [(1, 4, 8), (3, 2, 6)]


def test_pairs_ties():
  assert metrics.select_pairs([5, 5, 5, 5]) == []
  # rank 0 1 2 3 4; winners [0, 1], losers [4, 3]; (1, 3) ties and is dropped
  assert _as_tuples(metrics.select_pairs([9, 5, 5, 5, 1])) == [(0, 4, 8), (0, 3, 4), (1, 4, 4)]
  assert _as_tuples(metrics.select_pairs([9, 5, 5, 5, 1], pairing='zipped')) == [(0, 4, 8)]


def test_pairs_min_margin_and_small_k():
  assert (_as_tuples(metrics.select_pairs([9, 8, 2, 1], min_margin=7))
          == [(0, 3, 8), (0, 2, 7), (1, 3, 7)])
  assert metrics.select_pairs([9, 8, 2, 1], min_margin=9) == []  # best - worst = 8 < 9
  assert _as_tuples(metrics.select_pairs([3, 2, 1])) == [(0, 2, 2)]  # k=3: one each side
  assert metrics.select_pairs([3]) == []
  with pytest.raises(ValueError, match='pairing'):
    metrics.select_pairs([1, 2], pairing='all')


# ----------------------------------------------------------------------------- EmoBench-M

SENTIMENT = ['neutral', 'negative', 'positive']
FGMSA = ['weak negative', 'strong negative', 'neutral', 'weak positive', 'strong positive']


@pytest.mark.parametrize('response,labels,expected', [
    ("{'emotion': 'Happy'}", ['happy', 'sad'], 'happy'),
    ('The answer is {"emotion": "sad"}.', ['happy', 'sad'], 'sad'),
    ("{'emotion': happy}", ['happy', 'sad'], 'happy'),            # not a literal: regex
    ('emotion: Negative', SENTIMENT, 'negative'),
    ("{'emotion': 'Negative.'}", SENTIMENT, 'negative'),
    ('I think the person is sad.', ['happy', 'sad'], 'sad'),      # unique label in text
    ('happy or sad?', ['happy', 'sad'], None),                    # ambiguous
    ('pure sadness', ['happy', 'sad'], None),                     # whole words only
    ("{'emotion': 'furious'}", ['happy', 'sad'], None),           # not a label
    ('The sentiment is weak negative overall', FGMSA, 'weak negative'),
    ("{'emotion': 'strong positive'}", FGMSA, 'strong positive'),
    ("{'emotion': 'joy', 'intent': 'agreeing'}", ['joy_agreeing', 'joy_neutral'], 'joy_agreeing'),
    ("{'emotion': 'True'}", ['true', 'false'], 'true'),
    ('', ['true', 'false'], None),
])
def test_parse_emotion_answer(response, labels, expected):
  assert metrics.parse_emotion_answer(response, labels) == expected


def test_emobench_summary():
  rows = [('MOSI', 'positive', 'positive'), ('MOSI', 'negative', 'negative'),
          ('MOSI', 'neutral', None),
          ('MELD', 'joy', 'joy'), ('MELD', 'anger', 'fear')]
  s = metrics.emobench_summary(rows)
  assert s['tasks'] == pytest.approx({'MELD': 0.5, 'MOSI': 2 / 3})
  assert s['average'] == pytest.approx((2 / 3 + 0.5) / 2)
  assert s['categories'] == pytest.approx({'CEU': 0.5, 'FER': 2 / 3})
  assert s['invalid_rate'] == pytest.approx(1 / 5)
  assert s['invalid'] == {'MELD': 0, 'MOSI': 1}
  # A record-level category overrides the built-in table.
  s = metrics.emobench_summary(rows, {'MOSI': 'X'})
  assert s['categories'] == pytest.approx({'CEU': 0.5, 'X': 2 / 3})
