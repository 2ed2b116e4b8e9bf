import os

import pytest

import processes

# Eight CPU devices for the sharding tests; must be set before jax is imported.
os.environ.setdefault('XLA_FLAGS', processes.xla_flags(8))


@pytest.fixture
def gcs(monkeypatch):
  """gcp-storage-emulator on loopback (in memory, with GCS's conditional requests:
  tests/gcs_emulator.py) and a bucket `runs`; the clients' standard variables point at it,
  in this process and (returned) for the processes it starts."""
  pytest.importorskip('gcp_storage_emulator')
  pytest.importorskip('gcsfs')
  import gcs_emulator
  port = processes.free_port()
  server = gcs_emulator.start(port, 'runs', monkeypatch)
  url = f'http://127.0.0.1:{port}'
  env = {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
         'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator'}
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  yield env
  server.stop()
