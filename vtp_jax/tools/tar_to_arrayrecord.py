"""Convert WebDataset tar shards into ArrayRecord files that `arrayrecord:GLOB` sources read.

  python -m vtp_jax.tools.tar_to_arrayrecord --input=GLOB --output=DIR [--records_per_file=N]

Every record of the tar shards (in shard order, then member order) becomes one record in the
layout of `vtp_jax.data.sources.encode_record`: image bytes are copied as they are, not decoded
or re-encoded. Records missing their image or caption are kept, so training counts them as skipped
exactly as it would on the tar shards. Files are named `part-00000.array_record`, ... and written
under a temporary name first, so a crash never leaves a truncated file under the final name.

--input and --output may be local or in a bucket (`gs://BUCKET/...`). ArrayRecord cannot write to
a bucket, so there each file is written to a local temporary file and uploaded whole (one object
upload: a reader sees the whole file or none).
"""

import contextlib
import json
import os
import tempfile

from absl import app, flags

from vtp_jax import paths
from vtp_jax.data import sources

# group_size:1 gives every record its own chunk: random access reads one record, not a group.
WRITER_OPTIONS = 'group_size:1'


def convert(pattern: str, output_dir: str, records_per_file: int = 10000,
            index_cache_dir: str | None = None, label_key: str = '') -> dict:
  """Writes every record of the shards matching `pattern`; returns a summary dict."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  if records_per_file < 1:
    raise ValueError(f'records_per_file={records_per_file}; it must be at least 1.')
  source = sources.TarSource(pattern, index_cache_dir, label_key)
  out = paths.path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  stale = [n for n in paths.child_names(out) if n.endswith('.array_record')]
  if stale:
    # Old parts would silently join the new ones under arrayrecord:DIR.
    raise FileExistsError(f'{output_dir} already holds {len(stale)} .array_record files '
                          f'({stale[0]}, ...); remove them or choose another --output.')
  files = []
  with contextlib.ExitStack() as stack:
    # Where the files are written before they take their names: beside them on a disk (a
    # rename), a local temporary folder for a bucket (an upload).
    staging = (paths.path(stack.enter_context(tempfile.TemporaryDirectory(prefix='vtp_ar_')))
               if paths.is_bucket(out) else out)
    writer, tmp = None, None

    def finish():
      writer.close()
      publish(tmp, files[-1])

    for index in range(len(source)):
      if index % records_per_file == 0:
        if writer is not None:
          finish()
        files.append(os.fspath(out / f'part-{len(files):05d}.array_record'))
        tmp = staging / f'part-{len(files) - 1:05d}.array_record.tmp'
        writer = array_record_module.ArrayRecordWriter(os.fspath(tmp), WRITER_OPTIONS)
      writer.write(sources.encode_record(source[index]))
    if writer is not None:
      finish()
  return {'input': pattern, 'output': output_dir, 'records': len(source), 'files': files}


def publish(local_file, dst) -> None:
  """Gives the finished local file `local_file` its final name `dst`: a rename on the same disk,
  else one upload (a bucket object appears whole), the local file removed after."""
  local_file, dst = paths.path(local_file), paths.path(dst)
  if paths.is_bucket(dst):
    local_file.copy(dst, overwrite=True)
    local_file.unlink()
  else:
    os.replace(local_file, dst)  # a rename within the output folder: atomic


def main(argv):
  del argv
  f = flags.FLAGS
  print(json.dumps(convert(f.input, f.output, f.records_per_file, f.index_cache_dir or None,
                           f.label_key)))


if __name__ == '__main__':
  flags.DEFINE_string('input', None, 'tar shards: a glob, a folder, or comma-separated globs')
  flags.DEFINE_string('output', None, 'folder for the .array_record files')
  flags.DEFINE_integer('records_per_file', 10000, 'records per output file')
  flags.DEFINE_string('index_cache_dir', '', 'tar index cache folder; empty = beside the shards')
  flags.DEFINE_string('label_key', '', 'field of KEY.json holding an int label; empty = none')
  flags.mark_flags_as_required(['input', 'output'])
  app.run(main)
