"""A real GCS-protocol server for the tests (gcp-storage-emulator, a test dependency), run as a
process on localhost, and the environment that points every client at it.

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
  """gcp-storage-emulator on 127.0.0.1:`port`, in memory; `bucket(name)` creates a bucket."""

  def __init__(self, port: int):
    self.port = port
    self.url = f'http://127.0.0.1:{port}'
    self.process = None

  def start(self) -> 'Server':
    self.process = subprocess.Popen(
        [sys.executable, '-m', 'gcp_storage_emulator', 'start', '--host=127.0.0.1',
         f'--port={self.port}', '--in-memory'],
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
