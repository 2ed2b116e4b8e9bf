"""gcp-storage-emulator on loopback, with the object generations Orbax's writer relies on.

tensorstore (Orbax's array store) keeps a checkpoint's OCDBT manifest consistent with
conditional requests, as real GCS serves them: a media read returns the object's
generation (`x-goog-generation`) and answers `ifGenerationNotMatch` with 304; an upload
with `ifGenerationMatch` (0: must not exist yet) fails with 412 when the object moved on.
The emulator ignores all three, which loses manifest updates under concurrent writes
("Malformed StorageGeneration" and missing arrays, seen in about half of the saves of a
60-array tree). `start` adds them to the emulator's request handlers; its server handles
one request at a time, so each check and the write after it are atomic.
"""

from http import HTTPStatus

from gcp_storage_emulator import server as server_lib
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _generation(storage, bucket: str, name: str) -> str:
  """The object's generation, '0' when it does not exist (GCS's convention)."""
  try:
    return str(storage.get_file_obj(bucket, name)['generation'])
  except NotFound:
    return '0'


def _conditional_upload(insert):
  def handler(request, response, storage, *args, **kwargs):
    match, name = request.query.get('ifGenerationMatch'), request.query.get('name')
    if match and name and _generation(storage, request.params['bucket_name'],
                                      name[0]) != match[0]:
      response.status = HTTPStatus.PRECONDITION_FAILED
      return None
    return insert(request, response, storage, *args, **kwargs)
  return handler


def _generation_read(read, media_only: bool):
  def handler(request, response, storage, *args, **kwargs):
    media = not media_only or request.query.get('alt', [''])[0] == 'media'
    if not media:
      return read(request, response, storage, *args, **kwargs)
    generation = _generation(storage, request.params['bucket_name'],
                             request.params['object_id'])
    not_match, match = request.query.get('ifGenerationNotMatch'), request.query.get(
        'ifGenerationMatch')
    if generation != '0' and not_match and not_match[0] == generation:
      response.status = HTTPStatus.NOT_MODIFIED
    elif generation != '0' and match and match[0] != generation:
      response.status = HTTPStatus.PRECONDITION_FAILED
    else:
      read(request, response, storage, *args, **kwargs)
    if generation != '0':
      response['x-goog-generation'] = generation
      response['x-goog-metageneration'] = '1'
    return None
  return handler


def patch_handlers(monkeypatch) -> None:
  """The conditional requests above, in the emulator's routing table (undone by
  `monkeypatch`)."""
  wrapped = {objects.insert: _conditional_upload(objects.insert),
             objects.get: _generation_read(objects.get, media_only=True),
             objects.download: _generation_read(objects.download, media_only=False)}
  for _, handlers in server_lib.HANDLERS:
    for method, function in list(handlers.items()):
      if function in wrapped:
        monkeypatch.setitem(handlers, method, wrapped[function])


def start(port: int, bucket: str, monkeypatch):
  """An in-memory emulator on 127.0.0.1:`port` with `bucket`; returns the server (`.stop()`)."""
  patch_handlers(monkeypatch)
  server = server_lib.create_server('127.0.0.1', port, in_memory=True, default_bucket=bucket)
  server.start()
  return server
