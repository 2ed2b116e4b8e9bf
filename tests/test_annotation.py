"""saber_jax.data.annotation: the six-dimension schema and its error messages."""

import copy
import json

import os

import pytest

from saber_jax.data import annotation

try:
  from tests import tokenizer_helpers as th
except ImportError:
  import tokenizer_helpers as th


@pytest.fixture
def raw():
  return json.loads(th.FIXTURE_EN_TEXT)


@pytest.mark.skipif(not os.path.exists(th.SHARED_FIXTURE_PATH),
                    reason='shared fixture folder absent')
def test_embedded_fixture_is_the_shared_file():
  with open(th.SHARED_FIXTURE_PATH, encoding='utf-8') as f:
    assert f.read() == th.FIXTURE_EN_TEXT


def _with(obj, path, value):
  obj = copy.deepcopy(obj)
  node = obj
  for key in path[:-1]:
    node = node[key]
  if value is _DELETE:
    del node[path[-1]]
  else:
    node[path[-1]] = value
  return obj


_DELETE = object()


def test_fixture_validates(raw):
  ann = annotation.validate_annotation(raw, 'clip_0')
  assert ann.speech_content == raw['audio_desc']['speech_content']
  assert ann.sentiment_analysis == raw['sentiment_analysis']
  assert ann.to_dict() == raw
  with pytest.raises(AttributeError):
    ann.video_desc = 'changed'     # frozen


def test_chinese_clip_uses_the_same_keys(raw):
  zh = {'video_desc': '一位男士站在厨房里。',
        'audio_desc': {'speech_content': '你好。', 'acoustic_feat': '声音平稳。'},
        'facial_exp_desc': '面带微笑。', 'body_lang_desc': '双手握杯。',
        'sentiment_analysis': '整体情绪平和。'}
  assert annotation.validate_annotation(zh, 'zh_1').to_dict() == zh
  assert set(annotation.FIELD_PATHS) == set(annotation.Annotation.__dataclass_fields__)


def test_texts_are_stripped_and_extra_keys_ignored(raw):
  padded = _with(_with(raw, ('video_desc',), '  a kitchen \n'), ('extra',), 1)
  ann = annotation.validate_annotation(padded, 'c')
  assert ann.video_desc == 'a kitchen'


@pytest.mark.parametrize('path', [p for p in annotation.FIELD_PATHS.values()] + [('audio_desc',)])
def test_missing_field_names_clip_and_field(raw, path):
  with pytest.raises(annotation.AnnotationError) as error:
    annotation.validate_annotation(_with(raw, path, _DELETE), 'clip_42')
  message = str(error.value)
  assert "clip 'clip_42'" in message and 'missing' in message
  assert f"field '{'.'.join(path)}'" in message
  assert error.value.clip_id == 'clip_42' and error.value.field == '.'.join(path)


@pytest.mark.parametrize('path', list(annotation.FIELD_PATHS.values()))
@pytest.mark.parametrize('value, kind',
                         [(3, 'int'), (None, 'null'), (['a'], 'list'), ({'a': 'b'}, 'dict')])
def test_wrong_type_names_clip_field_and_expected_type(raw, path, value, kind):
  with pytest.raises(annotation.AnnotationError) as error:
    annotation.validate_annotation(_with(raw, path, value), 7)
  message = str(error.value)
  assert 'clip 7' in message and f"field '{'.'.join(path)}'" in message
  assert f'expected a string, got {kind}' in message


def test_audio_desc_not_an_object(raw):
  with pytest.raises(annotation.AnnotationError,
                     match=r"clip 'c': field 'audio_desc': expected an object with "
                           r"'speech_content', got str"):
    annotation.validate_annotation(_with(raw, ('audio_desc',), 'loud'), 'c')


@pytest.mark.parametrize('path', list(annotation.FIELD_PATHS.values()))
@pytest.mark.parametrize('value', ['', '   ', '\n\t '])
def test_empty_text_names_clip_and_field(raw, path, value):
  with pytest.raises(annotation.AnnotationError) as error:
    annotation.validate_annotation(_with(raw, path, value), 'clip_e')
  message = str(error.value)
  assert "clip 'clip_e'" in message and 'empty' in message
  assert f"field '{'.'.join(path)}'" in message


def test_record_that_is_not_an_object():
  with pytest.raises(annotation.AnnotationError,
                     match=r"clip 'c': expected a JSON object .* got list"):
    annotation.validate_annotation(['video_desc'], 'c')


def test_parse_annotation_reports_json_error_position(raw):
  text = json.dumps(raw, indent=2)
  broken = text.replace('"body_lang_desc"', 'body_lang_desc')
  with pytest.raises(annotation.AnnotationError) as error:
    annotation.parse_annotation(broken, 'clip_j')
  line = broken[:broken.index('body_lang_desc')].count('\n') + 1
  assert "clip 'clip_j'" in str(error.value)
  assert f'invalid JSON at line {line} column 3' in str(error.value)


def test_parse_annotation_accepts_a_code_fenced_answer(raw):
  fenced = '```json\n' + json.dumps(raw, ensure_ascii=False) + '\n```\n'
  assert annotation.parse_annotation(fenced, 'c').to_dict() == raw
  with pytest.raises(annotation.AnnotationError, match="clip 'c': expected JSON text, got null"):
    annotation.parse_annotation(None, 'c')


def test_read_annotations_yields_errors_and_goes_on(raw, tmp_path):
  bad_field = _with(raw, ('audio_desc', 'acoustic_feat'), '')
  lines = [
      json.dumps({'id': 'ok_1', 'annotation': raw}),
      '{"id": "broken", "annotation": ',
      '',
      json.dumps({'annotation': raw}),
      json.dumps({'id': 'bad_field', 'annotation': bad_field}),
      json.dumps({'id': 'no_annotation'}),
      json.dumps({'id': 'as_text', 'annotation': '```json\n' + json.dumps(raw) + '\n```'}),
      json.dumps({'id': 'bad_text', 'annotation': '{"video_desc": '}),
      json.dumps([1, 2]),
      json.dumps({'id': 12, 'annotation': raw}),
  ]
  path = tmp_path / 'annotations.jsonl'
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  results = list(annotation.read_annotations(path))
  assert [clip_id for clip_id, _ in results] == [
      'ok_1', None, None, 'bad_field', 'no_annotation', 'as_text', 'bad_text', None, 12]
  kinds = [isinstance(result, annotation.Annotation) for _, result in results]
  assert kinds == [True, False, False, False, False, True, False, False, True]
  messages = {i: str(result) for i, (_, result) in enumerate(results) if not kinds[i]}
  assert messages[1].startswith(f'{path}:2: clip id unknown: invalid JSON')
  assert messages[2] == f"{path}:4: clip id unknown: field 'id': missing"
  assert messages[3] == (f"{path}:5: clip 'bad_field': field 'audio_desc.acoustic_feat': "
                         'expected non-empty text, got an empty or whitespace-only string')
  assert messages[4] == f"{path}:6: clip 'no_annotation': field 'annotation': missing"
  assert messages[6].startswith(f"{path}:8: clip 'bad_text': invalid JSON at line 1")
  assert messages[7].startswith(f'{path}:9: clip id unknown: expected a JSON object')
  assert results[3][1].source == f'{path}:5'


def test_read_annotations_shards_by_line(raw, tmp_path):
  path = tmp_path / 'a.jsonl'
  path.write_text(''.join(json.dumps({'id': f'c{i}', 'annotation': raw}) + '\n' for i in range(7)))
  shards = [[i for i, _ in annotation.read_annotations(path, shard_index=s, num_shards=3)]
            for s in range(3)]
  assert shards == [['c0', 'c3', 'c6'], ['c1', 'c4'], ['c2', 'c5']]
  with pytest.raises(ValueError, match='shard_index'):
    next(annotation.read_annotations(path, shard_index=3, num_shards=3))


def test_allow_empty_accepts_a_silent_clip(raw, tmp_path):
  silent = _with(raw, ('audio_desc', 'speech_content'), ' ')
  ann = annotation.validate_annotation(silent, 'silent', allow_empty=('audio_desc.speech_content',))
  assert ann.speech_content == ''
  with pytest.raises(annotation.AnnotationError, match="field 'video_desc'"):
    annotation.validate_annotation(_with(silent, ('video_desc',), ''), 's',
                                   allow_empty=('audio_desc.speech_content',))
  with pytest.raises(ValueError, match='unknown fields'):
    annotation.validate_annotation(raw, 'c', allow_empty=('speech_content',))
  path = tmp_path / 'a.jsonl'
  path.write_text(json.dumps({'id': 's', 'annotation': silent}) + '\n')
  [(_, strict)] = annotation.read_annotations(path)
  [(_, relaxed)] = annotation.read_annotations(path, allow_empty=('audio_desc.speech_content',))
  assert isinstance(strict, annotation.AnnotationError) and relaxed == ann


def test_annotation_error_survives_pickling():
  import pickle
  error = annotation.AnnotationError('expected text', clip_id='c7', field='video_desc',
                                     source='a.jsonl:3')
  again = pickle.loads(pickle.dumps(error))
  assert str(again) == str(error)
  assert (again.clip_id, again.field, again.source) == ('c7', 'video_desc', 'a.jsonl:3')
