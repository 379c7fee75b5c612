"""Converts the FID InceptionV3 weights (pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` state
dict, saved as .safetensors or .npz with torch names) into a .npz of Flax-named float32 arrays,
without torch. The mapping and its checks are eval/fid_weights.py's; this is its command line.

    python -m vtp_jax.tools.convert_fid_inception --input=pt_inception.safetensors \\
        --output=fid_inception.npz

--input and --output may be local or in a bucket (`gs://BUCKET/...`).
"""

from absl import app
from absl import flags


def main(argv):
  del argv
  from vtp_jax.eval import fid_weights  # local: keeps `--help` free of jax start-up
  params = fid_weights.load_any(flags.FLAGS.input)
  fid_weights.save(params, flags.FLAGS.output)
  print(f'wrote {flags.FLAGS.output}')


if __name__ == '__main__':
  flags.DEFINE_string('input', None, 'torch state dict as .safetensors or .npz (torch names)')
  flags.DEFINE_string('output', None, 'converted .npz to write (Flax names)')
  flags.mark_flags_as_required(['input', 'output'])
  app.run(main)
