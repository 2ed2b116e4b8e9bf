"""A real OpenAI-compatible chat-completions server on 127.0.0.1 for tests.

`JudgeServer(script)` listens on an ephemeral port and answers
POST /v1/chat/completions with the real `chat.completion` JSON shape. What each
request gets is decided by `script(body) -> Reply | str` (a str is a 200 answer with
that content), so a test can script malformed JSON, out-of-range scores, slow replies,
429s and 500s as a function of the request messages. Every request body is kept in
`.requests`; `.max_in_flight` records the peak number of concurrent requests.

The server runs in daemon threads, stops on `stop()` / context exit, and stops itself
after `lifetime` seconds so a failing test cannot leave it running.
"""

import dataclasses
import http.server
import json
import threading
import time
from typing import Callable

import pytest


@dataclasses.dataclass
class Reply:
  content: str | None = None   # the assistant message text (status 200)
  status: int = 200
  delay: float = 0.0           # seconds to wait before answering
  headers: dict = dataclasses.field(default_factory=dict)
  error: str = 'scripted error'
  body: dict | None = None     # a whole completion body (several choices, logprobs), if given


def user_text(body: dict) -> str:
  """All text parts of all user messages of a request, joined (what scripts key on)."""
  parts = []
  for message in body.get('messages', []):
    if message.get('role') != 'user':
      continue
    content = message.get('content')
    if isinstance(content, str):
      parts.append(content)
    else:
      parts.extend(p.get('text', '') for p in content if p.get('type') == 'text')
  return '\n'.join(parts)


def completion_body(content: str | None, model: str, n: int) -> dict:
  return {
      'id': f'chatcmpl-test-{n}', 'object': 'chat.completion', 'created': int(time.time()),
      'model': model, 'system_fingerprint': None,
      'choices': [{'index': 0, 'finish_reason': 'stop', 'logprobs': None,
                   'message': {'role': 'assistant', 'content': content, 'refusal': None}}],
      'usage': {'prompt_tokens': 10, 'completion_tokens': 5, 'total_tokens': 15},
  }


class JudgeServer:

  def __init__(self, script: Callable[[dict], 'Reply | str'], lifetime: float = 120.0):
    self.script = script
    self.requests: list[dict] = []
    self.max_in_flight = 0
    self._in_flight = 0
    self._lock = threading.Lock()
    self._stopped = threading.Event()
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = 'HTTP/1.1'
      # One buffered write per reply and TCP_NODELAY: otherwise headers and body go out
      # as two segments and Nagle + delayed ACK add ~40 ms to every request.
      wbufsize = -1
      disable_nagle_algorithm = True

      def log_message(self, *args):  # keep test output clean
        pass

      def _send(self, status: int, body: dict, headers: dict) -> None:
        data = json.dumps(body).encode()
        try:
          self.send_response(status)
          self.send_header('Content-Type', 'application/json')
          self.send_header('Content-Length', str(len(data)))
          for k, v in headers.items():
            self.send_header(k, v)
          self.end_headers()
          self.wfile.write(data)
          self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
          pass  # the client gave up (timeout test)

      def do_POST(self):
        length = int(self.headers.get('Content-Length', 0))
        body = json.loads(self.rfile.read(length) or b'{}')
        if self.path.rstrip('/') != '/v1/chat/completions':
          self._send(404, {'error': {'message': f'no route {self.path}', 'type': 'not_found'}}, {})
          return
        with server._lock:
          server.requests.append(body)
          n = len(server.requests)
          server._in_flight += 1
          server.max_in_flight = max(server.max_in_flight, server._in_flight)
        try:
          reply = server.script(body)
          if isinstance(reply, str):
            reply = Reply(reply)
          # Sleep in small steps so stop() is not held up by a slow reply.
          deadline = time.monotonic() + reply.delay
          while time.monotonic() < deadline and not server._stopped.is_set():
            time.sleep(0.01)
          if reply.status == 200:
            self._send(200, reply.body or completion_body(reply.content, body.get('model', ''), n),
                       reply.headers)
          else:
            self._send(reply.status, {'error': {'message': reply.error, 'type': 'scripted',
                                                'param': None, 'code': None}}, reply.headers)
        finally:
          with server._lock:
            server._in_flight -= 1

    self._httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self._httpd.daemon_threads = True
    self.port = self._httpd.server_address[1]
    self.base_url = f'http://127.0.0.1:{self.port}/v1'
    self._thread = threading.Thread(target=self._httpd.serve_forever,
                                    kwargs={'poll_interval': 0.05},
                                    daemon=True)
    self._timer = threading.Timer(lifetime, self.stop)
    self._timer.daemon = True

  def start(self) -> 'JudgeServer':
    self._thread.start()
    self._timer.start()
    return self

  def stop(self) -> None:
    if self._stopped.is_set():
      return
    self._stopped.set()
    self._timer.cancel()
    self._httpd.shutdown()
    self._httpd.server_close()

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()


@pytest.fixture
def judge_server():
  """Factory fixture: `judge_server(script)` starts a server; all stop at teardown."""
  started = []

  def start(script, lifetime: float = 120.0) -> JudgeServer:
    server = JudgeServer(script, lifetime).start()
    started.append(server)
    return server

  yield start
  for s in started:
    s.stop()
